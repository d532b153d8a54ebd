"""The README's measured figures are the results files' (benchmarks/readme_figures.py renders them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
