"""A corpus of corrupted GGUF files, one defect per file, made from a valid GGUF.

The valid file is read with gguf-py's own GGUFReader (not the doctor's reader under test) into a plain
model (key/values + tensors with their bytes); each case edits that model, or the bytes written from it,
and a small independent serializer writes the result. ``python tests/corrupt_corpus.py VALID.gguf OUT_DIR``
writes the corpus and prints one line per file.

Each :class:`Case` names the finding code ``validate`` must report (``expect``), the other codes it may
report as a consequence (``also``), whether the file is unusable (exit code 2) and whether ``repair``
should be able to fix it.
"""

from __future__ import annotations

import copy
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType
FMT = {
    VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
    VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d",
}  # fmt: skip


@dataclass
class Raw:
    """Pre-encoded bytes: for a key/value, everything after the key (type + value)."""

    data: bytes


@dataclass
class KV:
    key: str
    type: gguf.GGUFValueType | int
    value: Any
    subtype: gguf.GGUFValueType | int | None = None
    raw_key: bytes | None = None  # key bytes as written (for invalid UTF-8)


@dataclass
class Tensor:
    name: str
    dims: list[int]  # ggml order
    type: int
    data: bytes
    offset: int | None = None  # None: packed in order


@dataclass
class Model:
    kvs: list[KV]
    tensors: list[Tensor]
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32
    tensor_count: int | None = None
    kv_count: int | None = None
    truncate_to: int | None = None  # cut the written file
    cut_from_end: int = 0

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def drop_kv(self, key: str) -> None:
        self.kvs = [k for k in self.kvs if k.key != key]


def load_model(path: Path) -> Model:
    r = gguf.GGUFReader(path)
    kvs: list[KV] = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        t = f.types[0]
        sub = f.types[-1] if t == VT.ARRAY else None
        kvs.append(KV(f.name, t, f.contents(), sub))
    tensors = [
        Tensor(t.name, [int(d) for d in t.shape], int(t.tensor_type), bytes(t.data.tobytes()))
        for t in sorted(r.tensors, key=lambda t: t.data_offset)
    ]
    return Model(kvs, tensors)


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(t: int, v: Any, sub: int | None) -> bytes:
    if t == VT.STRING:
        return _str(v)
    if t == VT.ARRAY:
        assert sub is not None
        if sub == VT.ARRAY:  # v: [(inner element type, items), ...]
            return struct.pack("<IQ", sub, len(v)) + b"".join(_value(VT.ARRAY, items, t) for t, items in v)
        return struct.pack("<IQ", sub, len(v)) + b"".join(_value(sub, x, None) for x in v)
    return struct.pack("<" + FMT[VT(t)], v)


def serialize(m: Model) -> bytes:
    out = bytearray()
    out += m.magic
    out += struct.pack("<I", m.version)
    out += struct.pack(
        "<QQ",
        len(m.tensors) if m.tensor_count is None else m.tensor_count,
        len(m.kvs) if m.kv_count is None else m.kv_count,
    )
    for kv in m.kvs:
        out += _str(kv.raw_key if kv.raw_key is not None else kv.key)
        if isinstance(kv.value, Raw):
            out += kv.value.data
        else:
            out += struct.pack("<I", kv.type) + _value(kv.type, kv.value, kv.subtype)
    offsets: list[int] = []
    pos = 0
    for t in m.tensors:
        offsets.append(pos if t.offset is None else t.offset)
        pos += len(t.data) + (-len(t.data) % m.alignment)
    for t, off in zip(m.tensors, offsets, strict=True):
        out += _str(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
        out += struct.pack("<IQ", t.type, off)
    out += b"\0" * (-len(out) % m.alignment)
    data_start = len(out)
    end = max([o + len(t.data) for t, o in zip(m.tensors, offsets, strict=True) if o < 1 << 32] + [0])
    blob = bytearray(end + (-end % m.alignment))
    for t, off in zip(m.tensors, offsets, strict=True):
        if off + len(t.data) <= len(blob):
            blob[off : off + len(t.data)] = t.data
    out += blob
    assert data_start % m.alignment == 0
    if m.truncate_to is not None:
        del out[m.truncate_to :]
    if m.cut_from_end:
        del out[-m.cut_from_end :]
    return bytes(out)


def _set_f16(t: Tensor, index: int, value: float) -> None:
    dtype = {QT.F16: np.float16, QT.F32: np.float32}[QT(t.type)]
    a = np.frombuffer(t.data, dtype=dtype).copy()
    a[index] = value
    t.data = a.tobytes()


@dataclass
class Case:
    name: str
    expect: str
    edit: Callable[[Model], None]
    also: frozenset[str] = field(default_factory=frozenset)
    unusable: bool = False
    repairable: bool = False
    kind: str = "structure"


def _kv(key: str, t: int, v: Any, sub: int | None = None) -> Callable[[Model], None]:
    def edit(m: Model) -> None:
        k = m.kv(key)
        k.type, k.value, k.subtype = t, v, sub

    return edit


def _do(*fns: Callable[[Model], None]) -> Callable[[Model], None]:
    def edit(m: Model) -> None:
        for f in fns:
            f(m)

    return edit


def _setattr(obj_get: Callable[[Model], Any], **attrs: Any) -> Callable[[Model], None]:
    def edit(m: Model) -> None:
        o = obj_get(m)
        for k, v in attrs.items():
            setattr(o, k, v)

    return edit


def _dup_key(m: Model) -> None:
    m.kvs.append(KV("general.name", VT.STRING, "second-name"))


def _dup_tensor(m: Model) -> None:
    t = copy.deepcopy(m.tensor("blk.0.attn_norm.weight"))
    m.tensors.append(t)


def _long_name(m: Model) -> None:
    t = copy.deepcopy(m.tensor("blk.0.attn_norm.weight"))
    t.name = "blk.0." + "x" * 70 + ".weight"
    m.tensors.append(t)


def _overlap(m: Model) -> None:
    b = m.tensors[4]  # the tensor right after tensors[3]
    pos = 0
    for t in m.tensors[:3]:
        pos += len(t.data) + (-len(t.data) % m.alignment)
    b.offset = pos  # b now starts where tensors[3] starts


def _shift_last(extra: int) -> Callable[[Model], None]:
    def edit(m: Model) -> None:
        pos = 0
        for t in m.tensors[:-1]:
            pos += len(t.data) + (-len(t.data) % m.alignment)
        m.tensors[-1].offset = pos + extra

    return edit


def _misaligned(m: Model) -> None:
    pos = 0
    for t in m.tensors[:-1]:
        pos += len(t.data) + (-len(t.data) % m.alignment)
    m.tensors[-1].offset = pos + 4


def _drop_tensor(name: str) -> Callable[[Model], None]:
    def edit(m: Model) -> None:
        m.tensors = [t for t in m.tensors if t.name != name]

    return edit


def _extra_token(m: Model) -> None:
    toks = m.kv("tokenizer.ggml.tokens")
    toks.value = [*toks.value, "<extra>"]
    tt = m.kv("tokenizer.ggml.token_type")
    tt.value = [*tt.value, 1]


def _short_token_type(m: Model) -> None:
    tt = m.kv("tokenizer.ggml.token_type")
    tt.value = tt.value[:-1]


def _fill(name: str, value: float) -> Callable[[Model], None]:
    def edit(m: Model) -> None:
        t = m.tensor(name)
        dtype = {QT.F16: np.float16, QT.F32: np.float32}[QT(t.type)]
        t.data = np.full(len(t.data) // np.dtype(dtype).itemsize, value, dtype=dtype).tobytes()

    return edit


def _template(text: str) -> Callable[[Model], None]:
    return _kv("tokenizer.chat_template", VT.STRING, text)


ARCH = "llama"
CASES: list[Case] = [
    # --- structure: unusable files --------------------------------------------------------------------
    Case("bad-magic", "bad-magic", _setattr(lambda m: m, magic=b"GGUX"), unusable=True),
    Case("bad-version", "unsupported-version", _setattr(lambda m: m, version=99), unusable=True),
    Case("truncated-header", "header-truncated", _setattr(lambda m: m, truncate_to=20), unusable=True),
    Case("truncated-in-kv", "header-truncated", _setattr(lambda m: m, truncate_to=700), unusable=True),
    Case("huge-kv-count", "kv-count-too-large", _setattr(lambda m: m, kv_count=2**40), unusable=True),
    Case(
        "huge-tensor-count",
        "tensor-count-too-large",
        _setattr(lambda m: m, tensor_count=2**40),
        unusable=True,
    ),
    Case(
        "huge-string-length",
        "string-length-too-large",
        _kv("general.name", VT.STRING, Raw(struct.pack("<IQ", VT.STRING, 2**62) + b"abc")),
        unusable=True,
    ),
    Case(
        "huge-array-length",
        "array-length-too-large",
        _kv("tokenizer.ggml.tokens", VT.ARRAY, Raw(struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2**61))),
        unusable=True,
    ),
    Case(
        "huge-numeric-array",
        "array-length-too-large",
        lambda m: m.kvs.insert(0, KV("x.big", VT.ARRAY, Raw(struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 10**7)))),
        unusable=True,
    ),
    Case(
        "bad-value-type",
        "kv-bad-type",
        _kv("general.name", 77, Raw(struct.pack("<I", 77) + b"xyz")),
        unusable=True,
    ),
    # --- structure: readable, reported -----------------------------------------------------------------
    Case(
        "nested-array",
        "kv-nested-array",
        lambda m: m.kvs.append(KV("x.nested", VT.ARRAY, [(VT.UINT8, [1, 2]), (VT.UINT8, [3])], VT.ARRAY)),
        repairable=True,
    ),
    Case("duplicate-key", "kv-duplicate-key", _dup_key, repairable=True),
    Case(
        "bad-alignment",
        "bad-alignment",
        lambda m: m.kvs.append(KV("general.alignment", VT.UINT32, 24)),
        repairable=True,
    ),
    Case(
        "invalid-utf8",
        "string-not-utf8",
        _kv("general.name", VT.STRING, b"bad \xff\xfe name"),
        repairable=True,
    ),
    Case(
        "duplicate-tensor",
        "tensor-duplicate-name",
        _dup_tensor,
        also=frozenset({"trailing-bytes"}),
        repairable=True,
    ),
    Case("long-tensor-name", "tensor-name-too-long", _long_name, also=frozenset({"tensor-unexpected"})),
    Case(
        "unknown-tensor-type",
        "tensor-unknown-type",
        _setattr(lambda m: m.tensor("output_norm.weight"), type=99),
    ),
    Case(
        "too-many-dims",
        "tensor-too-many-dims",
        _setattr(lambda m: m.tensor("output_norm.weight"), dims=[64, 1, 1, 1, 1]),
    ),
    Case("zero-dim", "tensor-zero-dim", _setattr(lambda m: m.tensor("blk.0.ffn_norm.weight"), dims=[0])),
    Case(
        "row-not-block-multiple",
        "tensor-row-not-block-multiple",
        _setattr(lambda m: m.tensor("output_norm.weight"), type=int(QT.Q4_K)),
    ),
    Case(
        "offset-out-of-bounds",
        "tensor-offset-out-of-bounds",
        _setattr(lambda m: m.tensors[5], offset=1 << 40),
    ),
    Case("misaligned-offset", "tensor-offset-misaligned", _misaligned, repairable=True),
    Case("overlapping-tensors", "tensor-overlap", _overlap),
    Case("offset-gap", "tensor-offset-gap", _shift_last(64), repairable=True),
    Case("truncated-data", "data-truncated", _setattr(lambda m: m, cut_from_end=100)),
    # --- metadata ---------------------------------------------------------------------------------------
    Case(
        "missing-architecture",
        "arch-missing",
        lambda m: m.drop_kv("general.architecture"),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "unknown-architecture",
        "arch-unknown",
        _kv("general.architecture", VT.STRING, "llamax"),
        kind="metadata",
    ),
    Case(
        "missing-hparam",
        "hparam-missing",
        lambda m: m.drop_kv(f"{ARCH}.attention.head_count"),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "wrong-hparam-type",
        "hparam-wrong-type",
        _kv(f"{ARCH}.context_length", VT.FLOAT32, 128.0),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "impossible-hparam",
        "hparam-bad-value",
        _kv(f"{ARCH}.attention.head_count", VT.UINT32, 0),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "wrong-kv-type",
        "kv-wrong-type",
        _kv("tokenizer.ggml.add_bos_token", VT.STRING, "false"),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "shape-vs-hparam",
        "tensor-shape-mismatch",
        _kv(f"{ARCH}.feed_forward_length", VT.UINT32, 96),
        kind="metadata",
        repairable=True,
    ),
    Case("missing-tensor", "tensor-missing", _drop_tensor("blk.1.ffn_down.weight"), kind="metadata"),
    Case("vocab-vs-embedding", "vocab-size-mismatch", _extra_token, kind="metadata"),
    Case(
        "token-arrays-differ",
        "tokenizer-length-mismatch",
        _short_token_type,
        kind="metadata",
        repairable=True,
    ),
    Case(
        "missing-tokenizer",
        "tokenizer-missing",
        lambda m: m.drop_kv("tokenizer.ggml.model"),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "unknown-tokenizer",
        "tokenizer-model-unknown",
        _kv("tokenizer.ggml.model", VT.STRING, "sentencepiece2"),
        kind="metadata",
    ),
    Case(
        "eos-out-of-range",
        "special-token-out-of-range",
        _kv("tokenizer.ggml.eos_token_id", VT.UINT32, 5000),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "file-type-mismatch",
        "file-type-mismatch",
        _kv("general.file_type", VT.UINT32, 0),
        kind="metadata",
        repairable=True,
    ),
    Case(
        "file-type-unknown",
        "file-type-unknown",
        _kv("general.file_type", VT.UINT32, 9999),
        kind="metadata",
        repairable=True,
    ),
    # --- data -------------------------------------------------------------------------------------------
    Case(
        "nan", "tensor-nan", lambda m: _set_f16(m.tensor("blk.0.ffn_up.weight"), 5, float("nan")), kind="data"
    ),
    Case(
        "inf", "tensor-inf", lambda m: _set_f16(m.tensor("blk.1.attn_q.weight"), 7, float("inf")), kind="data"
    ),
    Case("all-zero", "tensor-all-zero", _fill("blk.0.attn_v.weight", 0.0), kind="data"),
    Case(
        "extreme-values",
        "tensor-extreme-values",
        lambda m: _set_f16(m.tensor("blk.0.attn_norm.weight"), 3, 1e6),
        kind="data",
    ),
    # --- chat template ----------------------------------------------------------------------------------
    Case(
        "malicious-template",
        "template-unsafe",
        _template(
            "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
        ),
        kind="template",
        repairable=True,
    ),
    Case(
        "malicious-template-attr-filter",
        "template-unsafe",
        _template("{{ (messages|attr('__class__')) }}{% for m in messages %}{{ m.content }}{% endfor %}"),
        kind="template",
        repairable=True,
    ),
    Case(
        "template-syntax",
        "template-syntax-error",
        _template("{% for m in messages %}{{ m.content }}"),
        kind="template",
        repairable=True,
    ),
    Case(
        "unrenderable-template",
        "template-render-error",
        _template("{% for m in messages %}{{ m.content }}{{ m.content.foo.bar }}{% endfor %}"),
        kind="template",
        repairable=True,
    ),
    Case(
        "endless-template",
        "template-timeout",
        _template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
        kind="template",
        repairable=True,
    ),
    Case(
        "template-drops-messages",
        "template-ignores-messages",
        _template("<|im_start|>assistant\n"),
        kind="template",
        repairable=True,
    ),
]


def make_case(base: Model, case: Case, out_dir: Path) -> Path:
    m = copy.deepcopy(base)
    case.edit(m)
    path = out_dir / f"{case.name}.gguf"
    path.write_bytes(serialize(m))
    return path


def make_corpus(valid: Path, out_dir: Path) -> dict[str, Path]:
    """Write one file per case (plus ``clean.gguf``, re-serialized unchanged) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_model(valid)
    files = {"clean": out_dir / "clean.gguf"}
    files["clean"].write_bytes(serialize(base))
    for case in CASES:
        files[case.name] = make_case(base, case, out_dir)
    return files


if __name__ == "__main__":
    for name, p in make_corpus(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(f"{name}\t{p}")
