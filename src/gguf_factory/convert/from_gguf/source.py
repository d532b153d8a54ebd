"""A GGUF opened for rebuilding a checkpoint: typed key/values and dequantized tensors, nothing trusted.

The header is parsed by :mod:`gguf_factory.doctor.reader` (every count and length checked against the file
size before anything is allocated). On top of that, every tensor is checked before any data is read: a
known type that gguf-py can dequantize, a row length that is a whole number of blocks, a data range inside
the file, a unique name. Values are read with their expected GGUF type (an integer key that holds a string
is an error naming the file and the key). Tensor data is dequantized with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...doctor.reader import GGUFFile, GGUFFormatError, TensorInfo, read_gguf, tensor_data
from ...errors import ModelError

log = logging.getLogger(__name__)

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

_INT_TYPES = frozenset({VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64})
_FLOAT_TYPES = frozenset({VT.FLOAT32, VT.FLOAT64})
# Tensor types gguf-py cannot dequantize (or that hold integers, not weights).
_NOT_WEIGHTS = frozenset({QT.I8, QT.I16, QT.I32, QT.I64, QT.F64, QT.Q8_1, QT.Q8_K})


class GGUFSource:
    """Key/values and tensors of one GGUF file, checked for what a checkpoint rebuild needs."""

    def __init__(self, path: Path, g: GGUFFile):
        self.path = path
        self.g = g
        self.arch: str = self.string(gguf.Keys.General.ARCHITECTURE)
        self.tensors: dict[str, TensorInfo] = {}
        for t in g.tensors:
            self._check_tensor(t)
            self.tensors[t.name] = t

    @classmethod
    def open(cls, path: str | Path) -> GGUFSource:
        p = Path(path)
        if not p.exists():
            raise ModelError(f"GGUF file not found: {p}")
        if not p.is_file():
            raise ModelError(f"not a file: {p} (expected a .gguf file)")
        try:
            g = read_gguf(p)
        except GGUFFormatError as e:
            raise ModelError(f"not a readable GGUF: {e}") from None
        if g.byte_order != "<":
            raise ModelError(f"{p} is a big-endian GGUF; only little-endian files can be rebuilt")
        if g.issues:  # duplicate keys, bad alignment, text that is not UTF-8...: llama.cpp would not load it
            raise ModelError(f"{p}: {g.issues[0].message}")
        gtype = g.get(gguf.Keys.General.TYPE)
        if isinstance(gtype, str) and gtype != gguf.GGUFType.MODEL:
            raise ModelError(f"{p} is a GGUF {gtype!r} (general.type), not a model")
        return cls(p, g)

    # ---- key/values -----------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self.g.metadata

    def _entry(self, key: str, required: bool) -> Any:
        kv = self.g.metadata.get(key)
        if kv is None and required:
            raise ModelError(f"{self.path} lacks the key {key}")
        return kv

    def _bad(self, key: str, kv: Any, expected: str) -> ModelError:
        return ModelError(f"{self.path}: {key} is {kv.type_name} {_short(kv.value)}, expected {expected}")

    def string(self, key: str, default: Any = ...) -> Any:
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type != VT.STRING:
            raise self._bad(key, kv, "a string")
        return str(kv.value)

    def integer(self, key: str, default: Any = ...) -> Any:
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type not in _INT_TYPES:
            raise self._bad(key, kv, "an integer")
        return int(kv.value)

    def number(self, key: str, default: Any = ...) -> Any:
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type not in _INT_TYPES | _FLOAT_TYPES:
            raise self._bad(key, kv, "a number")
        value = float(kv.value)
        if not np.isfinite(value):
            raise self._bad(key, kv, "a finite number")
        if kv.type == VT.FLOAT32:  # the shortest decimal that is this float32 (1e-05, not 9.99999974e-06)
            value = float(str(np.float32(value)))
        return value

    def boolean(self, key: str, default: Any = ...) -> Any:
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type != VT.BOOL:
            raise self._bad(key, kv, "a boolean")
        return bool(kv.value)

    def strings(self, key: str, default: Any = ...) -> Any:
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type != VT.ARRAY or kv.subtype != VT.STRING:
            raise self._bad(key, kv, "an array of strings")
        return list(kv.value)

    def array(self, key: str, kinds: frozenset[gguf.GGUFValueType], default: Any = ...) -> Any:
        """A numeric array (numpy) whose element type is one of ``kinds``."""
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type != VT.ARRAY or kv.subtype not in kinds:
            names = "/".join(sorted(k.name for k in kinds))
            raise self._bad(key, kv, f"an array of {names}")
        return np.asarray(kv.value)

    def int_or_ints(self, key: str, default: Any = ...) -> Any:
        """An integer key that llama.cpp also accepts as one value per layer (e.g. head counts): the value,
        or the per-layer list when its values differ."""
        kv = self._entry(key, default is ...)
        if kv is None:
            return default
        if kv.type == VT.ARRAY and kv.subtype in _INT_TYPES:
            values = [int(v) for v in kv.value]
            if values and len(set(values)) == 1:
                return values[0]
            return values
        return self.integer(key)

    def arch_key(self, template: str) -> str:
        """An architecture key such as ``gguf.Keys.LLM.CONTEXT_LENGTH`` for this file's architecture."""
        return template.format(arch=self.arch)

    # ---- tensors --------------------------------------------------------------------------------

    def _check_tensor(self, t: TensorInfo) -> None:
        where = f"{self.path}: tensor {t.name!r}"
        if t.name in self.tensors:
            raise ModelError(f"{where} appears twice")
        qt = t.type
        if qt is None:
            raise ModelError(f"{where} has unknown type {t.raw_type}")
        if qt in _NOT_WEIGHTS:
            raise ModelError(f"{where} has type {qt.name}, which cannot be dequantized to weights")
        if not t.dims or any(d <= 0 for d in t.dims):
            raise ModelError(f"{where} has an empty shape {list(t.shape)}")
        nbytes = t.n_bytes
        if nbytes is None:
            block = gguf.GGML_QUANT_SIZES[qt][0]
            raise ModelError(f"{where}: rows of {t.dims[0]} values are not whole {qt.name} blocks of {block}")
        part = self.g.part_of(t)  # a split set: the part holding it
        start = part.data_offset + t.offset
        if t.offset % part.alignment or start + nbytes > part.file_size:
            raise ModelError(
                f"{where}: its {nbytes} bytes at offset {t.offset} of the data section lie outside the "
                f"{part.file_size}-byte file {part.path.name} (truncated or corrupt)"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order (outermost first), as transformers wants it."""
        return self.tensors[name].shape

    def type_name(self, name: str) -> str:
        return self.tensors[name].type_name

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.type_name for t in self.tensors.values()).most_common())

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized by gguf-py to float32, in numpy order."""
        t = self.tensors[name]
        raw = tensor_data(self.g, t)
        if raw is None:  # unreachable after _check_tensor
            raise ModelError(f"{self.path}: tensor {name!r} has no readable data")
        qt = t.type
        assert qt is not None
        rows = t.n_elements // t.dims[0]
        try:
            data = gguf.quants.dequantize(np.asarray(raw).reshape(rows, -1), qt)
        except (NotImplementedError, ValueError) as e:
            raise ModelError(f"{self.path}: cannot dequantize tensor {name!r} ({qt.name}): {e}") from None
        out = data.astype(np.float32, copy=False).reshape(t.shape)
        if np.may_share_memory(out, raw):  # F32 is a view of the read-only file mapping
            out = out.copy()
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise ModelError(f"{self.path}: tensor {name!r} has {bad} NaN or infinite values")
        return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
