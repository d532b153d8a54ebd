"""The ``convert`` verb: a Hugging Face causal-LM folder -> one GGUF file (F32, F16, BF16 or Q8_0).

Dispatches on config.json ``architectures`` to a plug-in in :mod:`gguf_factory.convert.archs`. Tensors
are streamed: all tensor infos are declared from shapes, the header/key-values/infos written, then each
tensor is loaded (memory-mapped), converted, written and dropped. The file is written beside the
destination and renamed into place, so a failure leaves nothing at the final path.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from .. import __version__
from ..errors import ConversionError, InputError, ModelError
from ..files import atomic_path, check_output_path
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
    outtype: str
    arch: str
    n_tensors: int
    n_params: int
    size_bytes: int
    seconds: float


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
    hf_dir: str | Path, out_path: str | Path, *, outtype: str = "f16", name: str | None = None
) -> ConvertResult:
    """Convert a Hugging Face model folder (or any model source: :func:`gguf_factory.bases.resolve_path`)
    to a GGUF file at ``out_path``.

    ``outtype``: f32 | f16 | bf16 | q8_0 (1-D tensors such as norms always stay F32).
    ``name``: ``general.name`` (default: the folder name).
    """
    t0 = time.perf_counter()
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    out = check_output_path(out_path)
    model_dir = Path(hf_dir)
    if not model_dir.is_dir():  # a GGUF, a named base or a Hub id: the HF folder it leads to
        from ..bases import resolve_path

        model_dir = resolve_path(hf_dir)
    check_output_path(out, inputs=[model_dir])  # never over (or inside) the model it reads
    config = _read_config(model_dir)
    cls = converter_for(config, str(model_dir / "config.json"))
    weights = open_weights(model_dir)
    try:
        conv = cls(model_dir, config, weights, outtype)
        plan = conv.tensor_plan()
        vocab = load_vocab(model_dir, config, conv.vocab_rows(plan))
        n_params = sum(p.n_elements for p in plan)
        name = name or model_dir.resolve().name
        with atomic_path(out) as tmp:
            _write_gguf(tmp, conv, plan, vocab, model_dir, config, name, n_params)
    finally:
        weights.close()
    size = out.stat().st_size
    seconds = time.perf_counter() - t0
    log.info("wrote %s (%s, %d tensors, %.1f MB, %.1f s)", out, outtype, len(plan), size / 1e6, seconds)
    return ConvertResult(
        path=out,
        outtype=outtype,
        arch=conv.arch_name,
        n_tensors=len(plan),
        n_params=n_params,
        size_bytes=size,
        seconds=seconds,
    )


def _write_gguf(
    tmp: Path,
    conv: ArchConverter,
    plan: list[PlannedTensor],
    vocab: Vocab,
    model_dir: Path,
    config: dict[str, Any],
    name: str,
    n_params: int,
) -> None:
    writer = _Writer(tmp, conv.arch_name)
    try:
        _write_metadata(writer, model_dir, config, name, n_params, conv)
        conv.set_gguf_parameters(writer)
        writer.add_vocab_size(len(vocab.tokens))
        vocab.write(writer)
        for p in plan:
            writer.add_tensor_info(p.name, p.shape, _info_dtype(p), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:
            writer.write_tensor_chunks(p.chunks(), p.nbytes)
    finally:
        writer.close()


# numpy dtypes of GGUF array element types (for packing long arrays such as the token list in one go)
_ARRAY_DTYPES: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "u1",
    gguf.GGUFValueType.INT8: "i1",
    gguf.GGUFValueType.UINT16: "u2",
    gguf.GGUFValueType.INT16: "i2",
    gguf.GGUFValueType.UINT32: "u4",
    gguf.GGUFValueType.INT32: "i4",
    gguf.GGUFValueType.UINT64: "u8",
    gguf.GGUFValueType.INT64: "i8",
    gguf.GGUFValueType.FLOAT32: "f4",
    gguf.GGUFValueType.FLOAT64: "f8",
}


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer with two additions for large models: arrays of numbers or strings are packed in
    one go (a 256 k-token vocabulary takes milliseconds instead of seconds; the bytes are the same), and a
    tensor's data can be written in chunks (``write_tensor_chunks``) so it never sits in memory whole."""

    def _pack_val(
        self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: gguf.GGUFValueType | None = None
    ) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or isinstance(val, bytes) or len(val) < 64:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        if sub_type is None and any(type(v) is not type(val[0]) for v in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)  # mixed: gguf-py's own error
        ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        if ltype == gguf.GGUFValueType.STRING:
            if not all(isinstance(v, str | bytes) for v in val):
                raise ValueError("All items in a GGUF array should be of the same type")
            enc = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            size = struct.Struct(order + "Q").pack
            body = b"".join(size(len(e)) + e for e in enc)
        elif ltype in _ARRAY_DTYPES:
            body = np.asarray(val, dtype=order + _ARRAY_DTYPES[ltype]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = self._pack("I", vtype) if add_vtype else b""
        return head + self._pack("I", ltype) + self._pack("Q", len(val)) + body

    def write_tensor_chunks(self, chunks: Iterator[np.ndarray], nbytes: int) -> None:
        """Write the next tensor's data from ``chunks`` (C-ordered pieces that total ``nbytes``)."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
            raise ValueError(f"Expected output file to contain tensor info or weights, got {self.state}")
        assert self.fout is not None and len(self.fout) == 1
        fout = self.fout[0]
        self.tensors[0].pop(next(iter(self.tensors[0])))
        self.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks:
            if self.endianess != gguf.GGUFEndian.LITTLE:
                chunk = chunk.byteswap(inplace=False)
            fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            written += chunk.nbytes
        if written != nbytes:
            raise ConversionError(f"wrote {written} bytes of tensor data, expected {nbytes}")
        self.write_padding(fout, nbytes)
        self.state = WriterState.WEIGHTS


def _info_dtype(p: PlannedTensor) -> Any:
    # Any non-uint8 dtype makes GGUFWriter take ``shape`` as the logical (element) shape.
    return np.float16 if p.qtype == gguf.GGMLQuantizationType.F16 else np.float32
