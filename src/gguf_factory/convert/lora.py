"""The ``convert-lora`` verb: a PEFT LoRA adapter folder -> a GGUF LoRA adapter that llama.cpp applies at run
time (``llama_cpp.Llama(model_path=base.gguf, lora_path=adapter.gguf)``).

The GGUF adapter format (llama.cpp ``llama_adapter_lora_init``): ``general.type = "adapter"``,
``general.architecture`` equal to the base model's, ``adapter.type = "lora"`` and ``adapter.lora.alpha``;
for each adapted weight ``W`` of GGUF name ``N`` (e.g. ``blk.0.attn_q.weight``) two tensors ``N.lora_a``
(numpy shape ``[r, n_in]``, the PEFT ``lora_A`` layout) and ``N.lora_b`` (``[n_out, r]``, PEFT's
``lora_B``). llama.cpp adds ``scale * B @ A`` to ``W``'s product with ``scale = lora_scale * alpha / r``
(``r`` read from ``lora_b``), which is PEFT's ``lora_alpha / r``.

The base model's architecture converter (:mod:`gguf_factory.convert.archs`) supplies the tensor names and
the layout changes: a change that acts on the rows of a weight (LLaMA's Q/K rotary permutation, Gemma's
folded query scale) is applied to ``B``; GPT-2's ``Conv1D`` weights are transposed by the converter, and
PEFT already keeps their ``A``/``B`` in ``nn.Linear`` orientation, so they pass unchanged; fused tensors
(Phi-3's ``qkv_proj``/``gate_up_proj``) are adapted as one module in PEFT and in GGUF alike. Each pair is
then checked numerically: the converter's transform of the merged delta must equal ``B' @ A'``, so a
transform that does not factor through the pair is refused instead of silently mis-converted.

PEFT scaling that llama.cpp's single ``alpha`` cannot express per tensor (``use_rslora``, ``rank_pattern``,
``alpha_pattern``) is folded into ``B``. Not supported (refused by name): DoRA, ``modules_to_save``,
trainable tokens, LoRA biases, embedding LoRA and adapters of tensors the base model lacks or whose shapes
differ from it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .._version import __version__
from ..errors import ConversionError, InputError, ModelError
from ..files import atomic_path, check_output_path, require_dir
from . import FACTORY_VERSION_KEY, _read_config
from .archs import converter_for
from .base import ArchConverter, SafetensorsSource, TorchBinSource, WeightSource, open_weights

__all__ = ["LoraConvertResult", "LORA_OUTTYPES", "convert_lora"]

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
# BF16 is left out on purpose: llama.cpp 0.3.x (CPU) crashed applying a BF16 adapter in our tests.
LORA_OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {"f32": QT.F32, "f16": QT.F16}
FACTORY_BASE_KEY = "gguf_factory.lora.base_model"

# Keys of a saved PEFT LoRA: ``base_model.model.<module>.lora_A.weight`` (``lora_A.<adapter>.weight`` when
# saved without the adapter name removed).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
# Above this many elements per weight the numerical check of the transform is skipped (memory, time).
_CHECK_MAX_ELEMENTS = 1 << 24


@dataclass
class LoraConvertResult:
    path: Path
    arch: str
    outtype: str
    n_pairs: int  # adapted weights (each one lora_a + one lora_b tensor)
    ranks: list[int]  # distinct ranks
    alpha: float
    size_bytes: int
    seconds: float


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"not a PEFT adapter folder: {path} is missing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ConversionError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    refused = {
        "use_dora": "DoRA (use_dora=true) has no llama.cpp adapter equivalent",
        "modules_to_save": "modules_to_save (fully trained modules stored beside the LoRA) is not supported; "
        "merge the adapter and convert the merged model instead",
        "trainable_token_indices": "trainable token embeddings are not supported",
        "lora_bias": "LoRA biases (lora_bias=true) are not supported",
        "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    }
    for key, why in refused.items():
        if cfg.get(key):
            raise ConversionError(f"{path}: {why}")
    if cfg.get("r") is None or cfg.get("lora_alpha") is None:
        raise ModelError(f"{path} lacks r / lora_alpha")
    return cfg


def _open_adapter_weights(adapter_dir: Path) -> WeightSource:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        return SafetensorsSource([st])
    pt = adapter_dir / "adapter_model.bin"
    if pt.is_file():
        return TorchBinSource([pt])
    raise ModelError(f"no adapter weights in {adapter_dir}: expected adapter_model.safetensors")


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return float(value)
    return default


def _pairs(weights: WeightSource, where: Path) -> dict[str, dict[str, str]]:
    """``{module: {"A": key, "B": key}}`` from the adapter's tensor names; anything else is refused."""
    pairs: dict[str, dict[str, str]] = {}
    for key in weights.names():
        m = _KEY.match(key)
        if not m:
            what = "DoRA magnitude" if "lora_magnitude_vector" in key else "an unsupported"
            if "lora_embedding_" in key:
                what = "embedding LoRA (not supported)"
            raise ConversionError(f"{where}: tensor {key!r} is {what} tensor; only Linear LoRA A/B pairs")
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = key
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ConversionError(f"{where}: {module} has no {missing} tensor")
    if not pairs:
        raise ConversionError(f"{where}: no LoRA tensors")
    return pairs


def _layout(
    conv: ArchConverter,
    gguf_name: str,
    base_name: str,
    a: np.ndarray,
    b: np.ndarray,
    where: Path,
    fan_in_fan_out: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(A', B')`` in GGUF layout: the base converter's transform of ``W`` applied to the pair.

    Two layouts of the HF weight are possible: ``nn.Linear`` (``[out, in]``: row transforms go to ``B``)
    and GPT-2's ``Conv1D`` (``[in, out]``, transposed by the converter; PEFT then sets ``fan_in_fan_out``
    and keeps ``A``/``B`` Linear-shaped, so they pass as they are). Each candidate that fits the shapes
    is checked numerically against the converter's transform of the delta; the first that matches wins.
    """
    r, n_in = a.shape
    n_out = b.shape[0]
    hf_shape = tuple(conv.weights.shape(base_name))
    gguf_shape = tuple(conv.tensor_shape(gguf_name, base_name, hf_shape))
    if gguf_shape != (n_out, n_in) or hf_shape not in ((n_out, n_in), (n_in, n_out)):
        raise ConversionError(
            f"{where}: the adapter of {base_name} is {n_out}x{n_in} (lora_B {list(b.shape)}, lora_A "
            f"{list(a.shape)}) but the base model's weight is {list(hf_shape)}: "
            "the adapter was made for another base model"
        )
    candidates: list[tuple[str, np.ndarray, np.ndarray]] = []
    if hf_shape == (n_in, n_out) and fan_in_fan_out:
        candidates.append(("conv1d", a, b))
    if hf_shape == (n_out, n_in):
        b2 = conv.modify_tensor(gguf_name, base_name, b.copy())
        if b2.shape == b.shape:
            candidates.append(("linear", a, b2))
    if hf_shape == (n_in, n_out) and not fan_in_fan_out:
        candidates.append(("conv1d", a, b))
    if not candidates:
        raise ConversionError(
            f"cannot convert the adapter of {base_name}: the {conv.arch_name} converter changes this "
            "weight's shape, which a LoRA pair cannot follow"
        )
    if n_out * n_in > _CHECK_MAX_ELEMENTS:
        _, a2, b2 = candidates[0]
        return np.ascontiguousarray(a2, dtype=np.float32), np.ascontiguousarray(b2, dtype=np.float32)
    for kind, a2, b2 in candidates:
        delta = b @ a if kind == "linear" else (b @ a).T
        want = conv.modify_tensor(gguf_name, base_name, delta.copy())
        got = b2 @ a2
        tol = 1e-4 * max(1.0, float(np.abs(want).max()))
        if want.shape == got.shape and np.allclose(want, got, rtol=1e-4, atol=tol):
            return np.ascontiguousarray(a2, dtype=np.float32), np.ascontiguousarray(b2, dtype=np.float32)
    raise ConversionError(
        f"cannot convert the adapter of {base_name}: the {conv.arch_name} converter's transform of "
        "this weight does not factor through a LoRA pair"
    )


def convert_lora(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    base: str | Path,
    outtype: str = "f16",
    name: str | None = None,
) -> LoraConvertResult:
    """Convert the PEFT LoRA adapter in ``adapter_dir`` (``adapter_config.json`` +
    ``adapter_model.safetensors``) for the Hugging Face model ``base`` into a GGUF LoRA adapter.

    ``outtype``: f32 | f16 for the A/B tensors. The output loads with
    ``Llama(model_path=<base GGUF>, lora_path=out_path)`` (any GGUF of the same base model).
    """
    t0 = time.perf_counter()
    outtype = outtype.lower()
    if outtype not in LORA_OUTTYPES:
        raise InputError(f"unknown LoRA outtype {outtype!r}; choose one of {', '.join(LORA_OUTTYPES)}")
    qtype = LORA_OUTTYPES[outtype]
    out = check_output_path(out_path)
    adapter_dir = require_dir(adapter_dir, "adapter folder")
    cfg = _read_adapter_config(adapter_dir)
    from ..bases import resolve_path

    base_dir = resolve_path(base, what="base model")
    check_output_path(out, inputs=[adapter_dir, base, base_dir])  # never over (or inside) an input
    config = _read_config(base_dir)
    cls = converter_for(config, str(base_dir / "config.json"))
    where = adapter_dir / "adapter_model.safetensors"

    alpha = float(cfg["lora_alpha"])
    base_r = float(cfg["r"])
    rslora = bool(cfg.get("use_rslora"))
    tensors: list[tuple[str, np.ndarray]] = []
    ranks: set[int] = set()
    base_weights = open_weights(base_dir)
    adapter = _open_adapter_weights(adapter_dir)
    try:
        where = adapter.files[0]
        conv = cls(base_dir, config, base_weights, "f32")
        for module, ab in sorted(_pairs(adapter, where).items(), key=lambda kv: _natural(kv[0])):
            base_name = f"{module}.weight"
            if base_name not in base_weights:
                raise ConversionError(
                    f"{where}: the adapter adapts {module}, which the base model {base_dir} does not have "
                    "(an adapter for another model?)"
                )
            gguf_name = conv.map_tensor_name(base_name)
            if gguf_name is None:
                raise ConversionError(
                    f"{where}: the adapter adapts {module}, which llama.cpp's {conv.arch_name} does not "
                    "store (e.g. an lm_head tied to the embedding)"
                )
            a = adapter.load(ab["A"])
            b = adapter.load(ab["B"])
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ConversionError(
                    f"{where}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                    "are not a rank-r pair"
                )
            r = a.shape[0]
            # PEFT's scale for this module vs llama.cpp's (alpha / r, or 1 when alpha is 0): fold the ratio.
            m_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
            m_r = _pattern_value(cfg.get("rank_pattern"), module, base_r)
            if int(m_r) != r:
                raise ConversionError(f"{where}: {module} has rank {r}, adapter_config.json says {int(m_r)}")
            peft_scale = m_alpha / (math.sqrt(r) if rslora else r)
            ll_scale = alpha / r if alpha else 1.0
            a2, b2 = _layout(conv, gguf_name, base_name, a, b, where, bool(cfg.get("fan_in_fan_out")))
            if not math.isclose(peft_scale, ll_scale, rel_tol=1e-9):
                b2 = b2 * np.float32(peft_scale / ll_scale)
            tensors.append((f"{gguf_name}.lora_a", a2))
            tensors.append((f"{gguf_name}.lora_b", b2))
            ranks.add(r)
        arch_name = conv.arch_name
    finally:
        adapter.close()
        base_weights.close()

    name = name or adapter_dir.resolve().name
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_name(name)
            writer.add_basename(name)
            writer.add_quantized_by("gguf-factory")
            writer.add_string(FACTORY_BASE_KEY, base_dir.resolve().name)
            writer.add_string(FACTORY_VERSION_KEY, __version__)
            for tname, arr in tensors:
                writer.add_tensor(tname, arr if qtype == QT.F32 else arr.astype(np.float16))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    size = out.stat().st_size
    seconds = time.perf_counter() - t0
    log.info(
        "wrote %s (LoRA, %d tensors pairs, rank %s, %.1f s)", out, len(tensors) // 2, sorted(ranks), seconds
    )
    return LoraConvertResult(
        path=out,
        arch=arch_name,
        outtype=outtype,
        n_pairs=len(tensors) // 2,
        ranks=sorted(ranks),
        alpha=alpha,
        size_bytes=size,
        seconds=seconds,
    )


def _natural(name: str) -> list[Any]:
    """Sort key putting layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
