"""The step-kind registry of a factory build, below both the graph (which runs steps) and the steps (which
register themselves): a step knows no orchestrator, so what both need lives here."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

STEP_FILE = "step.json"
"""Written last inside a finished step's folder: its record (kind, settings, summary, ...)."""
StepFunc = Callable[[Mapping[str, Any], Mapping[str, Path], Path], dict[str, Any]]
STEP_KINDS: dict[str, StepFunc] = {}


def step_kind(name: str) -> Callable[[StepFunc], StepFunc]:
    """Decorator: register ``fn`` as the step kind ``name``."""

    def register(fn: StepFunc) -> StepFunc:
        STEP_KINDS[name] = fn
        return fn

    return register


def step_summary(step_dir: Path) -> dict[str, Any]:
    """The JSON summary a finished step returned (from its ``step.json``)."""
    return json.loads((step_dir / STEP_FILE).read_text()).get("summary") or {}
