"""The step kinds of a factory build. Each takes its settings (JSON), its dependencies' output folders and
an empty folder to write into, calls the typed API of one verb, and returns a small JSON summary."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FactoryError
from .registry import step_kind, step_summary


def _threads(settings: Mapping[str, Any]) -> int | None:
    return settings.get("threads") or None


@step_kind("prepare")
def prepare_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..data import prepare

    files = [f["path"] for f in settings["files"]]
    cats = settings["categories"]
    sources = None if not files else [*files, *([f"chatterbot:{settings['language']}"] if cats else [])]
    r = prepare(
        sources,
        out / "data",
        val_fraction=settings["val"],
        test_fraction=settings["test"],
        seed=settings["seed"],
        language=settings["language"],
        categories=cats or None,
    )
    return {"conversations": r.stats.conversations}


@step_kind("train")
def train_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..train import train
    from ..train.scratch import ModelPreset

    data = deps[settings["data"]] / "data"
    preset = settings.get("preset")
    if isinstance(preset, dict):
        preset = ModelPreset(**preset)
    t = settings["train"]
    r = train(
        data,
        out / "model",
        preset=preset or "nano",
        base=settings.get("base"),
        epochs=t.get("epochs"),
        batch_size=t.get("batch_size"),
        lr=t.get("lr"),
        max_steps=t.get("max_steps"),
        seed=t["seed"],
        threads=_threads(settings),
        progress=False,
    )
    return {"params": r.n_params, "epochs": r.epochs_run, "best_val_loss": r.best_val_loss}


@step_kind("lora")
def lora_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..train import train
    from ..train.lora import LoraSettings

    t = settings["lora"]
    lora = LoraSettings(
        rank=t["rank"],
        alpha=t["alpha"],
        targets=tuple(t["targets"]) if t.get("targets") else None,
        dropout=t["dropout"],
    )
    r = train(
        deps[settings["data"]] / "data",
        out / "adapter",
        base=deps[settings["base"]] / "model",
        lora=lora,
        epochs=t.get("epochs"),
        batch_size=t.get("batch_size"),
        lr=t.get("lr"),
        max_steps=t.get("max_steps"),
        seed=t["seed"],
        threads=_threads(settings),
        progress=False,
    )
    return {"adapter_params": r.n_params, "epochs": r.epochs_run, "best_val_loss": r.best_val_loss}


@step_kind("merge")
def merge_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..merge import AdapterSpec, merge

    specs = [AdapterSpec(deps[a["step"]] / "adapter", a["weight"]) for a in settings["adapters"]]
    r = merge(deps[settings["base"]] / "model", specs, out / "model")
    return {"combination": r.combination, "rank": r.rank}


@step_kind("convert")
def convert_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..convert import convert

    r = convert(deps[settings["model"]] / "model", out / "model-F16.gguf", outtype="f16")
    return {"bytes": r.path.stat().st_size}


@step_kind("quantize")
def quantize_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..autoquant import _quiet
    from ..quantize import PROFILES, quantize

    qtype = PROFILES[settings["profile"]].qtype
    with _quiet():  # llama.cpp narrates each tensor's fallback on fd 2
        r = quantize(
            deps[settings["gguf"]] / "model-F16.gguf",
            out / f"model-{qtype}.gguf",
            profile=settings["profile"],
            threads=_threads(settings),
        )
    return {"file": r.path.name, "type": r.qtype, "bytes": r.size_bytes, "context_length": r.context_length}


@step_kind("lora_gguf")
def lora_gguf_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..convert.lora import convert_lora

    r = convert_lora(
        deps[settings["adapter"]] / "adapter", out / "adapter.gguf", base=deps[settings["base"]] / "model"
    )
    return {"bytes": r.path.stat().st_size, "rank": list(r.ranks)}


@step_kind("validate")
def validate_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Structure and data checks of every GGUF, then llama.cpp loads it (with its LoRA, for an adapter) and
    generates a few tokens through the chat template."""
    import json

    from ..doctor.validate import validate

    def one(step: str) -> Path:
        found = sorted((deps[step]).glob("*.gguf"))
        if len(found) != 1:
            raise FactoryError(f"expected one GGUF in {deps[step]}")
        return found[0]

    model = one(settings["gguf"])
    report = validate(model, smoke=True)
    if report.exit_code != 0:
        problems = "; ".join(f"{f.code}: {f.message}" for f in report.findings[:5])
        raise FactoryError(f"{model} failed validation: {problems}")
    checked = {"model": model.name, "findings": len(report.findings)}
    if settings.get("adapter"):
        from ..runtime import load

        adapter = deps[settings["adapter"]] / "adapter.gguf"
        with load(model, n_ctx=256, threads=1, lora_path=adapter) as m:
            out_text = m.chat([{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0)
        checked["adapter"] = adapter.name
        checked["adapter_reply"] = out_text
    (out / "validation.json").write_text(json.dumps({**checked, "report": report.to_dict()}, default=str))
    return checked


@step_kind("router")
def router_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from ..router import fit_router, make_manifest, read_manifest, write_manifest

    domains = {
        name: {
            "model": d["model"],
            "adapter": d.get("adapter"),
            "profile": d["profile"],
            "context_length": step_summary(deps[d["quantize"]]).get("context_length"),
            "keywords": d["keywords"],
            "description": d["description"],
            "data": str(deps[d["data"]] / "data"),
        }
        for name, d in settings["domains"].items()
    }
    manifest = make_manifest(out / "router.yaml", domains, name=settings["name"])
    r = fit_router(manifest)
    m = read_manifest(manifest)  # the shipped manifest does not point into the build cache
    m = m.model_copy(
        update={"domains": {k: v.model_copy(update={"data": None}) for k, v in m.domains.items()}}
    )
    write_manifest(m, manifest)
    return {
        "accuracy": r.accuracy,
        "min_accuracy": r.min_accuracy,
        "domains": {d.domain: {"accuracy": d.accuracy, "prompts": d.test_prompts} for d in r.domains},
    }


@step_kind("eval")
def eval_step(settings: Mapping[str, Any], deps: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """A domain's quantized parent against its F16 on the domain's held-out test conversations."""
    import json

    from ..evaluate import evaluate

    quant = next(iter(sorted(deps[settings["gguf"]].glob("*.gguf"))))
    ref = deps[settings["ref"]] / "model-F16.gguf"
    r = evaluate(quant, deps[settings["data"]] / "data", ref=ref, threads=_threads(settings))
    m = r.models[0]
    summary = {
        "model": quant.name, "conversations": r.n_conversations, "tokens": r.n_tokens,
        "perplexity": m.perplexity, "ref_perplexity": r.reference.perplexity if r.reference else None,
        "delta_ppl": m.delta_ppl, "kld_mean": m.kld_mean, "top1": m.top1,
    }  # fmt: skip
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    return summary
