"""Build benchmark on examples/domains.yaml: cold build, cached re-run, and the parallel steps (everything
after the universal model: one LoRA, merge, conversion, quantization and validation per domain) with
`--executor ray` on 1 worker vs 2 workers, from the same cache state, in the same run.

    python benchmarks/build.py [--manifest examples/domains.yaml] [--work benchmarks/work/build] [--repeats 3]

The Ray runs alternate their order (repeat 0: 1 worker first, repeat 1: 2 workers first, ...); medians with
min–max. Besides 2 workers vs 1, the same per-domain steps are compared with the cold build's local
executor (torch on both cores), which is what a user without Ray gets. Writes
benchmarks/results/build.{json,md} (``build_<manifest stem>`` for another manifest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from gguf_factory.factory import build
from stamp import git_commit, machine

RESULTS = Path(__file__).parent / "results"
SEQUENTIAL = (
    "prepare:all",
    "train:universal",
    "convert:universal",
    "quantize:universal",
    "validate:universal",
)


def _mm(x: dict[str, float] | None) -> str:
    """``median s (min–max)`` of a spread, or – when there is none."""
    return "–" if not x else f"{x['median']:.1f} s ({x['min']:.1f}–{x['max']:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=Path(__file__).parents[1] / "examples" / "domains.yaml")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "build")
    ap.add_argument("--repeats", type=int, default=3, help="Ray runs per worker count (0: no Ray comparison)")
    args = ap.parse_args()
    stem = "build" if args.manifest.stem == "domains" else f"build_{args.manifest.stem.replace('-', '_')}"
    console = Console()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "cache"

    cold = build(args.manifest, work / "out", cache_dir=cache)
    console.print(f"cold build: {cold.seconds:.1f} s, {cold.ran} steps")
    warm = build(args.manifest, work / "out", cache_dir=cache)
    console.print(f"cached re-run: {warm.seconds:.2f} s, {warm.cached} steps from cache")

    # the parallel part: keep the universal model's steps, redo every per-domain step
    keep = {s.path.name for s in cold.steps if s.name in SEQUENTIAL}
    parallel_steps = [s for s in cold.steps if s.name not in SEQUENTIAL]
    sequential_s = sum(s.seconds for s in cold.steps if s.name in SEQUENTIAL)
    parallel_local = sum(s.seconds for s in cold.steps if s.name not in SEQUENTIAL)
    runs: dict[int, list] = {1: [], 2: []}
    for rep in range(args.repeats):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            c = work / f"cache-ray{workers}-{rep}"
            c.mkdir()
            for name in keep:
                shutil.copytree(cache / name, c / name)
            r = build(args.manifest, work / f"out-ray{workers}", executor="ray", workers=workers, cache_dir=c)
            assert r.cached == len(keep) and r.ran == len(parallel_steps), (r.cached, r.ran)
            runs[workers].append(r)
            console.print(
                f"ray, {workers} worker(s): {r.seconds:.1f} s in all, steps "
                f"{r.executor_stats['graph_s']:.1f} s after {r.executor_stats['warm_up_s']:.1f} s of start-up"
            )

    def xs(workers: int, key: str | None) -> list[float]:
        return [r.seconds if key is None else r.executor_stats[key] for r in runs[workers]]

    def spread(workers: int, key: str | None) -> dict[str, float]:
        v = xs(workers, key)
        return {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else {}

    nan = float("nan")
    steps_1, steps_2 = (spread(1, "graph_s").get("median", nan), spread(2, "graph_s").get("median", nan))
    wall_1, wall_2 = (spread(1, None).get("median", nan), spread(2, None).get("median", nan))
    speedup = steps_1 / steps_2 if args.repeats else nan

    routing = cold.routing or {}
    try:
        manifest = args.manifest.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        manifest = args.manifest.name
    result = {
        "manifest": manifest,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "cold_s": cold.seconds,
        "steps": len(cold.steps),
        "universal_part_s": sequential_s,
        "cached_s": warm.seconds,
        "cached_ratio": warm.seconds / cold.seconds,
        "local_per_domain_steps_s": parallel_local,
        "ray_steps_1_worker_s": steps_1,
        "ray_steps_2_workers_s": steps_2,
        "ray_speedup_steps": speedup,
        "ray_wall_1_worker_s": wall_1,
        "ray_wall_2_workers_s": wall_2,
        "ray_speedup_wall": wall_1 / wall_2,
        "ray_2_workers_vs_local": parallel_local / steps_2,
        "ray_steps_s": {w: spread(w, "graph_s") for w in runs},
        "ray_wall_s": {w: spread(w, None) for w in runs},
        "ray_orders": ["1-2" if rep % 2 == 0 else "2-1" for rep in range(args.repeats)],
        "ray_warm_up_s": {w: [r.executor_stats["warm_up_s"] for r in runs[w]] for w in runs},
        "repeats": args.repeats,
        "parallel_steps": len(parallel_steps),
        "routing": routing,
        "artifacts": cold.artifacts,
        "step_seconds": {s.name: s.seconds for s in cold.steps},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    doms = routing.get("domains", {})
    md = [
        f"# Build benchmark: {args.manifest.name}",
        "",
        f"{result['machine']['cpus']} CPU cores ({result['machine']['cpu']['model']}), "
        f"{result['machine']['platform']}, {result['date']}, commit {result['commit']}; all figures from one "
        f"invocation: `{result['command']}`.",
        "",
        "| figure | measured | goal |",
        "|---|---:|---:|",
        f"| cold build ({len(cold.steps)} steps, local executor) | {cold.seconds:.1f} s | |",
        f"| cached re-run (nothing changed) | {warm.seconds:.2f} s = "
        f"{100 * warm.seconds / cold.seconds:.2f} % of cold | ≤ 10 % |",
        f"| per-domain steps ({len(parallel_steps)}), local executor (in the cold build) "
        f"| {parallel_local:.1f} s | |",
        f"| per-domain steps, Ray 1 worker | {_mm(result['ray_steps_s'].get(1))} | |",
        f"| per-domain steps, Ray 2 workers | {_mm(result['ray_steps_s'].get(2))} | |",
        f"| speed-up on the parallel steps, Ray 2 workers vs 1 | {speedup:.2f}× | ≥ 1.7× |",
        f"| speed-up on the parallel steps, Ray 2 workers vs the local executor "
        f"| {result['ray_2_workers_vs_local']:.2f}× | |",
        f"| whole Ray run incl. start-up, 1 worker | {_mm(result['ray_wall_s'].get(1))} | |",
        f"| whole Ray run incl. start-up, 2 workers | {_mm(result['ray_wall_s'].get(2))} "
        f"({wall_1 / wall_2:.2f}× vs 1) | |",
        "",
        "The Ray runs start from a cache holding only the universal model's steps "
        f"({sequential_s:.0f} s of the cold build, sequential by nature) and redo every per-domain step "
        "(LoRA training, merge, conversion, quantization, validation, router). A Ray worker is one CPU and "
        "each task runs single-threaded, so 1 worker leaves the second core idle: for comparison, the same "
        f"steps took {parallel_local:.1f} s in the cold build's local executor with torch on both cores. "
        f"Medians (min–max) of {args.repeats} runs per worker count, their order alternating. Step times are "
        "from the first step submitted to the last finished, after every worker has started and imported "
        "torch, transformers, peft and llama.cpp (the warm-up, which the whole-run figure includes).",
        "",
        "## Routing accuracy on each domain's held-out prompts",
        "",
        "| domain | prompts | accuracy |",
        "|---|---:|---:|",
        *(f"| {d} | {v['prompts']} | {100 * v['accuracy']:.1f} % |" for d, v in doms.items()),
        "",
        "## Slowest steps of the cold build",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {s.name} | {s.seconds:.1f} |" for s in sorted(cold.steps, key=lambda s: -s.seconds)[:10]),
    ]
    if not args.repeats:  # no Ray rows
        md = [line for line in md if "Ray" not in line and "2 workers" not in line]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    console.print(f"wrote {RESULTS / f'{stem}.md'}")


if __name__ == "__main__":
    main()
