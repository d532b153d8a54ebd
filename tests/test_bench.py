"""The fresh-process benchmark behind `demo` and benchmarks/seed_targets.py, on a real tiny GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_factory.bench import measure, peak_rss_bytes, rows_markdown

pytestmark = pytest.mark.slow


def test_measure_reports_the_child_not_its_big_parent(tiny_f16_gguf: Path) -> None:
    # this (parent) process holds ~800 MB when it starts the measuring child; on Linux a child's
    # ru_maxrss starts at the parent's size, so a wrong method would report >= 800 MB here
    ballast = bytearray(800 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page so it is resident
    assert peak_rss_bytes() > 800 * 2**20
    row = measure(tiny_f16_gguf, ["Hello", "What is your favourite food?"], runs=2, max_tokens=8, threads=1)
    del ballast
    assert 10 < row.peak_rss_mb < 400, row.peak_rss_mb
    assert row.runs == 2 and row.size_bytes == tiny_f16_gguf.stat().st_size
    assert row.first_token_ms > 0 and row.tokens_per_s > 0 and row.load_s > 0
    assert [a["prompt"] for a in row.answers] == ["Hello", "What is your favourite food?"]
    md = rows_markdown([row])
    assert row.name in md and "MB" in md
