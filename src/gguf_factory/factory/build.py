"""Build a ``factory.yaml``: the step graph, its execution, and the packaged outputs.

The graph, for domains D (each with adapters A: its subdomains, or the domain itself)::

    prepare:all ─ train:universal ─ convert:universal ─ quantize:universal ─ validate:universal
    prepare:D.A ─ lora:D.A (on the universal model) ─ lora_gguf:D.A ─ validate:D.A (universal + LoRA)
    merge:D (universal + D's adapters, weighted) ─ convert:D ─ quantize:D (D's profile) ─ validate:D
    quantize:D + convert:D + prepare:D ─ eval:D (PPL, KLD, top-1 of the parent vs its F16, held-out data)
    prepare:D ─ router (fitted on each domain's training prompts; accuracy on its held-out prompts)

The package (``OUT/``): ``models/`` (the universal model and one parent per domain, quantized),
``adapters/`` (GGUF LoRA files for the universal model), ``router.yaml`` + its routing model, and
``build-report.md`` / ``build.json``. Files are hard links into the cache (copies across filesystems).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import atomic_write_json, atomic_write_text, human_size, sha256_file
from .graph import Graph, LocalExecutor, RayExecutor, Step, StepRecord
from .manifest import DataSpec, DomainSpec, FactoryManifest, base_model_source, read_factory

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out_dir: Path
    steps: list[StepRecord]
    artifacts: dict[str, str]
    """Packaged file (relative to out_dir) -> size in bytes, as text."""
    routing: dict[str, Any] | None
    seconds: float
    executor: str
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    executor_stats: dict[str, float] = field(default_factory=dict)
    """Ray: ``warm_up_s`` (workers and their imports) and ``graph_s`` (the steps)."""

    @property
    def ran(self) -> int:
        return sum(s.status == "ran" for s in self.steps)

    @property
    def cached(self) -> int:
        return sum(s.status == "cached" for s in self.steps)


def _data_settings(spec: DataSpec, m: FactoryManifest, root: Path) -> dict[str, Any]:
    files = [{"path": str((root / f).resolve()), "sha256": sha256_file(root / f)} for f in spec.files]
    return {
        "categories": sorted(spec.categories),
        "files": files,
        "language": m.language,
        "val": m.split.val,
        "test": m.split.test,
        "seed": m.split.seed,
    }


def _union(*specs: DataSpec) -> DataSpec:
    cats = sorted({c for s in specs for c in s.categories})
    files = list(dict.fromkeys(f for s in specs for f in s.files))
    return DataSpec(categories=cats, files=files)


def plan(m: FactoryManifest, root: Path, threads: int | None) -> list[Step]:
    """The step graph of a manifest (``root``: the manifest's folder)."""
    domain_data = {name: _union(d, *d.subdomains.values()) for name, d in m.domains.items()}
    steps = _universal_steps(m, root, threads, domain_data)
    router_domains: dict[str, Any] = {}
    for name, d in m.domains.items():
        steps.append(Step(f"prepare:{name}", "prepare", _data_settings(domain_data[name], m, root)))
        adapters = {f"{name}.{s}": sub for s, sub in d.subdomains.items()} or {name: d}
        for aname, spec in adapters.items():
            steps += _adapter_steps(m, root, threads, name, aname, spec)
        steps += _parent_steps(threads, name, d, adapters)
        router_domains |= _routes(m, name, d, adapters)
    if m.outputs.router:
        deps = {s for r in router_domains.values() for s in (r["data"], r["quantize"])}
        steps.append(
            Step("router", "router", {"name": m.name, "domains": router_domains}, tuple(sorted(deps)))
        )
    return steps


def _universal_steps(
    m: FactoryManifest, root: Path, threads: int | None, domain_data: dict[str, DataSpec]
) -> list[Step]:
    """The universal model: trained on every domain's data, converted, and (when it is an output)
    quantized and validated."""
    steps: list[Step] = []
    steps.append(Step("prepare:all", "prepare", _data_settings(_union(*domain_data.values()), m, root)))
    base = None if m.base.model is None else base_model_source(root, m.base.model)
    steps.append(
        Step(
            "train:universal",
            "train",
            {
                "data": "prepare:all",
                "preset": m.base.preset,
                "base": base,
                "train": m.train.model_dump(),
                "threads": threads,
            },
            ("prepare:all",),
        )
    )
    steps.append(Step("convert:universal", "convert", {"model": "train:universal"}, ("train:universal",)))
    if m.outputs.universal:
        steps.append(
            Step(
                "quantize:universal",
                "quantize",
                {"gguf": "convert:universal", "profile": "production", "threads": threads},
                ("convert:universal",),
            )
        )
        steps.append(
            Step("validate:universal", "validate", {"gguf": "quantize:universal"}, ("quantize:universal",))
        )
    return steps


def _adapter_steps(
    m: FactoryManifest, root: Path, threads: int | None, name: str, aname: str, spec: DataSpec
) -> list[Step]:
    """One adapter ``aname`` of domain ``name``: its data (a subdomain's own), its LoRA on the universal
    model and (when wanted) its GGUF LoRA, validated on the quantized universal model."""
    steps: list[Step] = []
    data_step = f"prepare:{aname}"
    if aname != name:
        steps.append(Step(data_step, "prepare", _data_settings(spec, m, root)))
    lora_settings = {
        "lora": m.lora.model_dump(),
        "threads": threads,
        "data": data_step,
        "base": "train:universal",
    }
    steps.append(Step(f"lora:{aname}", "lora", lora_settings, (data_step, "train:universal")))
    if m.outputs.lora_gguf:
        steps.append(
            Step(
                f"lora_gguf:{aname}",
                "lora_gguf",
                {"adapter": f"lora:{aname}", "base": "train:universal"},
                (f"lora:{aname}", "train:universal"),
            )
        )
        if m.outputs.universal:
            steps.append(
                Step(
                    f"validate:{aname}.lora",
                    "validate",
                    {"gguf": "quantize:universal", "adapter": f"lora_gguf:{aname}"},
                    ("quantize:universal", f"lora_gguf:{aname}"),
                )
            )
    return steps


def _parent_steps(threads: int | None, name: str, d: DomainSpec, adapters: dict[str, DataSpec]) -> list[Step]:
    """Domain ``name``'s parent model: the universal model with its adapters merged in (weighted),
    converted, quantized to its profile, validated and evaluated against its F16."""
    total = sum(a.weight for a in adapters.values())
    adapter_list = [{"step": f"lora:{a}", "weight": spec.weight / total} for a, spec in adapters.items()]
    return [
        Step(
            f"merge:{name}",
            "merge",
            {"base": "train:universal", "adapters": adapter_list},
            ("train:universal", *(a["step"] for a in adapter_list)),
        ),
        Step(f"convert:{name}", "convert", {"model": f"merge:{name}"}, (f"merge:{name}",)),
        Step(
            f"quantize:{name}",
            "quantize",
            {"gguf": f"convert:{name}", "profile": d.profile, "threads": threads},
            (f"convert:{name}",),
        ),
        Step(f"validate:{name}", "validate", {"gguf": f"quantize:{name}"}, (f"quantize:{name}",)),
        Step(
            f"eval:{name}",
            "eval",
            {
                "gguf": f"quantize:{name}",
                "ref": f"convert:{name}",
                "data": f"prepare:{name}",
                "threads": threads,
            },
            (f"quantize:{name}", f"convert:{name}", f"prepare:{name}"),
        ),
    ]


def _routes(m: FactoryManifest, name: str, d: DomainSpec, adapters: dict[str, DataSpec]) -> dict[str, Any]:
    """The router's routes for domain ``name``: to its parent model, or one per adapter on the shared
    universal model (``router_to: adapters``)."""
    from ..quantize import PROFILES

    qtype = PROFILES[d.profile].qtype
    if m.outputs.router_to == "parents":
        return {
            name: {
                "model": f"models/{name}-{qtype}.gguf",
                "profile": d.profile,
                "quantize": f"quantize:{name}",
                "keywords": d.keywords,
                "description": d.description,
                "data": f"prepare:{name}",
            }
        }
    return {
        aname: {
            "model": "models/universal-Q4_K_M.gguf",
            "adapter": f"adapters/{aname}.gguf",
            "profile": "production",
            "quantize": "quantize:universal",
            "keywords": d.keywords,
            "description": d.description,
            "data": f"prepare:{aname}",
        }
        for aname in adapters
    }


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _package(m: FactoryManifest, graph: Graph, records: list[StepRecord], out: Path) -> dict[str, str]:
    """Assemble the outputs in a temporary folder beside ``out``, then swap it in."""
    from ..quantize import PROFILES

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if m.outputs.universal:
        _link(
            graph.path("quantize:universal") / "model-Q4_K_M.gguf", tmp / "models" / "universal-Q4_K_M.gguf"
        )
    for name, d in m.domains.items():
        qtype = PROFILES[d.profile].qtype
        _link(graph.path(f"quantize:{name}") / f"model-{qtype}.gguf", tmp / "models" / f"{name}-{qtype}.gguf")
        if m.outputs.lora_gguf:
            for a in [f"{name}.{s}" for s in d.subdomains] or [name]:
                _link(graph.path(f"lora_gguf:{a}") / "adapter.gguf", tmp / "adapters" / f"{a}.gguf")
    if m.outputs.router:
        for f in graph.path("router").iterdir():
            if f.name != "step.json":
                _link(f, tmp / f.name)
    artifacts = {
        str(p.relative_to(tmp)): str(p.stat().st_size) for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return artifacts


def build(
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    executor: str = "local",
    workers: int = 2,
    address: str | None = None,
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> BuildResult:
    """Run the whole build of ``manifest_path`` into ``out_dir`` (default: ``build/<name>`` beside the
    manifest); steps already in the cache (``<out_dir>/../.cache`` unless given) are reused."""
    from .._version import __version__
    from . import steps as _steps  # noqa: F401  (registers the step kinds)

    t0 = time.perf_counter()
    mpath = Path(manifest_path)
    m = read_factory(mpath)
    root = mpath.resolve().parent
    out = Path(out_dir) if out_dir is not None else root / "build" / m.name
    if out.exists() and not (out / "build.json").is_file() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a build output: choose another output folder")
    cache = (Path(cache_dir) if cache_dir is not None else out.parent / ".cache").resolve()
    if executor == "local":
        ex: LocalExecutor | RayExecutor = LocalExecutor()
    elif executor == "ray":
        if workers < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        ex = RayExecutor(address, workers)
        threads = threads or 1  # a Ray task holds one CPU (Ray also sets OMP_NUM_THREADS to it)
    else:
        raise InputError(f"unknown executor {executor!r}: local or ray")
    graph = Graph(plan(m, root, threads), cache, __version__)
    stale = graph.clean_stale()
    if stale:
        log.info("removed %d unfinished step folder(s) of an interrupted build", stale)
    records = ex.run(graph, on_step)
    artifacts = _package(m, graph, records, out)
    routing = next((r.summary for r in records if r.name == "router"), None)
    result = BuildResult(out, records, artifacts, routing, time.perf_counter() - t0, ex.name)
    result.executor_stats = dict(getattr(ex, "stats", {}))
    if routing and routing.get("min_accuracy", 1.0) < 0.9:
        result.notes.append(
            f"routing accuracy of the weakest domain is {100 * routing['min_accuracy']:.0f} % (< 90 %): give "
            "its domain more distinct data or keywords"
        )
    atomic_write_json(
        out / "build.json",
        {
            "manifest": str(mpath),
            "executor": ex.name,
            "seconds": result.seconds,
            "artifacts": artifacts,
            "routing": routing,
            "steps": [{**asdict(s), "path": str(s.path)} for s in records],
            "notes": result.notes,
        },
    )
    result.report_path = atomic_write_text(out / "build-report.md", _report(m, result))
    return result


def _report(m: FactoryManifest, r: BuildResult) -> str:
    lines = [
        f"# Build {m.name}",
        "",
        f"{len(r.steps)} steps ({r.ran} run, {r.cached} from cache) in {r.seconds:.1f} s, "
        f"executor {r.executor}.",
        "",
        "| file | size |",
        "|---|---:|",
        *(f"| {f} | {human_size(int(s))} |" for f, s in r.artifacts.items() if f.endswith(".gguf")),
        "",
    ]
    if r.routing:
        lines += [
            "## Routing accuracy on held-out prompts",
            "",
            "| domain | held-out prompts | accuracy |",
            "|---|---:|---:|",
            *(
                f"| {d} | {v['prompts']} | {100 * v['accuracy']:.1f} % |"
                for d, v in r.routing["domains"].items()
            ),
            "",
            f"Overall {100 * r.routing['accuracy']:.1f} %, "
            f"weakest domain {100 * r.routing['min_accuracy']:.1f} %.",
            "",
        ]
    evals = [(s.name.split(":", 1)[1], s.summary) for s in r.steps if s.kind == "eval"]
    if evals:
        lines += [
            "## Quality of each parent GGUF against its F16 (the domain's held-out test conversations)",
            "",
            "| domain | file | PPL | ΔPPL % | mean KLD | top-1 % |",
            "|---|---|---:|---:|---:|---:|",
            *(
                f"| {d} | {e['model']} | {e['perplexity']:.3f} | {100 * (e['delta_ppl'] or 0):+.2f} | "
                f"{e['kld_mean']:.4g} | {100 * (e['top1'] or 0):.1f} |"
                for d, e in evals
            ),
            "",
        ]
    lines += ["## Steps", "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} |" for s in r.steps]
    lines += ["", *(f"- note: {n}" for n in r.notes)]
    return "\n".join(lines) + "\n"


def load_build(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(out_dir) / "build.json"
    if not p.is_file():
        raise InputError(f"no build.json in {out_dir}")
    return json.loads(p.read_text())
