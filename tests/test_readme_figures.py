"""The README's measured figures are the results files' (benchmarks/readme_figures.py renders them)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def _module():
    return load_benchmark("readme_figures")


def test_readme_figures_are_the_results_files() -> None:
    mod = _module()
    block = mod.current()
    assert block == mod.render(), "README.md's measured block is stale: run benchmarks/readme_figures.py"
    for name, _ in mod.SECTIONS:  # every results file is there and made its lines
        assert (mod.RESULTS / f"{name}.json").is_file(), name
        assert f"benchmarks/results/{name}.md" in block, name
    # spot checks, straight from the JSON: the headline figures are in the README
    demo = json.loads((mod.RESULTS / "demo.json").read_text())
    assert f"**{demo['seconds'] / 60:.1f} min**" in block
    ft = json.loads((mod.RESULTS / "demo_finetune.json").read_text())
    assert f"**{ft['best']}**" in block and f"demo uses {mod._demo_recipe()}" in block
    assert all(f"| {r['bpb_q4_k_m']:.3f} |" in block for r in ft["rows"])


def test_run_all_regenerates_every_readme_figure() -> None:
    """`benchmarks/run_all.py` runs a script for every results file the README's block is made of."""
    import subprocess
    import sys

    figures = _module()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    listed = {line.split(":")[0].removeprefix("== ") for line in proc.stdout.splitlines()}
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its neighbour stamp.py
    try:
        run_all = importlib.import_module("run_all")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    stems = {b.results for b in run_all.benches(Path("/tmp/demo"))}
    for name, _ in figures.SECTIONS:
        assert name in stems, f"no benchmark in run_all.py writes results/{name}.json"
    assert {b.name for b in run_all.benches(Path("/tmp/demo"))} == listed
    for b in run_all.benches(Path("/tmp/demo")):
        assert (ROOT / "benchmarks" / b.args[0]).is_file(), b
