"""External tools some tests need (Go, Chromium, Ray): skipped where absent, unless the environment sets
``GGUF_FACTORY_REQUIRE_TOOLS=1`` (CI does, in ``.ci/run``), where a missing tool fails the test instead:
a silently failed install step must not leave CI green."""

from __future__ import annotations

import os

import pytest

REQUIRE = "GGUF_FACTORY_REQUIRE_TOOLS"


def strict() -> bool:
    return os.environ.get(REQUIRE, "").strip() not in ("", "0")


def missing_tool(reason: str) -> None:
    """Skip the running test for ``reason``, or fail it when tools are required."""
    if strict():
        pytest.fail(f"{reason} ({REQUIRE} is set: a missing tool is a failure, not a skip)")
    pytest.skip(reason)
