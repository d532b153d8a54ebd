"""The bounded GGUF header scan: scalar metadata and the tensor table of a GGUF, arrays skipped.

A module of its own, below everything that reads GGUF headers (the runtime, quantize, verify, serve):
it imports nothing of the package but its errors.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["MAX_ARRAY_NESTING", "scan_gguf_bytes", "scan_gguf_header"]

MAX_ARRAY_NESTING = 8  # arrays of arrays of ...: deeper is refused (the doctor's reader allows 4)
# GGUF value type id -> struct format of a scalar (8 = string, 9 = array are handled apart).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def scan_gguf_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[tuple[str, int, list[int]]]]:
    """Scalar metadata (arrays skipped) and (name, ggml type id, dims) of every tensor of a GGUF.

    Reads only the header, skipping array contents without decoding them: a 262 k-token vocabulary costs
    a few hundred milliseconds here, where gguf-py's full reader builds every string.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return scan_gguf_bytes(mm, str(p))
    except (OSError, ValueError) as e:  # cannot open or map it (a folder, an empty file, ...)
        raise InputError(f"cannot read the GGUF header of {p}: {e}") from None


def scan_gguf_bytes(
    data: Any, name: str = "<bytes>"
) -> tuple[dict[str, Any], list[tuple[str, int, list[int]]]]:
    """:func:`scan_gguf_header` over a buffer (bytes or a memory map). Raises only :class:`InputError`
    for a file's content: nesting is capped, every count is checked against the size."""
    try:
        return _scan(data)
    except (struct.error, ValueError, UnicodeDecodeError, IndexError, OverflowError) as e:
        raise InputError(f"cannot read the GGUF header of {name}: {e}") from None


def _scan(mm: Any) -> tuple[dict[str, Any], list[tuple[str, int, list[int]]]]:
    if mm[:4] != b"GGUF":
        raise ValueError(f"bad magic {bytes(mm[:4])!r}")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    size = len(mm)
    if n_tensors > size or n_kv > size:
        raise ValueError("implausible tensor or metadata count")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", mm, pos)
        if pos + 8 + n > size:
            raise ValueError("string runs past the end of the file")
        text = mm[pos + 8 : pos + 8 + n].decode("utf-8")
        pos += 8 + n
        return text

    def skip_array(depth: int = 0) -> None:
        nonlocal pos
        if depth >= MAX_ARRAY_NESTING:  # llama.cpp accepts no nesting at all: a few levels are plenty
            raise ValueError(f"arrays nested more than {MAX_ARRAY_NESTING} deep")
        item_type, count = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        if count > size:
            raise ValueError(f"an array claims {count} items, more than the file's {size} bytes")
        if item_type == 8:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", mm, pos)
                pos += 8 + n
                if pos > size:
                    raise ValueError("array runs past the end of the file")
        elif item_type == 9:
            for _ in range(count):
                skip_array(depth + 1)
                if pos > size:
                    raise ValueError("array runs past the end of the file")
        elif item_type in _GGUF_SCALARS:
            pos += count * struct.calcsize("<" + _GGUF_SCALARS[item_type])
        else:
            raise ValueError(f"unknown array item type {item_type}")
        if pos > size:
            raise ValueError("array runs past the end of the file")

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", mm, pos)
        pos += 4
        if vtype == 8:
            meta[key] = string()
        elif vtype == 9:
            skip_array()
        elif vtype in _GGUF_SCALARS:
            fmt = "<" + _GGUF_SCALARS[vtype]
            (meta[key],) = struct.unpack_from(fmt, mm, pos)
            pos += struct.calcsize(fmt)
        else:
            raise ValueError(f"metadata {key!r} has unknown value type {vtype}")
    tensors = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", mm, pos)
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
        dims = list(struct.unpack_from(f"<{n_dims}Q", mm, pos + 4))
        type_id, _offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append((name, int(type_id), [int(d) for d in dims]))
    return meta, tensors
