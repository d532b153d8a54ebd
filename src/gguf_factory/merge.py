"""The ``merge`` verb: a base HF model + one or more PEFT LoRA adapters with weights -> one merged HF model
folder (safetensors, config, tokenizer), and optionally its GGUF.

>>> merge("models/base", [AdapterSpec("adapters/food", 1.0)], "models/food")  # doctest: +SKIP
>>> merge("models/base", ["adapters/food:0.7", "adapters/fun:0.3"], "models/mix", gguf=True)  # doctest: +SKIP

The LoRA arithmetic is PEFT's own. One adapter with weight 1: ``PeftModel.merge_and_unload``. One adapter
with another weight: its scale is set with PEFT's ``LoraLayer.set_scale`` and then merged. Several
adapters: ``add_weighted_adapter(combination_type="cat")`` then ``merge_and_unload``. ``cat`` stacks the
adapters' ranks (new rank = the sum), so the merged update is exactly ``sum_i w_i * s_i * B_i @ A_i``
(``s_i`` = adapter *i*'s ``alpha / r``): the weighted sum of the adapters' own updates, for any ranks and
any signs of the weights. PEFT's ``linear`` needs equal ranks and mixes ``sqrt(w_i s_i) A_i`` with
``sqrt(w_j s_j) B_j`` (cross terms, not the weighted sum; no negative weights); ``svd`` / ``ties`` / ``dare``
approximate or prune. The stacked rank only exists for the moment of the merge.

Each adapter is checked against the base before anything is merged: its recorded base
(``base_model_name_or_path``), when that folder still exists, must have the same architecture and sizes;
every LoRA pair must adapt a module the base has, with matching input/output sizes and the rank its
``adapter_config.json`` declares; its tokenizer (if saved with it) must fit the base's embeddings. The
output is written beside ``out_dir`` and renamed into place at the end; an existing ``out_dir`` is refused
(``overwrite=True`` replaces it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .errors import InputError, ModelError

__all__ = ["AdapterSpec", "MergeResult", "merge", "parse_adapter_spec", "check_adapter"]

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
# Config fields that must agree between an adapter's recorded base and the base it is merged into.
_SHAPE_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head",
    "n_inner",
)  # fmt: skip
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[\w-]+)?(?:\.weight)?$"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter folder and its weight in the merge (1.0: the adapter as trained)."""

    path: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass
class MergeResult:
    out_dir: Path
    base: Path
    adapters: list[AdapterSpec]
    combination: str  # "merge_and_unload" | "scaled" | "cat"
    rank: int  # the rank merged (the sum of the ranks for "cat")
    n_params: int
    gguf: Path | None
    seconds: float
    warnings: list[str] = field(default_factory=list)


def parse_adapter_spec(text: str | os.PathLike[str] | AdapterSpec) -> AdapterSpec:
    """``DIR`` or ``DIR:WEIGHT`` (``adapters/food:0.5``, ``adapters/x:-1``). A ``DIR`` that exists as
    written (even with a colon in its name) is taken whole, with weight 1."""
    if isinstance(text, AdapterSpec):
        spec = text
    elif isinstance(text, os.PathLike):
        spec = AdapterSpec(Path(text))
    else:
        s = str(text)
        if ":" not in s or Path(s).is_dir():
            spec = AdapterSpec(Path(s))
        else:
            path, _, w = s.rpartition(":")
            try:
                weight = float(w)
            except ValueError:
                raise InputError(
                    f"--adapter {s!r}: the weight {w!r} is not a number (DIR[:WEIGHT])"
                ) from None
            if not path:
                raise InputError(f"--adapter {s!r}: no adapter folder before the weight (DIR[:WEIGHT])")
            spec = AdapterSpec(Path(path), weight)
    w = spec.weight
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
        raise InputError(f"adapter {spec.path}: the weight must be a finite number, got {spec.weight!r}")
    return spec


# --------------------------------------------------------------------------------------------- checks


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path} is not a JSON object")
    return obj


def _adapter_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise InputError(f"adapter folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"adapter is not a folder: {folder} (expected a PEFT adapter folder)")
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a PEFT adapter folder: adapter_config.json is missing")
    cfg = _read_json(path)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ModelError(f"{path}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise ModelError(f"{path}: r (the rank) must be a positive whole number, got {cfg.get('r')!r}")
    if not (folder / "adapter_model.safetensors").is_file():
        why = " (pickled adapter_model.bin is not loaded)" if (folder / "adapter_model.bin").exists() else ""
        raise ModelError(f"{folder}: adapter_model.safetensors is missing{why}")
    return cfg


def _summary(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in _SHAPE_FIELDS if config.get(k) is not None}


def _pattern_rank(cfg: dict[str, Any], module: str) -> int:
    """PEFT's ``rank_pattern`` lookup (a key matches a module name ending in it), else ``r``."""
    for key, value in (cfg.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return int(value)
    return int(cfg["r"])


def _module_io(module: Any) -> tuple[int, int] | None:
    """(in, out) of a module LoRA can adapt: Linear, GPT-2 Conv1D, Embedding (num_embeddings, dim)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def _check_recorded_base(
    spec: AdapterSpec, cfg: dict[str, Any], base_dir: Path, base_config: dict[str, Any]
) -> None:
    """When the adapter's recorded base folder still exists and is another folder, its config must have
    the same architecture and sizes as ``base_dir``'s (a moved or copied base passes)."""
    folder = spec.path
    recorded = cfg.get("base_model_name_or_path")
    if recorded and Path(str(recorded)).is_dir() and (Path(str(recorded)) / "config.json").is_file():
        rec_dir = Path(str(recorded)).resolve()
        if rec_dir != base_dir.resolve():
            mine, theirs = _summary(base_config), _summary(_read_json(rec_dir / "config.json"))
            diff = [k for k in sorted(set(mine) & set(theirs)) if mine[k] != theirs[k]]
            if diff:
                k = diff[0]
                raise ModelError(
                    f"adapter {folder} was trained on {rec_dir}, not on a copy of {base_dir}: {k} is "
                    f"{theirs[k]} there and {mine[k]} here"
                )
            log.info(
                "adapter %s was trained on %s, which has the same shapes as %s", folder, rec_dir, base_dir
            )


def check_adapter(
    spec: AdapterSpec, base_dir: Path, base_config: dict[str, Any], model: Any
) -> dict[str, Any]:
    """Check that the adapter in ``spec`` was made for this base; return its ``adapter_config.json``.

    ``model`` is the loaded base (its modules' sizes are compared with the adapter's tensors).
    """
    from safetensors import safe_open

    folder = spec.path
    cfg = _adapter_config(folder)
    _check_recorded_base(spec, cfg, base_dir, base_config)
    where = folder / "adapter_model.safetensors"
    modules = dict(model.named_modules())
    try:
        with safe_open(str(where), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # a damaged header: safetensors raises its own error types
        raise ModelError(f"{where}: cannot read the safetensors file ({e})") from None
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("kind")[-1]] = shape
    if not pairs:
        raise ModelError(f"{where}: no LoRA tensors (lora_A / lora_B)")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{where}: {module} has only lora_{''.join(ab)}, not a LoRA pair")
        a, b = ab["A"], ab["B"]
        target = modules.get(module)
        io = _module_io(target) if target is not None else None
        if io is None:
            raise ModelError(
                f"adapter {folder} adapts {module}, which the base {base_dir} does not have as a "
                "linear/embedding layer: an adapter for another base model"
            )
        n_in, n_out = io
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ModelError(f"{where}: {module}: lora_A {a} and lora_B {b} are not a rank-r pair")
        if (a[1], b[0]) != (n_in, n_out):
            raise ModelError(
                f"adapter {folder} does not fit the base {base_dir}: {module} takes {n_in} inputs and gives "
                f"{n_out} outputs in the base, but {a[1]} -> {b[0]} in the adapter (lora_A {a}, lora_B {b}): "
                "an adapter for another base model"
            )
        want = _pattern_rank(cfg, module)
        if a[0] != want:
            raise ModelError(f"{where}: {module} has rank {a[0]}, but adapter_config.json says r={want}")
    return cfg


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{folder}: cannot load the tokenizer ({e})") from None


def _pick_tokenizer(specs: Sequence[AdapterSpec], base_dir: Path, n_embeddings: int) -> tuple[Any, Path]:
    """The adapters' tokenizer (it carries the chat template the adapter was trained with) if they saved
    one, else the base's. Adapters with different vocabularies cannot be merged together."""
    chosen, source = None, base_dir
    for spec in specs:
        if not any((spec.path / f).is_file() for f in _TOKENIZER_FILES):
            continue
        tok = _load_tokenizer(spec.path)
        if len(tok) > n_embeddings:
            raise ModelError(
                f"adapter {spec.path}: its tokenizer has {len(tok)} tokens but the base has {n_embeddings} "
                "embeddings: an adapter for another (resized) base model"
            )
        if chosen is None:
            chosen, source = tok, spec.path
        elif tok.get_vocab() != chosen.get_vocab():
            raise ModelError(f"adapters {source} and {spec.path} have different tokenizer vocabularies")
    if chosen is None:
        chosen = _load_tokenizer(base_dir)
    return chosen, source


# --------------------------------------------------------------------------------------------- merge


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    gguf: bool = False,
    outtype: str = "f16",
    dtype: str = "auto",
    overwrite: bool = False,
) -> MergeResult:
    """Merge ``adapters`` (``AdapterSpec`` or ``"DIR[:WEIGHT]"``) into ``base`` (a HF model folder, a GGUF,
    a named base or a Hub id: :func:`gguf_factory.bases.resolve_path`) and
    write a HF model folder at ``out_dir``; ``gguf=True`` also converts it to
    ``out_dir/<name>-<OUTTYPE>.gguf``. ``dtype``: the saved weights' type (``auto``: the base's).
    """
    import torch

    from .convert import OUTTYPES
    from .train.finetune import check_base_folder, load_base, prepare_chat
    from .train.loop import count_params, quiet_hf_progress

    t0 = time.perf_counter()
    specs = [parse_adapter_spec(a) for a in adapters]
    if not specs:
        raise InputError("no adapter to merge: give at least one --adapter DIR[:WEIGHT]")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"output already exists: {out} (choose a new folder)")
    files.check_output_dir(out)
    outtype = outtype.lower()
    if gguf and outtype not in OUTTYPES:
        raise InputError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    from .bases import resolve_path

    base_dir = check_base_folder(resolve_path(base, what="base model"))
    if out.resolve() == base_dir.resolve():
        raise InputError(f"the output folder is the base model folder: {out}")
    base_config = _read_json(base_dir / "config.json")
    for spec in specs:  # cheap checks first: folders, configs, weight files, recorded base
        if out.resolve() == spec.path.resolve():
            raise InputError(f"the output folder is an adapter folder: {out}")
        _check_recorded_base(spec, _adapter_config(spec.path), base_dir, base_config)

    with quiet_hf_progress():
        model, _ = load_base(base_dir)
    cfgs = [check_adapter(s, base_dir, base_config, model) for s in specs]
    tokenizer, tok_source = _pick_tokenizer(specs, base_dir, model.get_input_embeddings().weight.shape[0])
    if getattr(tokenizer, "chat_template", None):
        prepare_chat(model, tokenizer)  # eos / pad ids of the config follow the tokenizer (no resize)

    if len(specs) > 1 or specs[0].weight != 1:
        for spec, cfg in zip(specs, cfgs, strict=True):
            for key in ("use_dora", "modules_to_save", "trainable_token_indices"):
                if cfg.get(key):
                    raise InputError(
                        f"adapter {spec.path}: {key} cannot be weighted or combined; "
                        "merge it alone with weight 1"
                    )
    with quiet_hf_progress():
        merged, combination, rank = _peft_merge(model, specs, cfgs)

    if dtype == "auto":
        name = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
        dtype = name if name in DTYPES else "float32"
    merged = merged.to(getattr(torch, dtype))
    n_params = count_params(merged)

    gguf_path = None
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        with quiet_hf_progress():
            merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report = {
            "kind": "merge",
            "base": str(base_dir.resolve()),
            "adapters": [
                {"path": str(s.path.resolve()), "weight": s.weight, "r": c["r"], "alpha": c.get("lora_alpha")}
                for s, c in zip(specs, cfgs, strict=True)
            ],
            "combination": combination,
            "rank": rank,
            "dtype": dtype,
            "tokenizer_from": str(tok_source.resolve()),
        }
        if gguf:
            from .convert import convert

            gguf_name = f"{out.name}-{outtype.upper()}.gguf"
            convert(tmp, tmp / gguf_name, outtype=outtype, name=out.name)
            report["gguf"] = gguf_name
            gguf_path = out / gguf_name
        (tmp / "merge.json").write_text(json.dumps(report, indent=2) + "\n")

    seconds = time.perf_counter() - t0
    log.info("merged %d adapter(s) into %s (%s, rank %d): %s", len(specs), base_dir, combination, rank, out)
    return MergeResult(
        out_dir=out, base=base_dir, adapters=specs, combination=combination, rank=rank, n_params=n_params,
        gguf=gguf_path, seconds=seconds,
    )  # fmt: skip


def _peft_merge(model: Any, specs: list[AdapterSpec], cfgs: list[dict[str, Any]]) -> tuple[Any, str, int]:
    """PEFT does the arithmetic: see the module docstring for the choice of method."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"adapter{i}" for i in range(len(specs))]
    try:
        peft_model = PeftModel.from_pretrained(model, str(specs[0].path), adapter_name=names[0])
        for spec, name in zip(specs[1:], names[1:], strict=True):
            peft_model.load_adapter(str(spec.path), adapter_name=name)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise ModelError(f"PEFT cannot load the adapters onto the base: {e}") from None

    ranks = [max([int(c["r"]), *(int(v) for v in (c.get("rank_pattern") or {}).values())]) for c in cfgs]
    if len(specs) == 1:
        if specs[0].weight != 1:
            for module in peft_model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(names[0], specs[0].weight)
            combination = "scaled"
        else:
            combination = "merge_and_unload"
        return peft_model.merge_and_unload(), combination, ranks[0]

    combined = "combined"
    try:
        peft_model.add_weighted_adapter(names, [s.weight for s in specs], combined, combination_type="cat")
    except (ValueError, TypeError) as e:
        raise ModelError(f"PEFT cannot combine the adapters: {e}") from None
    peft_model.set_adapter(combined)
    for module in peft_model.modules():
        # the combined adapter carries its weights in A, so its own scale must be 1: with use_rslora copied
        # from the first adapter's config PEFT would make it sqrt(r) instead
        if isinstance(module, LoraLayer) and combined in module.scaling and module.scaling[combined] != 1:
            module.set_scale(combined, 1.0 / (module.scaling[combined]))
    return peft_model.merge_and_unload(adapter_names=[combined]), "cat", sum(ranks)
