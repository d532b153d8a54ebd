"""Benchmark: how the demo should make its ≤ 50 MB student of the fine-tuned SmolLM2-135M-Instruct.

Quantization alone cannot take SmolLM2-135M under about 68 MB (its 576-wide rows fit no llama.cpp block
below 4.5 bits/weight), so the demo trims the vocabulary, removes weights and distils the result from the
fine-tuned model. This script compares ways of removing weights, starting from the folders a finished
``gguf-factory demo`` run leaves (``--demo``): the vocabulary-trimmed fine-tuned model
(``<name>-trim-hf``), its F16 GGUF (the teacher) and the prepared data. Each recipe, in fresh processes:

1. ``gguf-factory prune`` the trimmed model (FFN channels ``--ffn`` and/or whole layers ``--layers``);
2. ``gguf-factory train --base <pruned> --distill-from <teacher>`` (epochs, learning rate);
3. convert to F16 and ``quantize --max-size 50MB`` (auto-quant: a per-tensor mixture under the budget);

and is measured by held-out bits per reply byte (``gguf_factory.evaluate.bits_per_byte`` on the test
split, llama.cpp) of the student's F16 GGUF and of its ≤ 50 MB file, with the wall time and peak RSS of
each step. Reference rows: the teacher (trimmed fine-tuned F16) and the demo's own ≤ 50 MB student, both
scored here. Every row is reported. Results: ``benchmarks/results/demo_student.json`` and ``.md``.

    python benchmarks/demo_student.py --demo /tmp/gguf-factory-demo [--recipes layers0.2-ffn0-e1,...]

A recipe name reads ``layers<fraction>-ffn<fraction>-e<epochs>[-lr<lr>]`` (default lr 2e-4).
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
DEFAULT_RECIPES = ("layers0.2-ffn0-e1", "layers0.27-ffn0-e1")
BUDGET = "50MB"
TARGET_BPB = 0.85
console = Console()
CLI = [sys.executable, "-m", "gguf_factory.cli"]


def parse_recipe(name: str) -> dict[str, Any]:
    m = re.fullmatch(r"layers([0-9.]+)-ffn([0-9.]+)-e(\d+)(?:-lr([0-9.e-]+))?", name)
    if not m:
        raise SystemExit(f"bad recipe name {name!r}: expected layers<f>-ffn<f>-e<epochs>[-lr<lr>]")
    return {
        "name": name,
        "layers": float(m.group(1)),
        "ffn": float(m.group(2)),
        "epochs": int(m.group(3)),
        "lr": float(m.group(4) or 2e-4),
    }


def bpb(gguf: Path, data: Path, threads: int) -> float:
    from gguf_factory.evaluate import bits_per_byte

    return round(bits_per_byte(gguf, data / "test.jsonl", threads=threads).bpb, 4)


def precision() -> str:
    from gguf_factory.train.options import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def step(row: dict[str, Any], name: str, output: Path, cmd: list[str], log: Path) -> None:
    """Run one step unless its output exists; its time and peak RSS are kept beside the log, so that a
    rerun that reuses the output still reports them."""
    timing = log.with_suffix(".timing.json")
    if output.exists():
        row.setdefault("reused", []).append(name)
        if timing.is_file():
            row[name] = json.loads(timing.read_text())
        return
    console.print(f"[bold]{row['recipe']}[/]: {name}")
    row[name] = run_timed(cmd, log)
    timing.write_text(json.dumps(row[name]) + "\n")


def run_recipe(r: dict[str, Any], demo: Path, name: str, work: Path, threads: int) -> dict[str, Any]:
    data, trimmed, teacher = demo / "data", demo / f"{name}-trim-hf", demo / f"{name}-trim-F16.gguf"
    out = work / r["name"]
    out.mkdir(parents=True, exist_ok=True)
    pruned, student = out / "pruned-hf", out / "student-hf"
    f16, small = out / "student-F16.gguf", out / f"student-{BUDGET}.gguf"
    row: dict[str, Any] = {"recipe": r["name"], **{k: r[k] for k in ("layers", "ffn", "epochs", "lr")}}
    t = str(threads)
    step(row, "prune", pruned, [
        *CLI, "prune", str(trimmed), "--data", str(data), "-o", str(pruned), "--ffn", str(r["ffn"]),
        "--layers", str(r["layers"]), "--threads", t,
    ], out / "prune.log")  # fmt: skip
    step(row, "distil", student, [
        *CLI, "train", str(data), "-o", str(student), "--base", str(pruned), "--distill-from", str(teacher),
        "--epochs", str(r["epochs"]), "--lr", str(r["lr"]), "--precision", precision(), "--threads", t,
    ], out / "distil.log")  # fmt: skip
    step(
        row,
        "convert",
        f16,
        [*CLI, "convert", str(student), "-o", str(f16), "--outtype", "f16"],
        out / "c.log",
    )
    step(row, "autoquant", small, [
        *CLI, "quantize", str(f16), "-o", str(small), "--data", str(data), "--max-size", BUDGET,
        "--threads", t,
    ], out / "autoquant.log")  # fmt: skip
    report = json.loads((pruned / "prune_report.json").read_text())
    row["layers_kept"] = report["num_hidden_layers"]["after"]
    row["ffn_kept"] = report["intermediate_size"]["after"]
    row["params_m"] = round(report["params"]["after"] / 1e6, 1)
    training = json.loads((student / "training.json").read_text())
    row["val_losses"] = training.get("val_losses")
    row["size_mb"] = round(small.stat().st_size / 1e6, 2)
    console.print(f"[bold]{r['name']}[/]: measuring")
    row["bpb_f16"] = bpb(f16, data, threads)
    row["bpb_small"] = bpb(small, data, threads)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("/tmp/gguf-factory-demo"), help="a finished demo run")
    ap.add_argument("--name", default="sub-ai-smollm2-135m", help="the demo's model name")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-factory-bench-student"))
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    recipes = [parse_recipe(n) for n in args.recipes.split(",") if n]
    for need in (args.demo / "data" / "test.jsonl", args.demo / f"{args.name}-trim-hf" / "config.json"):
        if not need.is_file():
            raise SystemExit(f"{need} is missing: run `gguf-factory demo --out {args.demo}` first")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = args.demo / "data"
    teacher = args.demo / f"{args.name}-trim-F16.gguf"
    rows: list[dict[str, Any]] = [
        {
            "recipe": "the fine-tuned model (F16, whole vocabulary)",
            "bpb_f16": bpb(args.demo / f"{args.name}-F16.gguf", data, args.threads),
        },
        {
            "recipe": "teacher (fine-tuned, vocabulary trimmed, F16)",
            "bpb_f16": bpb(teacher, data, args.threads),
        },
    ]
    demo_student = args.demo / f"{args.name}-student-{BUDGET}.gguf"
    if demo_student.is_file():
        row = {
            "recipe": "the demo's own student, from its run",
            "size_mb": round(demo_student.stat().st_size / 1e6, 2),
            "bpb_small": bpb(demo_student, data, args.threads),
        }
        report = args.demo / f"{args.name}-pruned-hf" / "prune_report.json"
        if report.is_file():
            pruned = json.loads(report.read_text())
            row["layers_kept"] = (pruned.get("num_hidden_layers") or {}).get("after")
            row["ffn_kept"] = pruned["intermediate_size"]["after"]
            row["params_m"] = round(pruned["params"]["after"] / 1e6, 1)
        rows.append(row)
    for r in recipes:
        rows.append(run_recipe(r, args.demo, args.name, args.work, args.threads))
        _write(rows, time.perf_counter() - t0)  # every finished row is saved
    _write(rows, time.perf_counter() - t0)


def _write(rows: list[dict[str, Any]], seconds: float) -> None:
    result = {
        "benchmark": "demo_student",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "budget": BUDGET,
        "target_bpb": TARGET_BPB,
        "rows": rows,
        "seconds": round(seconds, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_student.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "demo_student.md").write_text(markdown(result))
    table = Table(title=f"the demo's ≤ {BUDGET} student")
    for col in COLUMNS:
        table.add_column(col)
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)


COLUMNS = (
    "recipe", "layers", "FFN", "params M", "prune s", "distil s", "autoquant s", "peak RSS MB",
    "size MB", "bits/byte F16", "bits/byte ≤ budget",
)  # fmt: skip


def _cells(r: dict[str, Any]) -> list[str]:
    def f(v: Any, fmt: str = "{}") -> str:
        return "–" if v is None else fmt.format(v)

    def secs(name: str) -> str:
        return f((r.get(name) or {}).get("seconds"), "{:.0f}")

    rss = max((r.get(s) or {}).get("peak_rss_mb", 0) for s in ("prune", "distil", "autoquant"))
    return [
        r["recipe"], f(r.get("layers_kept")), f(r.get("ffn_kept")), f(r.get("params_m")), secs("prune"),
        secs("distil"), secs("autoquant"), f(rss or None, "{:.0f}"), f(r.get("size_mb")),
        f(r.get("bpb_f16"), "{:.3f}"), f(r.get("bpb_small"), "{:.3f}"),
    ]  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# The demo's ≤ {r['budget']} student of SmolLM2-135M-Instruct",
        "",
        f"{r['date']} · commit {r['commit']} · {r['machine']['cpus']} CPUs · load {r['machine']['load_avg']}"
        f" · `{r['command']}`",
        "",
        "Bits per reply byte on the demo's 90 test conversations (llama.cpp; lower is better); target "
        f"for the ≤ {r['budget']} file: {r['target_bpb']}. Layers and FFN: what the student keeps "
        "(of 30 and 1536). "
        "Times are wall seconds of a fresh process each (–: a step reused from an earlier run "
        "that kept no time).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in r["rows"]]
    lines += ["", f"Whole run {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
