"""GPU check of the training engine (issue 15): the code path the CPU tests cover, run on a CUDA GPU.

On a tiny Llama trained from scratch on the bundled chatterbot corpus (so that it needs no download):

* ``--device auto`` picks CUDA and bf16 (where the GPU has it); the master weights stay float32;
* ``--precision bf16`` and ``fp16`` train (losses fall, finite);
* ``--pack`` and ``--gradient-checkpointing`` train the same weights as a plain run (float32; GPU kernels
  are not bit-reproducible across batch shapes, so within a tolerance, reported);
* a run killed with SIGKILL and resumed ends with the weights of an uninterrupted run (bf16: within a
  tolerance; the largest difference is reported) and the same number of steps;
* ``torchrun --nproc-per-node 1`` on the GPU (one GPU: a launch of one process);
* ``--lora --load-in-4bit``: QLoRA when bitsandbytes is installed, else its one-line refusal.

Results: ``benchmarks/results/gpu_train_check.json`` and ``.md`` (date, commit, machine, command).

    python benchmarks/gpu_train_check.py [--work /tmp/gguf-factory-gpu-check]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stamp import git_commit, machine

RESULTS = Path(__file__).resolve().parent / "results"

RUNNER = """
import sys
from gguf_factory.train import ModelPreset, train
preset = ModelPreset(name="tiny", hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, vocab_size=600, max_seq_len=128, epochs=3, lr=3e-3, batch_size=8)
train(sys.argv[1], sys.argv[2], preset=preset, max_steps=int(sys.argv[4]), epochs=50, progress=False,
      save_every=10, keep_checkpoints=2, keep="last", device=sys.argv[6], precision=sys.argv[5],
      resume=True if sys.argv[3] == "resume" else None)
"""


def _preset():
    from gguf_factory.train import ModelPreset

    return ModelPreset(
        name="tiny", hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=600, max_seq_len=128, epochs=3, lr=3e-3, batch_size=8,
    )  # fmt: skip


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "training.json").read_text())


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


class Rows(list):
    """The checks' rows; ``on_row(rows)`` is called after each one is added."""

    def __init__(self, on_row: Any = None):
        super().__init__()
        self.on_row = on_row


def _check(name: str, ok: bool, detail: str, rows: Rows) -> None:
    rows.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if rows.on_row is not None:
        rows.on_row(list(rows))


def run_checks(work: Path, device: str = "cuda", on_row: Any = None) -> list[dict[str, Any]]:
    import torch

    from gguf_factory.data import prepare
    from gguf_factory.train import train

    rows = Rows(on_row)
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        prepare(None, data)
    kw = dict(preset=_preset(), progress=False, device=device)

    # 1. auto: CUDA and bf16, float32 master weights
    train(data, work / "auto", max_steps=30, device="auto", preset=_preset(), progress=False)
    run = _record(work / "auto")["run"]
    dtypes = {str(t.dtype) for t in _weights(work / "auto").values()}
    want = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    _check("--device auto", run["device"].startswith(device) and run["precision"] == want
           and dtypes == {"torch.float32"}, f"device {run['device']}, precision {run['precision']}, "
           f"saved weights {sorted(dtypes)}", rows)  # fmt: skip

    # 2. bf16 and fp16 train
    for prec in ("bf16", "fp16") if device == "cuda" else ("bf16",):
        r = train(data, work / prec, epochs=3, precision=prec, **kw)
        losses = r.train_losses
        ok = all(x == x and abs(x) != float("inf") for x in losses) and losses[-1] < losses[0]
        _check(
            f"--precision {prec}", ok, "train loss per epoch " + ", ".join(f"{x:.3f}" for x in losses), rows
        )

    # 3. pack and gradient checkpointing: the same weights as a plain run (fp32)
    plain = work / "plain"
    train(data, plain, epochs=1, precision="fp32", **kw)
    for flag in ("pack", "gradient_checkpointing"):
        out = work / flag
        train(data, out, epochs=1, precision="fp32", **{flag: True}, **kw)
        d = _max_diff(plain, out)
        _check(f"--{flag.replace('_', '-')} (fp32)", d < 1e-3, f"largest weight difference from a plain run "
               f"{d:.2e}", rows)  # fmt: skip

    # 4. SIGKILL + resume, bf16 and fp32
    script = work / "runner.py"
    script.write_text(RUNNER)
    steps = 200
    for prec in ("fp32", "bf16"):
        whole, cut = work / f"whole-{prec}", work / f"cut-{prec}"

        def runner(out: Path, mode: str, prec: str = prec) -> list[str]:
            return [sys.executable, str(script), str(data), str(out), mode, str(steps), prec, device]

        subprocess.run(runner(whole, "fresh"), check=True, capture_output=True)
        proc = subprocess.Popen(runner(cut, "fresh"), stderr=subprocess.DEVNULL)
        target = cut.parent / f"{cut.name}.checkpoints" / "checkpoint-00000040"
        deadline = time.monotonic() + 300
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL and not cut.exists()
        subprocess.run(runner(cut, "resume"), check=True, capture_output=True)
        d = _max_diff(whole, cut)
        rw, rc = _record(whole), _record(cut)
        # exactly on a CPU; GPU kernels (atomics in some backward passes) are not bit-reproducible
        tol = 5e-2 if prec == "bf16" else (1e-4 if device == "cuda" else 0.0)
        ok = killed and rc["steps"] == rw["steps"] == steps and d <= tol
        where = Path(rc["resumed_from"] or "-").name
        detail = f"killed mid-run: {killed}; resumed from {where}; largest weight difference {d:.2e}"
        detail += f" (allowed {tol:g})"
        _check(f"SIGKILL + resume ({prec})", ok, detail, rows)

    # 5. torchrun
    out = work / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "gguf_factory.cli", "train", str(data), "-o", str(out), "--max-steps", "5",
           "--epochs", "1", "--batch-size", "4", "--device", device]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        rec = _record(out)
        # one process: no process group is needed (several GPUs would use NCCL, as the CPU test uses gloo)
        detail = f"world_size {rec['world_size']}, steps {rec['steps']}, device {rec['run']['device']}"
        ok = rec["world_size"] == 1 and rec["steps"] == 5 and rec["run"]["device"].startswith(device)
        _check("torchrun --nproc-per-node 1", ok, detail, rows)
    else:
        _check("torchrun --nproc-per-node 1", False, proc.stderr.strip().splitlines()[-1][:300], rows)

    # 6. QLoRA: trains with bitsandbytes, else one line
    base = work / "auto"
    proc = subprocess.run([sys.executable, "-m", "gguf_factory.cli", "train", str(data), "-o",
                           str(work / "qlora"), "--base", str(base), "--lora", "--load-in-4bit",
                           "--max-steps", "5"], capture_output=True, text=True)  # fmt: skip
    try:
        import bitsandbytes  # noqa: F401

        have = True
    except ImportError:
        have = False
    err = proc.stderr.strip().splitlines()
    if have:
        _check("--lora --load-in-4bit", proc.returncode == 0, "trained" if proc.returncode == 0
               else (err[-1] if err else "failed"), rows)  # fmt: skip
    else:
        _check("--lora --load-in-4bit without bitsandbytes", proc.returncode == 2 and len(err) == 1,
               f"exit {proc.returncode}: {err[-1] if err else ''}", rows)  # fmt: skip
    return rows


def write_results(result: dict[str, Any]) -> None:
    """``results/gpu_train_check.json`` and ``.md`` from ``result`` (rewritten after every check, so a run
    cut short by the machine's time still leaves what it checked)."""
    rows = result["checks"]
    result["passed"] = sum(r["ok"] for r in rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_train_check.json").write_text(json.dumps(result, indent=2) + "\n")
    m, v = result["machine"], result["versions"]
    lines = [
        "# The training engine on a GPU",
        "",
        f"{result['date']} · commit {result['commit']} · {m.get('gpu')} · torch {v.get('torch')} · "
        f"transformers {v.get('transformers')} · `{result['command']}`",
        "",
        f"**{result['passed']} of {len(rows)} checks passed**"
        + (f" ({result['note']})" if result.get("note") else "")
        + ".",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *(f"| {r['check']} | {'pass' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in rows),
    ]
    if result.get("not_run"):
        lines += ["", "Not run: " + "; ".join(result["not_run"]) + "."]
    (RESULTS / "gpu_train_check.md").write_text("\n".join(lines) + "\n")


CHECKS = (
    "--device auto",
    "--precision bf16",
    "--precision fp16",
    "--pack (fp32)",
    "--gradient-checkpointing (fp32)",
    "SIGKILL + resume (fp32)",
    "SIGKILL + resume (bf16)",
    "torchrun --nproc-per-node 1",
    "--lora --load-in-4bit",
)


def rows_from_log(text: str) -> list[dict[str, Any]]:
    """The checks a run printed (``PASS  name: detail`` / ``FAIL  name: detail`` lines)."""
    rows = []
    for line in text.splitlines():
        if line.startswith(("PASS  ", "FAIL  ")):
            name, _, detail = line[6:].partition(": ")
            rows.append({"check": name, "ok": line.startswith("PASS"), "detail": detail})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gguf-factory-gpu-check")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    ap.add_argument("--from-log", type=Path, help="rebuild the results from a run's console output")
    ap.add_argument(
        "--stamp", help="with --from-log: JSON of the run's date, commit, gpu, torch, transformers"
    )
    args = ap.parse_args(argv)
    command = "python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])])
    if args.from_log:
        st = json.loads(args.stamp or "{}")
        rows = rows_from_log(args.from_log.read_text())
        done = {r["check"].split(" without")[0] for r in rows}
        write_results({
            "benchmark": "gpu_train_check", "date": st.get("date"), "commit": st.get("commit"),
            "command": command, "source": str(args.from_log.name), "note": st.get("note"),
            "machine": {"gpu": st.get("gpu")},
            "versions": {"torch": st.get("torch"), "transformers": st.get("transformers")},
            "checks": rows, "not_run": [c for c in CHECKS if c not in done],
        })  # fmt: skip
        return
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU (torch.cuda.is_available() is False)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "gpu_train_check",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "command": command,
        "machine": {**machine(), "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "checks": [],
    }
    print("STAMP " + json.dumps(result), flush=True)
    t0 = time.time()
    run_checks(work, args.device, on_row=lambda rows: write_results({**result, "checks": rows}))
    result = json.loads((RESULTS / "gpu_train_check.json").read_text())
    result["seconds"] = round(time.time() - t0, 1)
    write_results(result)
    print(f"{result['passed']}/{len(result['checks'])} passed; wrote {RESULTS / 'gpu_train_check.md'}")


if __name__ == "__main__":
    main()
