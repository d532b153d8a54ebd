"""Benchmark: ``gguf-factory demo`` on this machine, from nothing to the report, against the issue's targets.

Runs ``gguf-factory demo -o OUT`` in a fresh process on an empty ``OUT`` (every step is done, none reused:
prepare the bundled corpus, fine-tune SmolLM2-135M-Instruct, F16/Q8_0/Q5_K_M/Q4_K_M, the <= 50 MB file,
parity, every system measured side by side with the Bi-LSTM baseline) and times it. The figures come from
the demo's own ``demo-report.json``: each system's size, first-token latency, tokens/s and peak RSS
(medians over fresh processes, measured by ``gguf_factory.bench``) and its held-out bits per reply byte;
the time of a 32-token reply is the measured first-token latency plus 31 tokens at the measured rate.

Every row is reported, the targets are checked and written next to the figures:

* fine-tuned model in transformers <= 0.65 bits/byte; its Q4_K_M <= 0.68; both below the Bi-LSTM;
* the <= 50 MB file <= 0.85 bits/byte and below the untouched base;
* Q4_K_M first token < 100 ms, a 32-token reply < 1 s, peak RSS < 200 MB;
* the whole demo <= 25 min.

Results: ``benchmarks/results/demo.json`` and ``demo.md`` (with the demo's own report copied beside them as
``demo-report.md``), stamped with date, commit, machine and the exact command; ``--results demo_scratch``
names them otherwise (for ``-- --from-scratch``, the nano path).

``--time-budget 25m`` is passed on to the demo (``gguf-factory demo --time-budget``; as any option after
``--`` would be) and the demo's plan, what it cut and each stage's planned and actual seconds, go into the
results beside the figures.

    python benchmarks/demo.py [--out /tmp/gguf-factory-demo] [--reuse] [-- extra demo options]
    python benchmarks/demo.py --out /tmp/gguf-factory-demo-scratch --results demo_scratch -- --from-scratch
    python benchmarks/demo.py --time-budget 25m --results demo_budget -- --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stamp import git_commit, machine, run_timed

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()

TARGETS = {
    "demo_minutes": 25.0,
    "finetuned_hf_bpb": 0.65,
    "finetuned_q4_k_m_bpb": 0.68,
    "small_file_bpb": 0.85,
    "small_file_mb": 50.0,
    "q4_k_m_first_token_ms": 100.0,
    "q4_k_m_32_token_reply_ms": 1000.0,
    "q4_k_m_peak_rss_mb": 200.0,
}


def reply_ms(first_token_ms: float, tokens_per_s: float, n: int = 32) -> float | None:
    if not tokens_per_s:
        return None
    return first_token_ms + (n - 1) * 1000.0 / tokens_per_s


def rows_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in report["systems"]:
        m = s["measurement"]  # medians over fresh processes (gguf_factory.bench.BenchRow)
        rows.append(
            {
                "name": s["name"],
                "kind": s["kind"],
                "size_mb": round(m["size_bytes"] / 1e6, 1),
                "load_s": round(m["load_s"], 3),
                "first_token_ms": round(m["first_token_ms"], 1),
                "tokens_per_s": round(m["tokens_per_s"], 1),
                "reply_32_ms": _round(reply_ms(m["first_token_ms"], m["tokens_per_s"])),
                "peak_rss_mb": round(m["peak_rss_mb"], 1),
                "context": m.get("n_ctx"),  # a GGUF's KV cache, allocated at load, grows with it
                "bits_per_byte": _round(s.get("bits_per_byte"), 4),
                "on_topic": s.get("on_topic"),
                "similarity": _round(s.get("similarity"), 3),
                "samples": m.get("samples"),
            }
        )
    return rows


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def check(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with the measured figure and whether it is met (a missing figure is not met)."""
    rows = {r["name"]: r for r in result["rows"]}

    def one(suffix: str, kind: str | None = None) -> dict[str, Any] | None:
        found = [r for n, r in rows.items() if n.endswith(suffix) and (kind is None or r["kind"] == kind)]
        return found[0] if found else None

    hf = next((r for r in rows.values() if r["kind"] == "hf"), None)
    q4 = one("-Q4_K_M", "gguf")
    lstm = next((r for r in rows.values() if r["kind"] == "lstm"), None)
    small_name = (result["small_file"] or {}).get("path") or ""
    small = rows.get(small_name.removesuffix(".gguf"))
    base = next((r for r in rows.values() if r["name"].lower().startswith("smollm2")), None)
    t = TARGETS

    def met(value: float | None, limit: float, below: float | None = None) -> dict[str, Any]:
        ok = value is not None and value <= limit and (below is None or value < below)
        return {"value": value, "target": limit, "met": ok}

    lstm_bpb = lstm["bits_per_byte"] if lstm else None
    return {
        "demo_minutes": met(round(result["seconds"] / 60, 1), t["demo_minutes"]),
        "finetuned_hf_bpb": met(hf and hf["bits_per_byte"], t["finetuned_hf_bpb"], lstm_bpb),
        "finetuned_q4_k_m_bpb": met(q4 and q4["bits_per_byte"], t["finetuned_q4_k_m_bpb"], lstm_bpb),
        "small_file_bpb": met(
            small and small["bits_per_byte"], t["small_file_bpb"], base["bits_per_byte"] if base else None
        ),
        "small_file_mb": met(small and small["size_mb"], t["small_file_mb"]),
        "q4_k_m_first_token_ms": met(q4 and q4["first_token_ms"], t["q4_k_m_first_token_ms"]),
        "q4_k_m_32_token_reply_ms": met(q4 and q4["reply_32_ms"], t["q4_k_m_32_token_reply_ms"]),
        "q4_k_m_peak_rss_mb": met(q4 and q4["peak_rss_mb"], t["q4_k_m_peak_rss_mb"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/gguf-factory-demo"))
    ap.add_argument(
        "--reuse", action="store_true", help="keep OUT's finished steps (the time is then partial)"
    )
    ap.add_argument(
        "--from-report",
        action="store_true",
        help="do not run the demo: rebuild the results from OUT/demo-report.json (time: the report's own)",
    )
    ap.add_argument("--results", default="demo", help="results file stem (e.g. demo_scratch)")
    ap.add_argument(
        "--time-budget", help="passed on to gguf-factory demo --time-budget (minutes, or e.g. 25m, 1h30m)"
    )
    ap.add_argument("extra", nargs="*", help="options passed on to gguf-factory demo")
    args = ap.parse_args()
    if args.time_budget is not None:
        args.extra = ["--time-budget", args.time_budget, *args.extra]
    max_rss = None
    if not args.from_report:
        if args.out.exists() and not args.reuse:
            shutil.rmtree(args.out)
        cmd = [sys.executable, "-m", "gguf_factory.cli", "demo", "-o", str(args.out), *args.extra]
        console.print(f"running: {' '.join(cmd)}")
        ran = run_timed(cmd)
        wall, max_rss = ran["seconds"], ran["peak_rss_mb"]
    report = json.loads((args.out / "demo-report.json").read_text())
    if args.from_report:
        wall = report["seconds"]
    result: dict[str, Any] = {
        "benchmark": "demo",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "demo_command": "gguf-factory demo " + " ".join(args.extra),
        "seconds": round(wall, 1),
        "reused_steps": report.get("reused_steps", []),
        "step_seconds": report.get("step_seconds", {}),
        "time_budget": _budget_summary(report.get("time_budget")),
        "max_rss_mb_demo_process": max_rss,
        "base": report.get("base"),
        "parity": report.get("parity"),
        "small_file": report.get("small_file"),
        "rows": rows_of(report),
    }
    result["targets"] = check(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.results}.md").write_text(markdown(result, f"{args.results}-report.md"))
    shutil.copyfile(args.out / "demo-report.md", RESULTS / f"{args.results}-report.md")
    table = Table(title=f"gguf-factory demo: {result['seconds'] / 60:.1f} min")
    for col in ("system", "MB", "first token ms", "32-token reply ms", "tok/s", "RSS MB", "bits/byte"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(*_cells(r)[:7])
    console.print(table)
    for k, v in result["targets"].items():
        console.print(f"{'met ' if v['met'] else 'MISSED'} {k}: {v['value']} (target {v['target']})")


def _budget_summary(b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The demo's time budget without its plan-by-plan history (that stays in its own report)."""
    if not b:
        return None
    keep = (
        "budget_seconds", "step_seconds", "reference", "calibration", "full", "applied", "reduced",
        "planned_seconds", "actual_seconds", "first_estimate_seconds", "minimum_seconds", "full_seconds",
        "schedules",
    )  # fmt: skip
    return {k: b[k] for k in keep if k in b}


def _fmt(v: Any, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["name"], _fmt(r["size_mb"], "{:.1f}"), _fmt(r["first_token_ms"], "{:.1f}"),
        _fmt(r["reply_32_ms"], "{:.0f}"), _fmt(r["tokens_per_s"], "{:.0f}"), _fmt(r["peak_rss_mb"], "{:.0f}"),
        _fmt(r.get("context") if r["kind"] == "gguf" else None, "{}"),
        _fmt(r["bits_per_byte"], "{:.3f}"), _fmt(r["on_topic"], "{:.0%}"),
    ]  # fmt: skip


def markdown(r: dict[str, Any], report_name: str = "demo-report.md") -> str:
    m = r["machine"]
    lines = [
        f"# `gguf-factory demo` measured ({r['seconds'] / 60:.1f} min on {m['cpus']} CPU cores)",
        "",
        f"{r['date']} · commit {r['commit']} · load {m['load_avg']} · `{r['command']}` "
        f"(runs `{r['demo_command'].strip()}` on an empty folder)",
        "",
        f"Base: {r['base'] or 'none (from scratch)'}. "
        f"Reused steps: {', '.join(r['reused_steps']) or 'none'}.",
        "",
        "| system | kind | size MB | first token ms | 32-token reply ms | tokens/s | peak RSS MB | context "
        "| bits/byte | on topic |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        c = _cells(row)
        lines.append("| " + " | ".join([c[0], row["kind"], *c[1:]]) + " |")
    lines += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for k, v in r["targets"].items():
        lines.append(f"| {k} | {v['value']} | {v['target']} | {'yes' if v['met'] else '**no**'} |")
    small = r.get("small_file")
    if small:
        lines += ["", "## The small file", ""]
        lines += [f"- {n}" for n in small["notes"]]
        if small.get("path"):
            lines.append(
                f"- built: {small['path']} ({small['size_bytes'] / 1e6:.1f} MB, by {small['method']})"
            )
    budget = r.get("time_budget")
    if budget:
        lines += [
            "",
            "## Time budget",
            "",
            f"Budget {budget['budget_seconds'] / 60:.1f} min; {budget['step_seconds']:.3g} s per training "
            f"step measured; first plan {budget['first_estimate_seconds'] / 60:.1f} min (full recipes "
            f"{budget['full_seconds'] / 60:.1f}, the least {budget['minimum_seconds'] / 60:.1f}). Reduced: "
            + (", ".join(budget["reduced"]) or "nothing")
            + ".",
            "",
            "| stage | planned s | actual s |",
            "|---|---:|---:|",
        ]
        stages = dict.fromkeys([*budget["planned_seconds"], *budget["actual_seconds"]])
        lines += [
            f"| {k} | {_fmt(budget['planned_seconds'].get(k), '{:.0f}')} "
            f"| {_fmt(budget['actual_seconds'].get(k), '{:.0f}')} |"
            for k in stages
        ]
    lines += ["", "## Step times", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["step_seconds"].items()]
    lines += [
        "",
        "Bits per byte are over all held-out test conversations, teacher-forced; on topic over the first 40 "
        "answered (the demo's `--quality-prompts`). The 32-token reply time is first token + 31 tokens "
        "at the measured rate. The demo's own report, with "
        f"sample answers: [{report_name}]({report_name}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
