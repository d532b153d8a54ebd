"""Regenerate every figure the README shows: each benchmark in a fresh process, one at a time (they time
things; nothing runs beside them), then the README's generated block (``readme_figures.py``).

Each script stamps its own results file (date, commit, machine, exact command); this driver records what
it ran, how long each took and whether it succeeded in ``benchmarks/results/run_all.json`` / ``.md``. A
failing benchmark is reported and the others still run; the exit code is non-zero if any failed.

    python benchmarks/run_all.py [--quick] [--only demo,serve] [--skip demo_finetune] [--dry-run]

``--quick`` runs the smaller variants (fewer repeats and rounds, the 135M half of auto-quant only, no
learning-rate sweep): the same figures with wider spreads, in about an hour on 2 cores instead of
several. The demo folder (``--demo``) is shared: the serve and student benchmarks measure the demo's
own files, so ``demo`` runs first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stamp import git_commit, machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Bench:
    name: str
    results: str
    """The results file stem it writes (``results/<stem>.json``)."""
    args: tuple[str, ...]
    quick: tuple[str, ...] | None = None
    """Arguments for ``--quick`` (None: the same as ``args``)."""


def benches(demo: Path) -> list[Bench]:
    q4 = demo / "sub-ai-smollm2-135m-Q4_K_M.gguf"
    return [
        Bench("demo", "demo", ("demo.py", "--out", str(demo), "--", "--threads", "2")),
        Bench(
            "demo_budget",
            "demo_budget",
            (
                "demo.py",
                "--out",
                f"{demo}-budget",
                "--time-budget",
                "40m",
                "--results",
                "demo_budget",
                "--",
                "--threads",
                "2",
            ),  # fmt: skip
        ),
        Bench(
            "demo_finetune",
            "demo_finetune",
            ("demo_finetune.py",),
            ("demo_finetune.py", "--recipes", "full-e1-lr1e-4-bf16"),
        ),
        Bench("demo_student", "demo_student", ("demo_student.py", "--demo", str(demo))),
        Bench(
            "autoquant_scale",
            "autoquant_scale",
            ("autoquant_scale.py",),
            ("autoquant_scale.py", "--skip-small"),
        ),
        Bench(
            "autoquant_scale_finetuned",
            "autoquant_scale_finetuned",
            (
                "autoquant_scale.py",
                "--f16",
                str(demo / "sub-ai-smollm2-135m-F16.gguf"),
                "--data",
                str(demo / "data"),
                "--skip-small",
                "--results",
                "autoquant_scale_finetuned",
            ),  # fmt: skip
        ),
        Bench(
            "train_throughput",
            "train_throughput",
            ("train_throughput.py", "--steps", "6", "--runs", "3"),
            ("train_throughput.py", "--steps", "3", "--runs", "1"),
        ),
        Bench("convert", "convert", ("convert.py",), ("convert.py", "--runs", "1")),
        Bench("from_gguf", "from_gguf", ("from_gguf.py",), ("from_gguf.py", "--runs", "1")),
        Bench(
            "serve",
            "serve",
            ("serve.py", "--model", str(q4)),
            ("serve.py", "--model", str(q4), "--rounds", "5", "--duration", "20"),
        ),
        Bench(
            "serve_peer",
            "serve_peer",
            ("serve_peer.py", "--model", str(q4)),
            ("serve_peer.py", "--model", str(q4), "--rounds", "5", "--duration", "20"),
        ),
        Bench(
            "serve_adapters",
            "serve_adapters",
            ("serve_adapters.py",),
            ("serve_adapters.py", "--repeats", "1"),
        ),
        Bench(
            "build_domains_smollm2",
            "build_domains_smollm2",
            (
                "build.py",
                "--manifest",
                "examples/domains-smollm2.yaml",
                "--repeats",
                "0",
                "--work",
                "benchmarks/work/build_smollm2",
            ),  # fmt: skip
        ),
        Bench(
            "quant_quality",
            "quant_quality",
            ("quant_quality.py",),
            ("quant_quality.py", "--overhead-runs", "3"),
        ),
        Bench("seed_targets", "seed_targets", ("seed_targets.py",), ("seed_targets.py", "--runs", "3")),
        # serve_routing serves the build this one leaves in benchmarks/work/build/out
        Bench("build", "build", ("build.py",), ("build.py", "--repeats", "1")),
        Bench("serve_routing", "serve_routing", ("serve_routing.py",)),
        Bench("hardening", "hardening", ("hardening.py",)),
        Bench("doctor", "doctor", ("doctor_fuzz.py",)),
        Bench("doctor_hypothesis", "doctor_hypothesis", ("doctor_hypothesis.py",)),
    ]


def run(b: Bench, quick: bool, dry_run: bool) -> dict[str, Any]:
    args = b.quick if quick and b.quick is not None else b.args
    cmd = [sys.executable, str(HERE / args[0]), *args[1:]]
    shown = "python benchmarks/" + " ".join(args)
    row: dict[str, Any] = {"name": b.name, "command": shown, "results": f"results/{b.results}.json"}
    print(f"== {b.name}: {shown}", flush=True)
    if dry_run:
        return row
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=HERE.parent)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["exit_code"] = code
    written = RESULTS / f"{b.results}.json"
    row["results_updated"] = written.is_file() and written.stat().st_mtime >= time.time() - row["seconds"] - 1
    print(f"== {b.name}: exit {code} in {row['seconds']:.0f} s", flush=True)
    return row


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Every README figure, regenerated",
        "",
        f"{r['date']} · commit {r['commit']} · {r['machine']['cpus']} CPUs · `{r['command']}`",
        "",
        "| benchmark | command | exit | minutes | results file rewritten |",
        "|---|---|---:|---:|---|",
    ]
    for row in r["rows"]:
        minutes = f"{row['seconds'] / 60:.1f}" if "seconds" in row else "–"
        lines.append(
            f"| {row['name']} | `{row['command']}` | {row.get('exit_code', '–')} | {minutes} | "
            f"{row.get('results_updated', '–')} |"
        )
    lines += [
        "",
        f"README block: exit {r.get('readme_exit_code', '–')}. Whole run {r['minutes']:.0f} min.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smaller variants (see the module doc)")
    ap.add_argument("--demo", type=Path, default=Path("/tmp/gguf-factory-demo"), help="the demo's folder")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    all_benches = benches(args.demo)
    known = {b.name for b in all_benches}
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    if only - known or skip - known:
        ap.error(f"unknown benchmark(s) {sorted((only | skip) - known)}; known: {', '.join(sorted(known))}")
    chosen = [b for b in all_benches if (not only or b.name in only) and b.name not in skip]
    t0 = time.perf_counter()
    rows = [run(b, args.quick, args.dry_run) for b in chosen]
    result: dict[str, Any] = {
        "benchmark": "run_all",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "quick": args.quick,
        "rows": rows,
    }
    if args.dry_run:
        return 0
    result["readme_exit_code"] = subprocess.call([sys.executable, str(HERE / "readme_figures.py")])
    result["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run_all.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "run_all.md").write_text(markdown(result))
    failed = [row["name"] for row in rows if row.get("exit_code")]
    print(f"done in {result['minutes']:.0f} min; failed: {', '.join(failed) or 'none'}")
    return 1 if failed or result["readme_exit_code"] else 0


if __name__ == "__main__":
    sys.exit(main())
