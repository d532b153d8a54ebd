"""The tree is lint-clean and formatted as ``ruff format`` writes it (ruff is pinned in the dev extra, so
that a new ruff release cannot turn this red on its own)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ["src", "tests", "benchmarks"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return subprocess.run([exe, *args, *TREES], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_is_clean() -> None:
    r = ruff("check", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean() -> None:
    r = ruff("format", "--check", "--no-cache")
    assert r.returncode == 0, "run `ruff format src tests benchmarks`:\n" + r.stdout + r.stderr


MAX_FUNCTION_LINES = 120


def test_no_function_over_120_lines() -> None:
    """Long functions are split where a reader wants names for the parts (nested defs count in their
    parent, as a reader scrolls through them)."""
    import ast

    long = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
