"""The ``convert`` verb: a Hugging Face causal-LM folder -> one GGUF file (F32, F16, BF16 or Q8_0).

Dispatches on config.json ``architectures`` to a plug-in in :mod:`gguf_factory.convert.archs`. Tensors
are streamed: all tensor infos are declared from shapes, the header/key-values/infos written, then each
tensor is loaded (memory-mapped), converted, written and dropped. The file is written beside the
destination and renamed into place, so a failure leaves nothing at the final path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .._version import __version__
from ..errors import InputError, ModelError
from ..files import check_output_path
from ..gguf_writer import StreamingWriter, split_limits, write_gguf
from ..splitset import output_prefix
from .archs import converter_for, supported_architectures
from .base import OUTTYPES, ArchConverter, PlannedTensor, open_weights
from .vocab import Vocab, load_vocab

__all__ = ["ConvertResult", "convert", "supported_architectures", "OUTTYPES", "ArchConverter"]

log = logging.getLogger(__name__)

FACTORY_VERSION_KEY = "gguf_factory.version"
FACTORY_SOURCE_KEY = "gguf_factory.source_model"


@dataclass
class ConvertResult:
    path: Path
    """The GGUF written: the file, or the first part of a split set (what llama.cpp loads)."""
    outtype: str
    arch: str
    n_tensors: int
    n_params: int
    size_bytes: int
    """All parts together."""
    seconds: float
    parts: list[Path] = field(default_factory=list)
    """Every file written, first part first (``[path]`` when not split)."""


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.exists():
        raise ModelError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelError(f"not a folder: {model_dir} (expected a Hugging Face model folder)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"not a Hugging Face model folder: {cfg_path} is missing")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path} is not a JSON object")
    return config


def _readme_license(model_dir: Path) -> str | None:
    """``license:`` from the model card's YAML front matter, if any."""
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return None
    from ..schema import safe_yaml

    try:
        meta = safe_yaml(m.group(1), readme)  # a model card is input from anywhere: bounded
    except InputError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def _source_model(model_dir: Path, config: dict[str, Any]) -> tuple[str, str | None]:
    """(source model name, Hugging Face repo URL if the config names a hub id rather than a local path)."""
    ref = config.get("_name_or_path")
    if isinstance(ref, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not Path(ref).exists():
        return ref, f"https://huggingface.co/{ref}"
    return model_dir.resolve().name, None


def _write_metadata(
    writer: gguf.GGUFWriter,
    model_dir: Path,
    config: dict[str, Any],
    name: str,
    n_params: int,
    conv: ArchConverter,
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_basename(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    writer.add_file_type(conv.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_quantized_by("gguf-factory")
    lic = config.get("license") or _readme_license(model_dir)
    if lic:
        writer.add_license(str(lic))
    source, repo_url = _source_model(model_dir, config)
    if repo_url:
        writer.add_source_repo_url(repo_url)
    writer.add_string(FACTORY_SOURCE_KEY, source)
    writer.add_string(FACTORY_VERSION_KEY, __version__)


def convert(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "f16",
    name: str | None = None,
    split_max_size: int | str | None = None,
    split_max_tensors: int | None = None,
) -> ConvertResult:
    """Convert a Hugging Face model folder (or any model source: :func:`gguf_factory.bases.resolve_path`)
    to a GGUF file at ``out_path``.

    ``outtype``: f32 | f16 | bf16 | q8_0 (1-D tensors such as norms always stay F32).
    ``name``: ``general.name`` (default: the folder name).
    ``split_max_size`` (``2G``, bytes of tensor data per part) / ``split_max_tensors`` (tensors per part):
    write llama.cpp's split layout, ``<out_path less .gguf>-00001-of-0000N.gguf`` ... with the ``split.*``
    keys (gguf-py's own splitting); llama.cpp loads the set from its first part. A model that fits in one
    part is written as one file at ``out_path``.
    """
    t0 = time.perf_counter()
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    max_size, max_tensors = split_limits(split_max_size, split_max_tensors)
    out = check_output_path(out_path)
    model_dir = Path(hf_dir)
    if not model_dir.is_dir():  # a GGUF, a named base or a Hub id: the HF folder it leads to
        from ..bases import resolve_path

        model_dir = resolve_path(hf_dir)
    check_output_path(out, inputs=[model_dir])  # never over (or inside) the model it reads
    if max_size or max_tensors:  # the parts are named from the prefix: it may not lie inside the model
        check_output_path(f"{os.fspath(output_prefix(out))}-00001-of-00002.gguf", inputs=[model_dir])
    config = _read_config(model_dir)
    cls = converter_for(config, str(model_dir / "config.json"))
    weights = open_weights(model_dir)
    try:
        conv = cls(model_dir, config, weights, outtype)
        plan = conv.tensor_plan()
        vocab = load_vocab(model_dir, config, conv.vocab_rows(plan))
        n_params = sum(p.n_elements for p in plan)
        name = name or model_dir.resolve().name
        writer = StreamingWriter(None, conv.arch_name, split_max_tensors=max_tensors, split_max_size=max_size)
        _declare(writer, conv, plan, vocab, model_dir, config, name, n_params)

        def data(w: StreamingWriter) -> None:
            for p in plan:
                w.write_tensor_chunks(p.chunks(), p.nbytes)

        parts = write_gguf(writer, out, data, inputs=[model_dir])
    finally:
        weights.close()
    size = sum(p.stat().st_size for p in parts)
    seconds = time.perf_counter() - t0
    where = parts[0] if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"
    log.info("wrote %s (%s, %d tensors, %.1f MB, %.1f s)", where, outtype, len(plan), size / 1e6, seconds)
    return ConvertResult(
        path=parts[0],
        outtype=outtype,
        arch=conv.arch_name,
        n_tensors=len(plan),
        n_params=n_params,
        size_bytes=size,
        seconds=seconds,
        parts=parts,
    )


def _declare(
    writer: StreamingWriter,
    conv: ArchConverter,
    plan: list[PlannedTensor],
    vocab: Vocab,
    model_dir: Path,
    config: dict[str, Any],
    name: str,
    n_params: int,
) -> None:
    """Every key/value and tensor info: what the header of each part holds."""
    _write_metadata(writer, model_dir, config, name, n_params, conv)
    conv.set_gguf_parameters(writer)
    writer.add_vocab_size(len(vocab.tokens))
    vocab.write(writer)
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, _info_dtype(p), p.nbytes, raw_dtype=p.qtype)


_Writer = StreamingWriter  # the name this module used before the writer moved to gguf_writer


def _info_dtype(p: PlannedTensor) -> Any:
    # Any non-uint8 dtype makes GGUFWriter take ``shape`` as the logical (element) shape.
    return np.float16 if p.qtype == gguf.GGMLQuantizationType.F16 else np.float32
