"""Benchmark: fine-tuning recipes for the demo beyond benchmarks/demo_finetune.py's, on a GPU when one is
lent (each recipe takes seconds there and about 4 minutes per epoch on 2 CPU cores).

Each recipe fine-tunes SmolLM2-135M-Instruct (the named base ``smollm2-135m-instruct``, rebuilt as a
float32 Hugging Face checkpoint) on the demo's data (the bundled chatterbot English corpus, prepared as
``gguf-factory demo`` does) and is measured by held-out bits per reply byte in transformers
(``gguf_factory.evaluate.bits_per_byte`` on the test split). Besides epochs, learning rate and batch size,
it tries what the ``train`` command has no option for, by replacing parts of the loop for that recipe:

* ``all``: the loss on every token (user turns and template too), not only the assistant's replies;
* ``tv``: train on train + validation (the validation split then only reports; ``keep="last"``);
* ``wd0``: no weight decay (default 0.1); ``floor0-warm0``: no warm-up, cosine to zero (default 5 %
  warm-up, floor 10 %).

Results: ``benchmarks/results/finetune_sweep.json`` and ``.md`` (rewritten after every recipe).

    python benchmarks/finetune_sweep.py [--device cuda] [--precision bf16] [--only e1-lr1e-4,...]
    python benchmarks/finetune_sweep.py --from-jsonl rows.jsonl --stamp '{...}'   # a cut run's rows
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from stamp import git_commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_HF = 0.65

# name, train() arguments, loop changes (all_turns, LoopSettings fields), data ("d": train, "tv": train+val)
RECIPES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("e1-lr1e-4", dict(epochs=1, lr=1e-4), {}, "d"),
    ("e1-lr1e-4-all", dict(epochs=1, lr=1e-4), dict(all_turns=True), "d"),
    ("e2-lr1e-4-all", dict(epochs=2, lr=1e-4), dict(all_turns=True), "d"),
    ("e2-lr1e-4-tv-last", dict(epochs=2, lr=1e-4, keep="last"), {}, "tv"),
    ("e2-lr1e-4-all-tv-last", dict(epochs=2, lr=1e-4, keep="last"), dict(all_turns=True), "tv"),
    ("e1-lr2e-4-bs4", dict(epochs=1, lr=2e-4, batch_size=4), {}, "d"),
    ("e2-lr1e-4", dict(epochs=2, lr=1e-4), {}, "d"),
    ("e2-lr5e-5", dict(epochs=2, lr=5e-5), {}, "d"),
    ("e2-lr1e-4-bs4", dict(epochs=2, lr=1e-4, batch_size=4), {}, "d"),
    ("e2-lr1e-4-wd0", dict(epochs=2, lr=1e-4), dict(weight_decay=0.0), "d"),
    ("e2-lr1e-4-floor0-warm0", dict(epochs=2, lr=1e-4), dict(min_lr_ratio=0.0, warmup_ratio=0.0), "d"),
    ("e2-lr2e-4", dict(epochs=2, lr=2e-4), {}, "d"),
    ("e3-lr5e-5-loss", dict(epochs=3, lr=5e-5, monitor="loss"), {}, "d"),
    ("e4-lr5e-5-all-loss", dict(epochs=4, lr=5e-5, monitor="loss"), dict(all_turns=True), "d"),
]


class LoopChanges:
    """Replaces the loop's encoder (``all_turns``) and settings for one recipe; restores them after."""

    def __init__(self) -> None:
        self.loop = importlib.import_module("gguf_factory.train.loop")
        self.ft = importlib.import_module("gguf_factory.train.finetune")
        self.encode, self.settings = self.loop.encode_conversation, self.ft.loop_settings

    def apply(self, all_turns: bool = False, **fields: Any) -> None:
        loop, encode, settings = self.loop, self.encode, self.settings

        def every_token(tokenizer: Any, messages: Any, max_seq_len: int) -> Any:
            ex = encode(tokenizer, messages, max_seq_len)
            return None if ex is None else loop.Example(ex.input_ids, list(ex.input_ids))

        def changed(defaults: Any, s: Any) -> Any:
            return dataclasses.replace(settings(defaults, s), **fields)

        loop.encode_conversation = every_token if all_turns else encode
        self.ft.loop_settings = changed if fields else settings

    def restore(self) -> None:
        self.apply()


def _setup(work: Path) -> tuple[Path, Path, Path]:
    from demo_finetune import base_folder
    from gguf_factory.data import prepare

    d, tv = work / "data", work / "data-tv"
    if not (d / "train.jsonl").exists():
        prepare(None, d)
    if not tv.exists():
        tv.mkdir()
        (tv / "train.jsonl").write_text((d / "train.jsonl").read_text() + (d / "val.jsonl").read_text())
        for split in ("val", "test"):
            shutil.copy(d / f"{split}.jsonl", tv / f"{split}.jsonl")
    return d, tv, base_folder(work)


def run_recipe(recipe: tuple, dirs: tuple[Path, Path, Path], work: Path, args: argparse.Namespace) -> dict:
    from gguf_factory.evaluate import bits_per_byte
    from gguf_factory.train import train

    name, kw, changes, which = recipe
    d, tv, base = dirs
    out = work / f"m-{name}"
    shutil.rmtree(out, ignore_errors=True)
    patch = LoopChanges()
    patch.apply(**changes)
    t0 = time.time()
    try:
        kw = {"batch_size": 8, **kw}
        train(d if which == "d" else tv, out, base=base, device=args.device, precision=args.precision,
              progress=False, **kw)  # fmt: skip
        t1 = time.time()
        bpb = bits_per_byte(out, d / "test.jsonl", kind="hf")
        rec = json.loads((out / "training.json").read_text())
        return {
            "name": name, "bpb": round(bpb.bpb, 4), "train_s": round(t1 - t0, 1),
            "eval_s": round(time.time() - t1, 1), "kept": rec.get("kept_epoch"),
            "epochs_run": rec.get("epochs_run"), "val_losses": rec.get("val_losses"),
            "val_acc": rec.get("val_accuracies"), "tps": rec["throughput"].get("tokens_per_second"),
        }  # fmt: skip
    except Exception as e:  # a failing recipe is a row, not the end of the sweep
        traceback.print_exc()
        return {"name": name, "error": repr(e)[:500]}
    finally:
        patch.restore()
        shutil.rmtree(out, ignore_errors=True)


def write_results(result: dict[str, Any]) -> None:
    rows = result["rows"]
    ok = [r for r in rows if "bpb" in r]
    best = min(ok, key=lambda r: r["bpb"]) if ok else None
    result["best"] = best["name"] if best else None
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Fine-tuning recipes for the demo (SmolLM2-135M-Instruct on chatterbot English)",
        "",
        f"{result['date']} · commit {result['commit']} · {result.get('where', '')} · `{result['command']}`",
        "",
        "Held-out bits per reply byte in transformers (test split, 90 conversations; lower is better; "
        f"target {TARGET_HF}; the untouched base: demo_finetune.md). Recipes: e<epochs>, lr, "
        "bs<batch> (default 8), `all` loss on every token, `tv` trained on train + validation, `last` the "
        "last epoch kept (else the best by validation top-1, or by loss with `loss`), `wd0` no weight "
        "decay, `floor0-warm0` no warm-up and cosine to 0.",
        "",
        "| recipe | bits/byte | train s | kept epoch | validation loss per epoch |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if "bpb" in r:
            vl = ", ".join(f"{x:.3f}" for x in r.get("val_losses") or [])
            lines.append(f"| {r['name']} | {r['bpb']:.4f} | {r['train_s']} | {r['kept']} | {vl} |")
        else:
            lines.append(f"| {r['name']} | error: {r['error']} | | | |")
    if result.get("not_run"):
        lines += [
            "",
            "Not run: "
            + ", ".join(result["not_run"])
            + (f" ({result['note']})." if result.get("note") else "."),
        ]
    if best:
        lines += ["", f"Lowest: **{best['name']}**, {best['bpb']:.4f} bits per byte (target {TARGET_HF})."]
    (RESULTS / "finetune_sweep.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gguf-factory-ft-sweep")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--from-jsonl", type=Path, help="rebuild the results from a run's rows")
    ap.add_argument("--stamp", help="with --from-jsonl: JSON of the run's date, commit, where, note")
    args = ap.parse_args(argv)
    command = "python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])])
    names = [r[0] for r in RECIPES]
    if args.from_jsonl:
        st = json.loads(args.stamp or "{}")
        rows = [json.loads(x) for x in args.from_jsonl.read_text().splitlines() if x.strip()]
        done = {r["name"] for r in rows}
        write_results({"benchmark": "finetune_sweep", "command": command, "source": args.from_jsonl.name,
                       **st, "rows": rows, "not_run": [n for n in names if n not in done]})  # fmt: skip
        return
    import torch

    only = {n for n in args.only.split(",") if n}
    if only - set(names):
        ap.error(f"unknown recipe(s) {sorted(only - set(names))}; known: {', '.join(names)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dirs = _setup(work)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result: dict[str, Any] = {
        "benchmark": "finetune_sweep", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(), "command": command, "machine": {**machine(), "gpu": gpu},
        "where": f"{gpu or 'CPU'}, {args.precision}", "rows": [],
    }  # fmt: skip
    chosen = [r for r in RECIPES if not only or r[0] in only]
    for k, recipe in enumerate(chosen):
        row = run_recipe(recipe, dirs, work, args)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        result["not_run"] = [r[0] for r in chosen[k + 1 :]]
        write_results(result)


if __name__ == "__main__":
    main()
