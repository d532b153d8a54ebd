"""A GGUF reader that hostile files cannot hurt.

Every count and length read from the file is checked against the bytes left before anything is
allocated or skipped; nesting is capped; the work is linear in the file size. Problems that make the rest
of the file unreadable raise :class:`GGUFFormatError` (with a stable ``code``); problems that leave the
layout readable (a duplicate key, an unknown tensor type, five dimensions...) are recorded as
:class:`ReadIssue` objects on the result so that ``validate`` can report them all at once.

The file is memory-mapped read-only: reading the header never copies more than the header itself.
Numeric constants (magic, value and tensor types, block sizes, key names) come from gguf-py.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import FactoryError
from ..splitset import SplitSetError, check_part, check_tensor_count, set_paths, split_count

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

# Byte sizes and struct codes of the scalar value types (the spec's encoding of each gguf-py enum member).
SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.BOOL: "?",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}
SCALAR_DTYPES: dict[gguf.GGUFValueType, str] = {
    VT.UINT8: "u1",
    VT.INT8: "i1",
    VT.UINT16: "u2",
    VT.INT16: "i2",
    VT.UINT32: "u4",
    VT.INT32: "i4",
    VT.FLOAT32: "f4",
    VT.BOOL: "u1",
    VT.UINT64: "u8",
    VT.INT64: "i8",
    VT.FLOAT64: "f8",
}
SUPPORTED_VERSIONS = (2, 3)
MAX_NESTING = 4  # arrays of arrays: llama.cpp accepts none; we parse a few levels to report them
GGML_MAX_DIMS = 4  # ggml.h (gguf-py does not export it)
GGML_MAX_NAME = 64  # ggml.h: tensor names are at most 63 bytes
MIN_KV_BYTES = 8 + 4 + 1  # key length + value type + the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims (may be 0), type, offset


class GGUFFormatError(FactoryError):
    """The file is not a readable GGUF; ``code`` names the defect, ``offset`` where it was found."""

    def __init__(self, code: str, message: str, offset: int | None = None):
        super().__init__(message)
        self.code = code
        self.offset = offset


@dataclass(frozen=True)
class ReadIssue:
    """A defect found while reading that does not stop the reader."""

    code: str
    message: str
    offset: int | None = None
    subject: str | None = None  # key or tensor name
    more: int = 0  # a summary: this many more issues of the code were left out


MAX_ISSUES_PER_CODE = 20
"""A crafted header can repeat one defect a million times: the first ones are kept, the rest counted."""


class CappedIssues(list[ReadIssue]):
    """A list that keeps the first :data:`MAX_ISSUES_PER_CODE` issues of each code and counts the rest;
    :meth:`finish` appends one summary issue per code that overflowed."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def append(self, issue: ReadIssue) -> None:
        n = self.counts.get(issue.code, 0) + 1
        self.counts[issue.code] = n
        if n <= MAX_ISSUES_PER_CODE:
            super().append(issue)

    def finish(self) -> list[ReadIssue]:
        for code, n in self.counts.items():
            if n > MAX_ISSUES_PER_CODE:
                more = n - MAX_ISSUES_PER_CODE
                msg = f"... and {more} more {code} issue(s) of the same kind"
                super().append(ReadIssue(code, msg, more=more))
        return list(self)


@dataclass
class KVEntry:
    key: str
    type: gguf.GGUFValueType
    value: Any  # int | float | bool | str | list[str] | np.ndarray | list (nested arrays)
    offset: int  # where the key/value pair starts in the file
    subtype: gguf.GGUFValueType | None = None  # element type of an array
    count: int = 1  # number of elements of an array

    @property
    def type_name(self) -> str:
        if self.type == VT.ARRAY and self.subtype is not None:
            return f"ARRAY[{self.subtype.name}]"
        return self.type.name


KNOWN_TYPES: dict[int, gguf.GGMLQuantizationType] = {int(q): q for q in QT if q in gguf.GGML_QUANT_SIZES}


@dataclass(slots=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: ne[0] (the row length) first
    raw_type: int
    offset: int  # relative to the data section (of its part's file)
    info_offset: int  # where this tensor info starts in the file (its part's)
    index: int
    part: int = 0  # the part of a split set holding it (0: the first part, or a file that is not split)

    @property
    def type(self) -> gguf.GGMLQuantizationType | None:
        return KNOWN_TYPES.get(self.raw_type)

    @property
    def type_name(self) -> str:
        t = self.type
        return t.name if t is not None else f"unknown({self.raw_type})"

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first), as gguf-py and PyTorch show it."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        """Size of the data, or None when the type is unknown or the row length is not a block multiple."""
        t = KNOWN_TYPES.get(self.raw_type)
        if t is None or not self.dims:
            return None if t is None else gguf.GGML_QUANT_SIZES[t][1]
        block, type_size = gguf.GGML_QUANT_SIZES[t]
        if self.dims[0] % block:
            return None
        return self.n_elements // block * type_size


@dataclass
class GGUFFile:
    """Everything in a GGUF except the tensor data (read that with :func:`tensor_rows`)."""

    path: Path
    file_size: int
    version: int
    byte_order: str  # "<" or ">"
    tensor_count: int
    kv_count: int
    kvs: list[KVEntry]
    tensors: list[TensorInfo]
    alignment: int
    header_end: int  # end of the tensor infos
    data_offset: int  # start of the data section (header_end padded to the alignment)
    issues: list[ReadIssue] = field(default_factory=list)
    parts: list[GGUFFile] = field(default_factory=list)
    """A split set (read from its first part): every part, each as read alone (its own header, tensors,
    size and data section); this object is then the whole set: the first part's key/values, the tensors
    of all parts (``TensorInfo.part`` says where each lies), and ``path``, ``file_size``, ``data_offset``
    those of the first part. Empty for a file that is not split."""

    @property
    def total_size(self) -> int:
        """Bytes of the file, every part of a split set included."""
        return sum(p.file_size for p in self.parts) if self.parts else self.file_size

    @property
    def paths(self) -> list[Path]:
        """The file, or every part of a split set, first part first."""
        return [p.path for p in self.parts] if self.parts else [self.path]

    def part_of(self, t: TensorInfo) -> GGUFFile:
        """The file that holds ``t``'s data (its header, offsets and size apply to ``t``)."""
        return self.parts[t.part] if self.parts else self

    @functools.cached_property
    def metadata(self) -> dict[str, KVEntry]:
        """First occurrence of each key (duplicates are reported as issues)."""
        out: dict[str, KVEntry] = {}
        for kv in self.kvs:
            out.setdefault(kv.key, kv)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.metadata.get(key)
        return default if kv is None else kv.value

    @property
    def metadata_values(self) -> dict[str, Any]:
        """Key -> value (first occurrence)."""
        return {k: kv.value for k, kv in self.metadata.items()}

    @property
    def architecture(self) -> str | None:
        v = self.get(gguf.Keys.General.ARCHITECTURE)
        return v if isinstance(v, str) else None

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @functools.cached_property
    def file_map(self) -> np.ndarray:
        """The whole file as one read-only uint8 array over a memory map (one mapping for every tensor's
        data; slicing it reads nothing until the slice is used)."""
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mm, dtype=np.uint8, count=min(self.file_size, len(mm)))


def pad(n: int, align: int) -> int:
    return n + (-n % align)


class _Cursor:
    """Bounded reads over a memory map; every read checks the bytes left first."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, path: Path):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path
        self.bo = "<"

    @property
    def left(self) -> int:
        return self.size - self.pos

    def fail(self, code: str, what: str, offset: int | None = None) -> GGUFFormatError:
        at = self.pos if offset is None else offset
        return GGUFFormatError(code, f"{self.path}: {what} (at byte {at})", at)

    def need(self, n: int, what: str, code: str = "header-truncated") -> None:
        if n > self.left:
            raise self.fail(code, f"file ends inside {what}: needs {n} bytes, {self.left} left")

    def scalar(self, vtype: gguf.GGUFValueType, what: str) -> Any:
        fmt = self.bo + SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        if vtype == VT.BOOL:
            v = bool(v)
        return v

    def u32(self, what: str) -> int:
        return int(self.scalar(VT.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(VT.UINT64, what))

    def string(self, what: str) -> tuple[str, bool]:
        """(text, valid utf-8) — the length is checked against the file before any bytes are taken."""
        start = self.pos
        n = self.u64(f"the length of {what}")
        if n > self.left:
            code = "header-truncated" if n <= self.size else "string-length-too-large"
            raise self.fail(code, f"{what} claims {n} bytes but only {self.left} are left in the file", start)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), False


def _value_type(raw: int, cur: _Cursor, what: str, offset: int) -> gguf.GGUFValueType:
    try:
        return VT(raw)
    except ValueError:
        raise cur.fail("kv-bad-type", f"{what} has unknown value type {raw}", offset) from None


def _min_size(vtype: gguf.GGUFValueType) -> int:
    if vtype == VT.STRING:
        return 8
    if vtype == VT.ARRAY:
        return 12
    return struct.calcsize(SCALAR_FORMATS[vtype])


def _read_value(
    cur: _Cursor, vtype: gguf.GGUFValueType, key: str, issues: list[ReadIssue], depth: int = 0
) -> tuple[Any, gguf.GGUFValueType | None, int]:
    """(value, array element type, element count)."""
    if vtype == VT.STRING:
        text, ok = cur.string(f"the value of {key!r}")
        if not ok:
            issues.append(ReadIssue("string-not-utf8", f"value of {key!r} is not valid UTF-8", None, key))
        return text, None, 1
    if vtype != VT.ARRAY:
        return cur.scalar(vtype, f"the value of {key!r}"), None, 1
    if depth >= MAX_NESTING:
        raise cur.fail("kv-nested-array", f"{key!r} nests arrays more than {MAX_NESTING} deep")
    start = cur.pos
    sub = _value_type(cur.u32(f"the element type of {key!r}"), cur, f"array {key!r}", start)
    n = cur.u64(f"the length of array {key!r}")
    min_total = n * _min_size(sub)
    if min_total > cur.left:
        code = "header-truncated" if min_total <= cur.size else "array-length-too-large"
        raise cur.fail(
            code,
            f"array {key!r} claims {n} {sub.name} elements (at least {min_total} bytes) "
            f"but only {cur.left} bytes are left in the file",
            start,
        )
    if sub == VT.STRING:
        out, bad = _read_string_array(cur, n, key)
        if bad:
            issues.append(
                ReadIssue("string-not-utf8", f"{bad} element(s) of {key!r} are not UTF-8", None, key)
            )
        return out, sub, n
    if sub == VT.ARRAY:
        issues.append(
            ReadIssue("kv-nested-array", f"{key!r} is an array of arrays (llama.cpp rejects it)", start, key)
        )
        items = [_read_value(cur, VT.ARRAY, key, issues, depth + 1)[0] for _ in range(n)]
        return items, sub, n
    dtype = np.dtype(SCALAR_DTYPES[sub]).newbyteorder(cur.bo)
    arr = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=cur.pos).copy()
    cur.pos += n * dtype.itemsize
    if sub == VT.BOOL:
        arr = arr.astype(bool)
    return arr, sub, n


def _read_string_array(cur: _Cursor, n: int, key: str) -> tuple[list[str], int]:
    """``n`` strings (the hot loop of a tokenizer vocabulary): same checks as :meth:`_Cursor.string`."""
    buf, pos, size = cur.buf, cur.pos, cur.size
    unpack = struct.unpack_from
    fmt = cur.bo + "Q"
    out: list[str] = []
    bad = 0
    for i in range(n):
        if size - pos < 8:
            cur.pos = pos
            cur.need(8, f"the length of element {i} of {key!r}")
        (length,) = unpack(fmt, buf, pos)
        pos += 8
        if length > size - pos:
            cur.pos = pos
            code = "header-truncated" if length <= size else "string-length-too-large"
            raise cur.fail(
                code,
                f"element {i} of {key!r} claims {length} bytes but only {size - pos} are left in the file",
                pos - 8,
            )
        raw = buf[pos : pos + length]
        pos += length
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
            out.append(raw.decode("utf-8", errors="replace"))
    cur.pos = pos
    return out, bad


def _read_kv(cur: _Cursor, i: int, issues: list[ReadIssue]) -> KVEntry:
    start = cur.pos
    key, ok = cur.string(f"the key of key/value pair {i}")
    if not ok:
        issues.append(ReadIssue("string-not-utf8", f"key {key!r} is not valid UTF-8", start, key))
    raw_type = cur.u32(f"the value type of {key!r}")
    vtype = _value_type(raw_type, cur, f"key {key!r}", cur.pos - 4)
    value, sub, count = _read_value(cur, vtype, key, issues)
    return KVEntry(key, vtype, value, start, sub, count)


def _read_tensor_info(cur: _Cursor, i: int, issues: list[ReadIssue]) -> TensorInfo:
    start = cur.pos
    name, ok = cur.string(f"the name of tensor {i}")
    if not ok:
        issues.append(ReadIssue("string-not-utf8", f"tensor name {name!r} is not valid UTF-8", start, name))
    n_dims = cur.u32(f"the dimension count of tensor {name!r}")
    if n_dims * 8 + 12 > cur.left:
        raise cur.fail(
            "tensor-too-many-dims",
            f"tensor {name!r} claims {n_dims} dimensions; "
            f"the file has room for at most {max(cur.left - 12, 0) // 8}",
            start,
        )
    dims = tuple(cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
    raw_type = cur.u32(f"the type of tensor {name!r}")
    offset = cur.u64(f"the offset of tensor {name!r}")
    return TensorInfo(name, dims, raw_type, offset, start, i)


def _read_tensor_infos(cur: _Cursor, n: int, issues: list[ReadIssue]) -> list[TensorInfo]:
    """``n`` tensor infos: a tight loop for the common case (a UTF-8 name, at most 4 dimensions, all in
    the file), :func:`_read_tensor_info`'s checked reads for anything else. Linear in ``n``."""
    buf, size = cur.buf, cur.size
    unpack = struct.unpack_from
    bo = cur.bo
    q, i_ = bo + "Q", bo + "I"
    rest_fmt = [bo + f"{k}QIQ" for k in range(GGML_MAX_DIMS + 1)]  # dims, type, offset in one read
    out: list[TensorInfo] = []
    append = out.append
    pos = cur.pos
    for i in range(n):
        start = pos
        if size - pos >= 12:
            (length,) = unpack(q, buf, pos)
            end = pos + 8 + length
            if end + 4 <= size:
                (n_dims,) = unpack(i_, buf, end)
                tail = end + 4 + 8 * n_dims
                if n_dims <= GGML_MAX_DIMS and tail + 12 <= size:
                    try:
                        name = str(buf[pos + 8 : end], "utf-8")
                    except UnicodeDecodeError:
                        name = None
                    if name is not None:
                        *dims, raw_type, offset = unpack(rest_fmt[n_dims], buf, end + 4)
                        append(TensorInfo(name, tuple(dims), raw_type, offset, start, i))
                        pos = tail + 12
                        continue
        cur.pos = pos  # the slow, checked path: reports exactly what is wrong
        append(_read_tensor_info(cur, i, issues))
        pos = cur.pos
    cur.pos = pos
    return out


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (restored after, if it was on). A header of a million tensor
    infos allocates millions of objects without a single cycle; each collection the allocations trigger
    walks every object alive, so with the collector on, reading and checking such a header is quadratic in
    practice (measured: 5.0 s against 3.5 s for 1 M tensor infos, more the more modules are imported)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def read_gguf(path: str | os.PathLike[str], *, split: bool = True) -> GGUFFile:
    """Parse the header, key/values and tensor infos of ``path`` (tensor data is not read).

    Raises :class:`GGUFFormatError` when the file cannot be parsed (bad magic, unsupported version, a count
    or length larger than the file, unknown value type, truncation). Never raises anything else for a
    file's content (an unreadable path raises :class:`GGUFFormatError` with code ``unreadable``).

    A split set is read whole from its first part (``split``, the default): every part is read and
    checked as llama.cpp would (each part present and named ``<prefix>-0000i-of-0000N.gguf``, its
    ``split.no`` and ``split.count`` right, ``split.tensors.count`` the tensors of all parts), and a set
    that llama.cpp could not load raises :class:`GGUFFormatError` naming the file (codes ``split-*``).
    Another part given alone is refused (``split-not-first``). ``split=False`` reads one file as it is.
    """
    with gc_paused():
        return _read_gguf(path, split)


def _read_gguf(path: str | os.PathLike[str], split: bool) -> GGUFFile:
    g = _read_one(path)
    if not split:
        return g
    try:
        if split_count(g.metadata_values, g.path) == 1:
            return g
        paths = set_paths(g.path, g.metadata_values)
        parts = [g]
        for i, q in enumerate(paths[1:], 1):
            part = _read_one(q)
            check_part(q, i, len(paths), g.path, part.metadata_values)
            parts.append(part)
        check_tensor_count(g.path, [q.metadata_values for q in parts], [len(q.tensors) for q in parts])
    except SplitSetError as e:
        raise GGUFFormatError(e.code, str(e)) from None
    return _join(parts)


def _join(parts: list[GGUFFile]) -> GGUFFile:
    """One view of a split set: the first part's header, every part's tensors (numbered through)."""
    first = parts[0]
    tensors: list[TensorInfo] = []
    issues: list[ReadIssue] = list(first.issues)
    for i, part in enumerate(parts):
        for t in part.tensors:
            tensors.append(TensorInfo(t.name, t.dims, t.raw_type, t.offset, t.info_offset, len(tensors), i))
        if i:
            issues += [
                ReadIssue(x.code, f"{part.path.name}: {x.message}", x.offset, x.subject, x.more)
                for x in part.issues
            ]
    return GGUFFile(
        path=first.path,
        file_size=first.file_size,
        version=first.version,
        byte_order=first.byte_order,
        tensor_count=len(tensors),
        kv_count=first.kv_count,
        kvs=first.kvs,
        tensors=tensors,
        alignment=first.alignment,
        header_end=first.header_end,
        data_offset=first.data_offset,
        issues=issues,
        parts=parts,
    )


def _read_one(path: str | os.PathLike[str]) -> GGUFFile:
    p = Path(path)
    if not p.is_file():  # before open(): opening a FIFO would block
        raise GGUFFormatError("unreadable", f"{p}: not found or not a regular file")
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFFormatError("header-truncated", f"{p}: empty file", 0)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, size, p)
    except OSError as e:
        raise GGUFFormatError("unreadable", f"{p}: cannot read: {e.strerror or e}") from e
    except (ValueError, OverflowError, MemoryError) as e:  # defence in depth: should be unreachable
        raise GGUFFormatError("malformed", f"{p}: malformed GGUF: {e}") from e


def read_gguf_bytes(data: bytes, name: str = "<bytes>") -> GGUFFile:
    """:func:`read_gguf` over bytes in memory (``name`` is used in messages); tensor data cannot be read."""
    if not data:
        raise GGUFFormatError("header-truncated", f"{name}: empty file", 0)
    try:
        return _parse(data, len(data), Path(name))
    except (ValueError, OverflowError, MemoryError) as e:  # defence in depth: should be unreachable
        raise GGUFFormatError("malformed", f"{name}: malformed GGUF: {e}") from e


def _parse(mm: mmap.mmap | bytes, size: int, path: Path) -> GGUFFile:
    cur = _Cursor(mm, size, path)
    issues = CappedIssues()
    if size < 4 or struct.unpack_from("<I", mm, 0)[0] != gguf.GGUF_MAGIC:
        head = bytes(mm[: min(size, 4)])
        raise GGUFFormatError(
            "bad-magic", f"{path}: not a GGUF file (starts with {head!r}, expected b'GGUF')", 0
        )
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
        cur.bo = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
        issues.append(
            ReadIssue("big-endian", "big-endian GGUF: llama.cpp on little-endian hosts rejects it", 4)
        )
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail("unsupported-version", f"GGUF version {version} is not supported (expected 2 or 3)", 4)
    tensor_count = cur.u64("the tensor count")
    kv_count = cur.u64("the key/value count")
    if kv_count * MIN_KV_BYTES > cur.left:
        raise cur.fail(
            "kv-count-too-large",
            f"the header claims {kv_count} key/value pairs; the {cur.left} bytes left hold at most "
            f"{cur.left // MIN_KV_BYTES}",
            16,
        )
    if tensor_count * MIN_TENSOR_INFO_BYTES > cur.left:
        raise cur.fail(
            "tensor-count-too-large",
            f"the header claims {tensor_count} tensors; the {cur.left} bytes left hold at most "
            f"{cur.left // MIN_TENSOR_INFO_BYTES}",
            8,
        )
    kvs = [_read_kv(cur, i, issues) for i in range(kv_count)]
    tensors = _read_tensor_infos(cur, tensor_count, issues)
    header_end = cur.pos

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    seen: dict[str, KVEntry] = {}
    for kv in kvs:
        if kv.key in seen:
            issues.append(
                ReadIssue(
                    "kv-duplicate-key",
                    f"key {kv.key!r} appears twice (bytes {seen[kv.key].offset} and {kv.offset})",
                    kv.offset,
                    kv.key,
                )
            )
            continue
        seen[kv.key] = kv
    align_kv = seen.get(gguf.Keys.General.ALIGNMENT)
    if align_kv is not None:
        a = align_kv.value
        if align_kv.type != VT.UINT32 or not isinstance(a, int) or a <= 0 or a & (a - 1):
            issues.append(
                ReadIssue(
                    "bad-alignment",
                    f"general.alignment must be a UINT32 power of two, got {a!r} ({align_kv.type_name}); "
                    f"assuming {alignment}",
                    align_kv.offset,
                    align_kv.key,
                )
            )
        else:
            alignment = a
    data_offset = pad(header_end, alignment)
    return GGUFFile(
        path=path,
        file_size=size,
        version=version,
        byte_order=cur.bo,
        tensor_count=tensor_count,
        kv_count=kv_count,
        kvs=kvs,
        tensors=tensors,
        alignment=alignment,
        header_end=header_end,
        data_offset=data_offset,
        issues=issues.finish(),
    )


def tensor_data(g: GGUFFile, t: TensorInfo) -> np.ndarray | None:
    """Raw bytes of ``t`` as a read-only uint8 memmap, or None when its size is unknown or it lies outside
    the file (its part's file, for a split set). Call only after the bounds checks; nothing is read until
    the caller slices it."""
    g = g.part_of(t)
    nbytes = t.n_bytes
    start = g.data_offset + t.offset
    if nbytes is None or nbytes == 0 or start + nbytes > g.file_size:
        return None
    return g.file_map[start : start + nbytes]
