"""Seed targets for the demo's nano model: file < 50 MB, first token < 100 ms, peak RSS < 200 MB.

Runs (or reuses) `gguf-factory demo --from-scratch` (the nano preset trained from nothing; the default demo
fine-tunes SmolLM2-135M instead, measured by benchmarks/demo.py) in OUT_DIR, then measures every GGUF it
made in fresh processes (medians of --runs runs, each answering the same held-out prompts greedily) and writes
benchmarks/results/seed_targets.json and .md.

    python benchmarks/seed_targets.py [--out benchmarks/work/seed_targets] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from gguf_factory.bench import measure, render_table, rows_markdown
from gguf_factory.demo import DEMO_NAME, held_out_prompts, run_demo

sys.path.insert(0, str(Path(__file__).parent))
from stamp import git_commit, machine, portable  # noqa: E402

TARGETS = {"size_mb": 50.0, "first_token_ms": 100.0, "peak_rss_mb": 200.0}
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "work" / "seed_targets")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    console = Console()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    demo = run_demo(args.out, from_scratch=True, runs=1, lstm=False)
    demo_s = time.perf_counter() - t0
    prompts = [p for p, _ in held_out_prompts(Path(args.out) / "data" / "test.jsonl", args.prompts)]
    rows = [measure(p, prompts, runs=args.runs, name=p.stem) for p in demo.ggufs.values()]
    console.print(
        render_table(rows, title=f"medians of {args.runs} fresh processes, {len(prompts)} prompts each")
    )

    q4 = next(r for r in rows if r.name.endswith("Q4_K_M"))
    figures = {
        "size_mb": q4.size_bytes / 1e6,
        "first_token_ms": q4.first_token_ms,
        "peak_rss_mb": q4.peak_rss_mb,
    }
    verdict = {k: figures[k] < TARGETS[k] for k in TARGETS}
    result = {
        "model": f"{DEMO_NAME}-nano-Q4_K_M",
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "demo_seconds": round(demo_s, 1),
        "demo_reused_steps": demo.reused,
        "demo_step_seconds": demo.step_seconds,
        "runs": args.runs,
        "prompts": len(prompts),
        "targets": TARGETS,
        "figures": figures,
        "pass": verdict,
        "all_models": [r.to_json() for r in rows],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seed_targets.json").write_text(json.dumps(portable(result), indent=2) + "\n")
    md = [
        "# Seed targets: nano Q4_K_M",
        "",
        f"Medians of {args.runs} fresh processes on {os.cpu_count()} CPU cores "
        f"({result['machine']['cpu']['model']}), each answering {len(prompts)} held-out prompts greedily "
        "(first token = prompt evaluation + first sampled token). The model: `gguf-factory demo "
        f"--from-scratch` ({demo_s / 60:.1f} min on this machine); {result['date']}, commit "
        f"{result['commit']}, `{result['command']}`.",
        "",
        "| figure | target | measured | pass |",
        "|---|---:|---:|:---:|",
        *(
            f"| {label} | < {TARGETS[key]:.0f} {unit} | {figures[key]:.{digits}f} {unit} "
            f"| {'✅' if verdict[key] else '❌'} |"
            for label, key, unit, digits in (
                ("file size", "size_mb", "MB", 2),
                ("first token", "first_token_ms", "ms", 1),
                ("peak RSS", "peak_rss_mb", "MB", 0),
            )
        ),
        "",
        "## Every GGUF of the demo",
        "",
        rows_markdown(rows),
    ]
    (RESULTS / "seed_targets.md").write_text("\n".join(md) + "\n")
    for k, ok in verdict.items():
        console.print(f"{k}: {figures[k]:.2f} (target < {TARGETS[k]}) {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
