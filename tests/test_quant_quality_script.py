"""benchmarks/quant_quality.py's bookkeeping, without running the benchmark: a missing KLD fails the goal,
the overhead pairs alternate which side runs first, and the results carry no machine paths."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from bench_scripts import load_benchmark
from gguf_factory.ladder import Rung


@pytest.fixture(scope="module")
def qq() -> ModuleType:
    return load_benchmark("quant_quality", "quant_quality_script")


def rung(size: int, kld: float | None) -> Rung:
    return Rung("Q4_K_M", "x.gguf", size, 4.5, 0.5, {}, kld_mean=kld)


def test_a_missing_kld_is_a_failure(qq: ModuleType) -> None:
    assert qq.goal_met(rung(100, 0.10), rung(90, 0.05))
    assert not qq.goal_met(rung(100, 0.10), rung(110, 0.05))  # larger
    assert not qq.goal_met(rung(100, 0.10), rung(90, 0.20))  # worse
    assert not qq.goal_met(rung(100, 0.10), rung(90, None))
    assert not qq.goal_met(rung(100, None), rung(90, 0.05))
    assert qq.kld_ratio(rung(100, 0.10), rung(90, 0.05)) == pytest.approx(0.5)
    assert qq.kld_ratio(rung(100, 0.10), rung(90, None)) is None


def test_overhead_pairs_alternate_and_every_run_is_kept(qq: ModuleType, tmp_path: Path) -> None:
    calls: list[str] = []

    def timed(side: str, seconds: float):
        def run(src: Path, dst: Path, qtype: str, threads: int) -> float:
            calls.append(side)
            dst.write_bytes(b"x")
            return seconds + 0.01 * len(calls)

        return run

    oh = qq.overhead(tmp_path / "src.gguf", tmp_path, 4, 1, bare=timed("bare", 1.0), ours=timed("ours", 1.1))
    assert calls == ["bare", "ours", "ours", "bare", "bare", "ours", "ours", "bare"]
    assert [p["order"] for p in oh["pairs"]] == ["bare-ours", "ours-bare", "bare-ours", "ours-bare"]
    assert oh["runs"] == 4 and len(oh["pairs"]) == 4 and not list(tmp_path.iterdir())
    assert oh["bare_min_s"] <= oh["bare_s"] <= oh["bare_max_s"]
    assert oh["overhead"] == pytest.approx(oh["ours_s"] / oh["bare_s"] - 1)


def test_results_carry_no_machine_paths(qq: ModuleType) -> None:
    stamp = load_benchmark("stamp")  # the results writers' shared helper (quant_quality, seed_targets, ...)
    assert qq.portable.__module__ == "stamp"  # not a copy of its own
    inside = stamp.ROOT / "benchmarks" / "work" / "qq" / "small-F16.gguf"
    out = stamp.portable(
        {
            "model": str(inside),
            "data": {"test": "/home/someone/data/test.jsonl"},
            "rungs": [Path("/tmp/x/auto-Q4_K_M.gguf"), "a / b", 3, None],
            "note": f"read {inside}",
        }
    )
    assert out == {
        "model": "benchmarks/work/qq/small-F16.gguf",
        "data": {"test": "test.jsonl"},
        "rungs": ["auto-Q4_K_M.gguf", "a / b", 3, None],
        "note": "read benchmarks/work/qq/small-F16.gguf",
    }
