"""The build graph: steps that are pure functions of their settings and their dependencies' outputs, each
cached in a folder named by a hash of both, written atomically, run by a local or a Ray executor.

A step's folder appears at its final path only when the step has finished (it is built under a temporary
name beside it and renamed, with ``step.json`` written last inside), so a killed build leaves no half
output: re-running it finds the finished steps by their hash and redoes only the rest. A change to a
step's settings (or to an input file, whose content hash is part of the settings) changes its hash and
every hash downstream, so exactly what depends on the change is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FactoryError, InputError
from .registry import STEP_FILE, STEP_KINDS, StepFunc, step_kind  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

UNHASHED = frozenset({"threads"})
"""Settings of how a step runs, not of what it makes: left out of its hash (a build resumed with another
thread count reuses the finished steps)."""


class BuildError(FactoryError):
    """A step failed; the message names the step."""


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    settings: dict[str, Any]
    deps: tuple[str, ...] = ()


@dataclass
class StepRecord:
    name: str
    kind: str
    key: str
    path: Path
    status: str  # "ran" | "cached"
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Graph:
    def __init__(self, steps: Sequence[Step], cache_dir: Path, version: str):
        self.steps = {s.name: s for s in steps}
        if len(self.steps) != len(steps):
            raise InputError("duplicate step names in the build graph")
        for s in steps:
            for d in s.deps:
                if d not in self.steps:
                    raise InputError(f"step {s.name} depends on unknown step {d}")
        self.cache_dir = cache_dir
        self.version = version
        self.order = self._topological()
        self.keys: dict[str, str] = {}
        for name in self.order:
            s = self.steps[name]
            doc = {
                "kind": s.kind,
                "settings": {k: v for k, v in s.settings.items() if k not in UNHASHED},
                "deps": [self.keys[d] for d in s.deps],
                "v": version,
            }
            self.keys[name] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _topological(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str, chain: tuple[str, ...]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise InputError(f"cycle in the build graph: {' -> '.join((*chain, n))}")
            state[n] = 1
            for d in self.steps[n].deps:
                visit(d, (*chain, n))
            state[n] = 2
            order.append(n)

        for n in self.steps:
            visit(n, ())
        return order

    def path(self, name: str) -> Path:
        return self.cache_dir / f"{_safe(name)}-{self.keys[name][:16]}"

    def done(self, name: str) -> bool:
        return (self.path(name) / STEP_FILE).is_file()

    def clean_stale(self) -> int:
        """Remove the temporary folders of steps a killed build left unfinished."""
        n = 0
        if self.cache_dir.is_dir():
            for p in self.cache_dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


def execute_step(kind: str, name: str, settings: dict[str, Any], deps: dict[str, str], final: str) -> dict:
    """Run one step into a temporary folder and rename it to ``final`` (what an executor calls, in this
    process or in a Ray worker). Returns the step's record as JSON-able data."""
    import gguf_factory.factory.steps  # noqa: F401  (registers the step kinds in a fresh worker)

    final_p = Path(final)
    fn = STEP_KINDS.get(kind)
    if fn is None:
        raise BuildError(f"step {name}: unknown step kind {kind!r}")
    final_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_p.name}-", dir=final_p.parent))
    t0 = time.perf_counter()
    try:
        summary = fn(settings, {k: Path(v) for k, v in deps.items()}, tmp)
        seconds = time.perf_counter() - t0
        record = {"name": name, "kind": kind, "settings": settings, "summary": summary, "seconds": seconds}
        (tmp / STEP_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        try:
            os.rename(tmp, final_p)
        except OSError:  # finished by someone else meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        return record
    except FactoryError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"step {name}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _record(graph: Graph, name: str, status: str, seconds: float | None = None) -> StepRecord:
    doc = json.loads((graph.path(name) / STEP_FILE).read_text())
    s = graph.steps[name]
    return StepRecord(
        name,
        s.kind,
        graph.keys[name],
        graph.path(name),
        status,
        doc.get("seconds", 0.0) if seconds is None else seconds,
        doc.get("summary") or {},
    )


def _call(graph: Graph, name: str) -> tuple[str, dict[str, str], str]:
    s = graph.steps[name]
    return name, {d: str(graph.path(d)) for d in s.deps}, str(graph.path(name))


class LocalExecutor:
    """Runs the steps one after another in this process, in dependency order."""

    name = "local"

    def run(self, graph: Graph, on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
        out = []
        for name in graph.order:
            if graph.done(name):
                rec = _record(graph, name, "cached")
            else:
                s = graph.steps[name]
                _, deps, final = _call(graph, name)
                t0 = time.perf_counter()
                execute_step(s.kind, name, s.settings, deps, final)
                rec = _record(graph, name, "ran", time.perf_counter() - t0)
            out.append(rec)
            if on_step:
                on_step(rec)
        return out


class RayExecutor:
    """Runs independent steps at the same time as Ray tasks (``address=None``: a local Ray instance with
    ``workers`` CPUs; else a cluster address such as ``ray://head:10001``). Each task holds one CPU and
    runs single-threaded unless the build asks for more threads."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 2):
        self.address = address
        self.workers = workers
        self.stats: dict[str, float] = {}
        """``warm_up_s`` (workers started, imports loaded) and ``graph_s`` (the steps themselves)."""

    def run(self, graph: Graph, on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
        try:
            import ray
        except ImportError:
            raise InputError("the Ray executor needs Ray: pip install 'gguf-factory[ray]'") from None
        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=0)(execute_step)
        done: dict[str, StepRecord] = {}
        running: dict[Any, tuple[str, float]] = {}
        try:
            t0 = time.perf_counter()
            if any(not graph.done(n) for n in graph.order):  # start every worker and its imports at once
                warm = ray.remote(num_cpus=1, max_retries=0)(_warm_up)
                ray.get([warm.remote() for _ in range(self.workers)])
            self.stats["warm_up_s"] = time.perf_counter() - t0
            t_graph = time.perf_counter()
            for name in graph.order:
                if graph.done(name):
                    done[name] = _record(graph, name, "cached")
                    if on_step:
                        on_step(done[name])
            while len(done) < len(graph.order):
                for name in graph.order:
                    if name in done or any(n == name for n, _ in running.values()):
                        continue
                    if all(d in done for d in graph.steps[name].deps):
                        s = graph.steps[name]
                        _, deps, final = _call(graph, name)
                        running[remote.remote(s.kind, name, s.settings, deps, final)] = (
                            name,
                            time.perf_counter(),
                        )
                if not running:
                    raise BuildError("the build graph is stuck (no step can run)")
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                name, t0 = running.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    raise (
                        cause if isinstance(cause, FactoryError) else BuildError(f"step {name}: {cause}")
                    ) from e
                done[name] = _record(graph, name, "ran", time.perf_counter() - t0)
                if on_step:
                    on_step(done[name])
            self.stats["graph_s"] = time.perf_counter() - t_graph
        finally:
            if started_here:
                ray.shutdown()
        return [done[n] for n in graph.order]


def _warm_up() -> None:
    """What every step kind imports, loaded once per Ray worker before the graph starts."""
    import llama_cpp  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import gguf_factory.factory.steps  # noqa: F401
