"""``validate``: every check on a GGUF, each finding with a stable code and a severity.

Checks run in order: structure (from the safe reader, then tensor types, dimensions and layout),
metadata (architecture, hyperparameters and their types, tensor shapes, tokenizer, file_type), data
(NaN/Inf, all-zero and extreme tensors, read in bounded chunks), chat template (Jinja sandbox, child
process) and, when nothing is at error level, a llama.cpp smoke test in a child process.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from math import prod
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .reader import (
    GGML_MAX_DIMS,
    GGML_MAX_NAME,
    KNOWN_TYPES,
    MAX_ISSUES_PER_CODE,
    QT,
    VT,
    GGUFFile,
    GGUFFormatError,
    KVEntry,
    TensorInfo,
    gc_paused,
    read_gguf,
    tensor_data,
)
from .smoke import SmokeResult, smoke_test
from .template import check_template

log = logging.getLogger(__name__)
K = gguf.Keys
INT64_MAX = 2**63 - 1
CHUNK_BYTES = 8 << 20
EXTREME_ABS = 1e4


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


# code -> (severity, category, what it means). Codes are stable: tests and users match on them.
CATALOG: dict[str, tuple[Severity, str, str]] = {
    # structure: the reader stops at these (the file is unusable)
    "unreadable": (Severity.ERROR, "structure", "the file cannot be opened"),
    "bad-magic": (Severity.ERROR, "structure", "the file does not start with GGUF"),
    "unsupported-version": (Severity.ERROR, "structure", "GGUF version other than 2 or 3"),
    "header-truncated": (Severity.ERROR, "structure", "the file ends inside the header"),
    "kv-count-too-large": (Severity.ERROR, "structure", "more key/values than the file can hold"),
    "tensor-count-too-large": (Severity.ERROR, "structure", "more tensors than the file can hold"),
    "string-length-too-large": (Severity.ERROR, "structure", "a string longer than the file"),
    "array-length-too-large": (Severity.ERROR, "structure", "an array longer than the file"),
    "kv-bad-type": (Severity.ERROR, "structure", "unknown key/value type"),
    "malformed": (Severity.ERROR, "structure", "malformed header"),
    # split sets (llama.cpp's gguf-split layout): the reader stops at these (the set is unusable)
    "split-not-first": (Severity.ERROR, "structure", "a part of a split GGUF other than the first"),
    "split-bad-name": (Severity.ERROR, "structure", "a split GGUF's first part not named -00001-of-0000N"),
    "split-part-missing": (Severity.ERROR, "structure", "a part of a split GGUF is missing"),
    "split-count-mismatch": (Severity.ERROR, "structure", "parts of a split GGUF disagree on split.count"),
    "split-part-mismatch": (Severity.ERROR, "structure", "a part's split.no disagrees with its name"),
    "split-tensor-count-mismatch": (
        Severity.ERROR,
        "structure",
        "split.tensors.count differs from the tensors of all parts",
    ),
    "split-bad-key": (Severity.ERROR, "structure", "split.count or split.no is not a usable number"),
    # structure: reported, reading goes on
    "big-endian": (Severity.WARNING, "structure", "big-endian file"),
    "string-not-utf8": (Severity.WARNING, "structure", "a string is not valid UTF-8"),
    "kv-nested-array": (Severity.ERROR, "structure", "array of arrays (llama.cpp rejects it)"),
    "kv-duplicate-key": (Severity.ERROR, "structure", "a key appears twice"),
    "bad-alignment": (Severity.ERROR, "structure", "general.alignment is not a UINT32 power of two"),
    "tensor-duplicate-name": (Severity.ERROR, "structure", "two tensors with the same name"),
    "tensor-name-too-long": (Severity.ERROR, "structure", "tensor name of 64 bytes or more"),
    "tensor-unknown-type": (Severity.ERROR, "structure", "unknown or removed ggml tensor type"),
    "tensor-too-many-dims": (Severity.ERROR, "structure", "more than 4 dimensions"),
    "tensor-zero-dim": (Severity.ERROR, "structure", "a dimension of 0"),
    "tensor-bad-dims": (Severity.ERROR, "structure", "dimensions overflow int64"),
    "tensor-row-not-block-multiple": (Severity.ERROR, "structure", "row length not a multiple of the block"),
    "tensor-offset-misaligned": (
        Severity.ERROR,
        "structure",
        "tensor offset not a multiple of the alignment",
    ),
    "tensor-offset-out-of-bounds": (Severity.ERROR, "structure", "tensor data past the end of the file"),
    "tensor-overlap": (Severity.ERROR, "structure", "tensors share bytes"),
    "tensor-offset-gap": (
        Severity.ERROR,
        "structure",
        "tensor offsets not packed in order (llama.cpp rejects)",
    ),
    "data-truncated": (Severity.ERROR, "structure", "the file ends inside the tensor data"),
    "trailing-bytes": (Severity.INFO, "structure", "bytes after the last tensor"),
    # metadata
    "arch-missing": (Severity.ERROR, "metadata", "general.architecture missing or not a string"),
    "arch-unknown": (Severity.ERROR, "metadata", "architecture unknown to llama.cpp"),
    "hparam-missing": (Severity.ERROR, "metadata", "a required hyperparameter is missing"),
    "hparam-wrong-type": (Severity.ERROR, "metadata", "a hyperparameter has the wrong value type"),
    "hparam-bad-value": (Severity.ERROR, "metadata", "a hyperparameter has an impossible value"),
    "kv-wrong-type": (Severity.ERROR, "metadata", "a general./tokenizer. key has the wrong value type"),
    "tensor-missing": (Severity.ERROR, "metadata", "a tensor the architecture needs is missing"),
    "tensor-unexpected": (Severity.WARNING, "metadata", "a tensor the architecture does not use"),
    "tensor-shape-mismatch": (Severity.ERROR, "metadata", "tensor shape disagrees with the hyperparameters"),
    "vocab-size-mismatch": (
        Severity.ERROR,
        "metadata",
        "vocab_size, the token list and the embedding rows disagree",
    ),
    "hparam-contradiction": (
        Severity.ERROR,
        "metadata",
        "hyperparameters contradict each other (per-layer counts, heads, RoPE dimensions, context)",
    ),
    "context-beyond-rope": (
        Severity.WARNING,
        "metadata",
        "a context length beyond the trained one or beyond what the RoPE scaling covers",
    ),
    "tokenizer-missing": (Severity.ERROR, "metadata", "no tokenizer.ggml.model / tokens"),
    "tokenizer-model-unknown": (Severity.ERROR, "metadata", "tokenizer model unknown to llama.cpp"),
    "tokenizer-length-mismatch": (Severity.ERROR, "metadata", "tokenizer arrays of different lengths"),
    "special-token-out-of-range": (Severity.ERROR, "metadata", "special token id not in the vocabulary"),
    "file-type-unknown": (Severity.WARNING, "metadata", "general.file_type is not a known value"),
    "file-type-mismatch": (Severity.WARNING, "metadata", "general.file_type disagrees with the tensor types"),
    # data
    "tensor-nan": (Severity.ERROR, "data", "NaN values"),
    "tensor-inf": (Severity.ERROR, "data", "infinite values"),
    "tensor-all-zero": (Severity.ERROR, "data", "a weight tensor that is all zeros"),
    "tensor-extreme-values": (Severity.WARNING, "data", f"values with magnitude above {EXTREME_ABS:g}"),
    "data-not-checked": (Severity.INFO, "data", "tensor type the numpy dequantizer cannot read"),
    # chat template
    "template-empty": (Severity.WARNING, "template", "empty chat template"),
    "template-syntax-error": (Severity.ERROR, "template", "the chat template does not parse"),
    "template-render-error": (Severity.ERROR, "template", "the chat template fails to render"),
    "template-unsafe": (Severity.ERROR, "template", "the chat template reaches for Python internals"),
    "template-timeout": (Severity.ERROR, "template", "the chat template does not finish rendering"),
    "template-ignores-messages": (Severity.WARNING, "template", "rendered prompt lacks the user's message"),
    "template-missing": (Severity.INFO, "template", "no chat template"),
    # smoke test
    "smoke-load-failed": (Severity.ERROR, "smoke", "llama.cpp refuses to load the file"),
    "smoke-crashed": (Severity.ERROR, "smoke", "llama.cpp crashed"),
    "smoke-timeout": (Severity.ERROR, "smoke", "llama.cpp did not finish"),
    "smoke-tokenize-failed": (Severity.ERROR, "smoke", "llama.cpp produced no tokens"),
    "smoke-bad-logits": (Severity.ERROR, "smoke", "llama.cpp produced non-finite logits"),
    "smoke-skipped": (Severity.INFO, "smoke", "smoke test skipped (error-level findings)"),
}
RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    category: str
    message: str
    subject: str | None = None  # key or tensor name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d


def finding(code: str, message: str, subject: str | None = None) -> Finding:
    sev, cat, _ = CATALOG[code]
    return Finding(code, sev, cat, message, subject)


@dataclass
class ValidationReport:
    path: Path
    findings: list[Finding]
    unusable: bool = False  # the reader could not parse the file
    smoke: SmokeResult | None = None
    seconds: float = 0.0
    checked_tensors: int = 0

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def at_least(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if RANK[f.severity] >= RANK[severity]]

    @property
    def exit_code(self) -> int:
        if self.unusable:
            return 2
        return 1 if self.at_least(Severity.WARNING) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "exit_code": self.exit_code,
            "unusable": self.unusable,
            "findings": [f.to_dict() for f in self.findings],
            "smoke": None if self.smoke is None else asdict(self.smoke),
            "checked_tensors": self.checked_tensors,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------------


MAX_PER_CODE = MAX_ISSUES_PER_CODE
"""Findings kept per code: a crafted file can repeat one defect a million times (the rest are counted in
one summary finding, so the report stays small and the run linear)."""


@dataclass(frozen=True)
class SummaryFinding(Finding):
    """Stands for ``more`` findings of its code beyond the first :data:`MAX_PER_CODE`."""

    more: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("more", None)
        return d


class Findings(list[Finding]):
    """Findings capped at :data:`MAX_PER_CODE` per code; :meth:`done` adds a summary per overflowing code."""

    def __init__(self, items: list[Finding] | None = None) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        for f in items or ():
            self.append(f)

    def append(self, f: Finding) -> None:
        if isinstance(f, SummaryFinding):  # from a capped list merged into this one: count, re-summarise
            self.counts[f.code] = self.counts.get(f.code, 0) + f.more
            return
        n = self.counts.get(f.code, 0) + 1
        self.counts[f.code] = n
        if n <= MAX_PER_CODE:
            super().append(f)

    def extend(self, items: Any) -> None:
        for f in items:
            self.append(f)

    def __iadd__(self, items: Any) -> Findings:  # type: ignore[override, misc]
        self.extend(items)
        return self

    def add(self, code: str, message: str, subject: str | None = None) -> None:
        n = self.counts.get(code, 0) + 1
        self.counts[code] = n
        if n <= MAX_PER_CODE:
            super().append(finding(code, message, subject))

    def done(self) -> list[Finding]:
        out = list(self)
        for code, n in self.counts.items():
            if n > MAX_PER_CODE:
                sev, cat, _ = CATALOG[code]
                msg = f"... and {n - MAX_PER_CODE} more {code} finding(s) like these"
                out.append(SummaryFinding(code, sev, cat, msg, None, n - MAX_PER_CODE))
        return out


def _issue_finding(i: Any) -> Finding:
    if i.more:
        sev, cat, _ = CATALOG[i.code]
        return SummaryFinding(i.code, sev, cat, i.message, None, i.more)
    return finding(i.code, i.message, i.subject)


def check_structure(g: GGUFFile) -> tuple[list[Finding], set[int]]:
    """Findings and the indices of tensors whose data location cannot be trusted."""
    out = Findings([_issue_finding(i) for i in g.issues])
    bad: set[int] = set()
    names: dict[str, int] = {}
    sizes = gguf.GGML_QUANT_SIZES
    known = KNOWN_TYPES
    long_name = GGML_MAX_NAME // 4
    for t in g.tensors:  # one pass, cheap when nothing is wrong (a crafted header has millions)
        name, dims = t.name, t.dims
        qt = known.get(t.raw_type)
        if name in names:
            out.add("tensor-duplicate-name", f"tensor {name!r} appears twice", name)
            bad.add(t.index)
        else:
            names[name] = t.index
        if (
            qt is not None
            and 0 < len(dims) <= GGML_MAX_DIMS
            and len(name) < long_name
            and 0 not in dims
            and not dims[0] % sizes[qt][0]
            and prod(dims) <= INT64_MAX
        ):
            continue
        if len(name) >= long_name and len(name.encode("utf-8")) >= GGML_MAX_NAME:
            out.add("tensor-name-too-long", f"tensor name {name[:40]!r}... is {len(name)} bytes", name)
        if len(dims) > GGML_MAX_DIMS:
            out.add(
                "tensor-too-many-dims",
                f"tensor {name!r} has {len(dims)} dimensions (ggml allows {GGML_MAX_DIMS})",
                name,
            )
            bad.add(t.index)
        if qt is None:
            out.add("tensor-unknown-type", f"tensor {name!r} has unknown type {t.raw_type}", name)
            bad.add(t.index)
        if 0 in dims:
            out.add("tensor-zero-dim", f"tensor {name!r} has a zero dimension {dims}", name)
            bad.add(t.index)
        elif prod(dims) > INT64_MAX:  # dimensions are at least 1 here: any over INT64_MAX shows
            out.add("tensor-bad-dims", f"tensor {name!r} dimensions {dims} overflow int64", name)
            bad.add(t.index)
        elif qt is not None and dims and dims[0] % sizes[qt][0]:
            block = sizes[qt][0]
            out.add(
                "tensor-row-not-block-multiple",
                f"tensor {name!r}: row length {dims[0]} is not a multiple of {qt.name}'s block {block}",
                name,
            )
            bad.add(t.index)
    out += _check_layout(g, bad)
    return out.done(), bad


def _check_layout(g: GGUFFile, bad: set[int]) -> list[Finding]:
    """The data layout of the file, or of each part of a split set (each part has its own data section)."""
    if not g.parts:
        return _check_part_layout(g, g.tensors, bad, "")
    out = Findings()
    for i, part in enumerate(g.parts):
        out += _check_part_layout(part, [t for t in g.tensors if t.part == i], bad, f"{part.path.name}: ")
    return out.done()


def _check_part_layout(g: GGUFFile, tensors: list[TensorInfo], bad: set[int], where: str) -> list[Finding]:
    """``tensors`` lie in ``g``'s data section; ``where`` starts each message (a split set's part)."""
    out = Findings()
    align = g.alignment
    expected: int | None = 0  # llama.cpp's rule: tensors packed in file order, each padded to alignment
    n_truncated = 0
    first_truncated: str | None = None
    need = 0
    clean: list[tuple[int, int, int, TensorInfo]] = []  # (offset, index, n_bytes, tensor)
    for t in tensors:
        here = expected
        nbytes = t.n_bytes
        expected = None if expected is None or nbytes is None else expected + nbytes + (-nbytes % align)
        if t.index in bad or nbytes is None:
            continue
        start = g.data_offset + t.offset
        if t.offset % align:
            out.add(
                "tensor-offset-misaligned",
                f"{where}tensor {t.name!r} at data offset {t.offset}, not a multiple of the alignment "
                f"{align}",
                t.name,
            )
            bad.add(t.index)
        elif start + nbytes > g.file_size:
            if t.offset == here:
                n_truncated += 1
                first_truncated = first_truncated or t.name
                need = max(need, start + nbytes)
            else:
                out.add(
                    "tensor-offset-out-of-bounds",
                    f"{where}tensor {t.name!r} spans bytes {start}..{start + nbytes} of a "
                    f"{g.file_size}-byte file",
                    t.name,
                )
            bad.add(t.index)
        else:
            clean.append((t.offset, t.index, nbytes, t))
    if n_truncated:
        out.add(
            "data-truncated",
            f"{where}the file is {g.file_size} bytes but the tensor data needs {need}: "
            f"{n_truncated} tensor(s) cut off, first {first_truncated!r}",
            first_truncated,
        )
    clean.sort(key=lambda c: (c[0], c[1]))
    prev: tuple[int, int, int, TensorInfo] | None = None
    for c in clean:
        if prev is not None and c[0] < prev[0] + prev[2]:
            out.add(
                "tensor-overlap", f"{where}tensor {c[3].name!r} overlaps tensor {prev[3].name!r}", c[3].name
            )
            bad.add(c[1])
            continue
        prev = c
    if not out.counts and not bad:  # gaps only matter (and only mean something) when nothing else is wrong
        pos = 0
        for offset, _, nb, t in clean:
            if offset != pos:
                out.add(
                    "tensor-offset-gap",
                    f"{where}tensor {t.name!r} at data offset {offset}, expected {pos} "
                    "(llama.cpp wants tensors packed in order)",
                    t.name,
                )
                break
            pos = offset + nb + (-nb % align)
        else:
            trailing = g.file_size - (g.data_offset + pos)
            if trailing > 0 and tensors:
                out.add("trailing-bytes", f"{where}{trailing} bytes after the last tensor")
    return out.done()


# ---------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------

INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral3", "granite", "olmo2", "smollm3", "exaone", "internlm2"}
# llama.cpp reads these with exact types (GGUFMeta: a UINT32 key stored as INT32 is an error).
ARCH_KEY_TYPES: dict[str, tuple[gguf.GGUFValueType, bool]] = {  # template -> (type, may be a per-layer array)
    K.LLM.CONTEXT_LENGTH: (VT.UINT32, False),
    K.LLM.EMBEDDING_LENGTH: (VT.UINT32, False),
    K.LLM.BLOCK_COUNT: (VT.UINT32, False),
    K.LLM.FEED_FORWARD_LENGTH: (VT.UINT32, True),
    K.LLM.VOCAB_SIZE: (VT.UINT32, False),
    K.Attention.HEAD_COUNT: (VT.UINT32, True),
    K.Attention.HEAD_COUNT_KV: (VT.UINT32, True),
    K.Attention.KEY_LENGTH: (VT.UINT32, False),
    K.Attention.VALUE_LENGTH: (VT.UINT32, False),
    K.Attention.LAYERNORM_EPS: (VT.FLOAT32, False),
    K.Attention.LAYERNORM_RMS_EPS: (VT.FLOAT32, False),
    K.Rope.DIMENSION_COUNT: (VT.UINT32, False),
    K.Rope.FREQ_BASE: (VT.FLOAT32, False),
    K.Rope.SCALING_FACTOR: (VT.FLOAT32, False),
}
REQUIRED_COMMON = (K.LLM.CONTEXT_LENGTH, K.LLM.EMBEDDING_LENGTH, K.LLM.BLOCK_COUNT)
REQUIRED_BY_ARCH: dict[str, tuple[str, ...]] = {
    **{
        a: (K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.LAYERNORM_RMS_EPS)
        for a in LLAMA_LIKE
    },
    "gemma": (K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.LAYERNORM_RMS_EPS),
    "gemma2": (K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.LAYERNORM_RMS_EPS),
    "phi3": (K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.LAYERNORM_RMS_EPS),
    "gpt2": (K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.LAYERNORM_EPS),
}
OTHER_KEY_TYPES: dict[str, tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]] = {
    K.General.ARCHITECTURE: (VT.STRING, None),
    K.General.NAME: (VT.STRING, None),
    K.General.FILE_TYPE: (VT.UINT32, None),
    K.General.QUANTIZATION_VERSION: (VT.UINT32, None),
    K.Tokenizer.MODEL: (VT.STRING, None),
    K.Tokenizer.PRE: (VT.STRING, None),
    K.Tokenizer.LIST: (VT.ARRAY, VT.STRING),
    K.Tokenizer.SCORES: (VT.ARRAY, VT.FLOAT32),
    K.Tokenizer.TOKEN_TYPE: (VT.ARRAY, VT.INT32),
    K.Tokenizer.MERGES: (VT.ARRAY, VT.STRING),
    K.Tokenizer.CHAT_TEMPLATE: (VT.STRING, None),
    K.Tokenizer.ADD_BOS: (VT.BOOL, None),
    K.Tokenizer.ADD_EOS: (VT.BOOL, None),
}
NO_VOCAB = ("none", "no_vocab")
TOKENIZER_MODELS = {"llama", "gpt2", "bert", "t5", "rwkv", "ugm", "plamo2", "no_vocab", "none"}
SPECIAL_ID_RE = re.compile(r"^tokenizer\.ggml\.[a-z_]+_token_id$")
NO_TOKEN = {-1, 0xFFFFFFFF}
FLOAT_QTYPES = {QT.F32, QT.F16, QT.BF16, QT.F64}
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


def _known_archs() -> set[str]:
    return set(gguf.MODEL_ARCH_NAMES.values())


def _arch_enum(arch: str) -> gguf.MODEL_ARCH | None:
    for k, v in gguf.MODEL_ARCH_NAMES.items():
        if v == arch:
            return k
    return None


def _int_value(g: GGUFFile, key: str) -> int | None:
    kv = g.metadata.get(key)
    if kv is None:
        return None
    if kv.type in INT_TYPES and isinstance(kv.value, int):
        return kv.value
    return None


def _per_layer(g: GGUFFile, key: str) -> list[int] | int | None:
    kv = g.metadata.get(key)
    if kv is None:
        return None
    if kv.type in INT_TYPES and isinstance(kv.value, int):
        return kv.value
    if kv.type == VT.ARRAY and kv.subtype in INT_TYPES and isinstance(kv.value, np.ndarray):
        return [int(x) for x in kv.value]
    return None


def _first(v: list[int] | int | None) -> int | None:
    if isinstance(v, list):
        return max(v) if v else None
    return v


def check_metadata(g: GGUFFile) -> list[Finding]:
    md = g.metadata
    out = _check_key_types(md)
    arch = g.architecture
    if arch is None:
        out.append(finding("arch-missing", "general.architecture is missing or not a string"))
        return Findings(out + _check_tokenizer(g) + _check_file_type(g)).done()
    if arch not in _known_archs():
        out.append(
            finding("arch-unknown", f"architecture {arch!r} is unknown to llama.cpp", K.General.ARCHITECTURE)
        )
    is_adapter = _is_adapter(g)
    wrong_types = _check_hparam_types(md, arch)
    out += wrong_types
    if not is_adapter and arch in _known_archs():
        out += _check_required_hparams(md, arch)
    hp = _read_hparams(g, arch, wrong={f.subject for f in wrong_types})
    out += _check_hparam_values(arch, hp)
    n_vocab = _vocab_size(g)

    by_name = {t.name: t for t in g.tensors}
    if not is_adapter:
        out += _check_tensor_names(g, arch, hp.n_layer)
    expect: dict[str, tuple[int | None, ...]] = {
        "token_embd.weight": (hp.n_embd, None),  # vocab checked separately
        "output_norm.weight": (hp.n_embd,),
    }
    if arch in LLAMA_LIKE:
        per_block = _llama_block_shapes(hp)
        if not is_adapter:
            out += _check_missing_tensors(arch, per_block, hp.n_layer, by_name)
        for t in g.tensors:
            m = BLOCK_TENSOR.match(t.name)
            if m and m.group(2) in per_block:
                expect[t.name] = per_block[m.group(2)]
        expect["output.weight"] = (hp.n_embd, None)
    out += _check_shapes(expect, by_name)
    if n_vocab is not None:
        out += _check_vocab_rows(by_name, n_vocab)
    out += _check_contradictions(g, arch, by_name, n_vocab, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim)
    return Findings(out + _check_tokenizer(g, is_adapter) + _check_file_type(g)).done()


def _mistyped(code: str, key: str, kv: KVEntry, want: str) -> Finding:
    """``code``: ``key`` is stored as ``kv``'s type where llama.cpp reads ``want``."""
    return finding(code, f"{key} is {kv.type_name}, expected {want}", key)


def _check_key_types(md: dict[str, KVEntry]) -> list[Finding]:
    """general./tokenizer. keys of another type than llama.cpp reads (kv-wrong-type)."""
    out: list[Finding] = []
    for key, (vt, sub) in OTHER_KEY_TYPES.items():
        kv = md.get(key)
        if kv is None or (kv.type == vt and (sub is None or kv.subtype == sub)):
            continue
        if key == K.General.ARCHITECTURE:
            continue  # reported as arch-missing
        out.append(_mistyped("kv-wrong-type", key, kv, f"ARRAY[{sub.name}]" if sub is not None else vt.name))
    return out


def _check_hparam_types(md: dict[str, KVEntry], arch: str) -> list[Finding]:
    """Hyperparameters of another type than llama.cpp reads (hparam-wrong-type); a per-layer array of
    integers is accepted where llama.cpp takes one."""
    out: list[Finding] = []
    for tmpl, (vt, arr_ok) in ARCH_KEY_TYPES.items():
        key = tmpl.format(arch=arch)
        kv = md.get(key)
        if kv is None:
            continue
        if kv.type == vt or (arr_ok and kv.type == VT.ARRAY and kv.subtype in (VT.UINT32, VT.INT32)):
            continue
        out.append(_mistyped("hparam-wrong-type", key, kv, vt.name))
    return out


def _check_required_hparams(md: dict[str, KVEntry], arch: str) -> list[Finding]:
    """Hyperparameters llama.cpp requires for ``arch`` that are missing."""
    out: list[Finding] = []
    for tmpl in REQUIRED_COMMON + REQUIRED_BY_ARCH.get(arch, ()):
        key = tmpl.format(arch=arch)
        if key not in md:
            out.append(finding("hparam-missing", f"{key} is missing (llama.cpp requires it for {arch})", key))
    return out


@dataclass(frozen=True)
class _HParams:
    """The hyperparameters the shape checks use; None where absent or of the wrong type (a per-layer
    value: its largest)."""

    n_embd: int | None
    n_layer: int | None
    n_ff: int | None
    n_head: int | None
    n_head_kv: int | None  # head_count when absent
    k_len: int | None
    v_len: int | None

    @property
    def head_dim(self) -> int | None:
        if self.k_len:
            return self.k_len
        n_embd, n_head = self.n_embd, self.n_head
        return n_embd // n_head if n_embd and n_head and n_head > 0 else None

    @property
    def head_dim_v(self) -> int | None:
        return self.v_len if self.v_len else self.head_dim


def _read_hparams(g: GGUFFile, arch: str, wrong: set[str | None]) -> _HParams:
    """``arch``'s hyperparameters, leaving out the keys in ``wrong`` (reported as of the wrong type)."""

    def scalar(tmpl: str) -> int | None:
        key = tmpl.format(arch=arch)
        return None if key in wrong else _int_value(g, key)

    def largest(tmpl: str) -> int | None:
        key = tmpl.format(arch=arch)
        return None if key in wrong else _first(_per_layer(g, key))

    n_head = largest(K.Attention.HEAD_COUNT)
    n_head_kv = largest(K.Attention.HEAD_COUNT_KV)
    return _HParams(
        n_embd=scalar(K.LLM.EMBEDDING_LENGTH),
        n_layer=scalar(K.LLM.BLOCK_COUNT),
        n_ff=largest(K.LLM.FEED_FORWARD_LENGTH),
        n_head=n_head,
        n_head_kv=n_head if n_head_kv is None else n_head_kv,
        k_len=scalar(K.Attention.KEY_LENGTH),
        v_len=scalar(K.Attention.VALUE_LENGTH),
    )


def _check_hparam_values(arch: str, hp: _HParams) -> list[Finding]:
    """Impossible sizes, and head counts that do not divide the embedding or each other."""
    out: list[Finding] = []
    n_embd, n_head, n_head_kv = hp.n_embd, hp.n_head, hp.n_head_kv
    for tmpl, val in (
        (K.LLM.EMBEDDING_LENGTH, n_embd),
        (K.LLM.BLOCK_COUNT, hp.n_layer),
        (K.Attention.HEAD_COUNT, n_head),
    ):
        if val is not None and (val <= 0 or val > 1 << 24):
            key = tmpl.format(arch=arch)
            out.append(finding("hparam-bad-value", f"{key} = {val} is impossible", key))
    if n_embd and n_head and n_head > 0 and hp.k_len is None and n_embd % n_head:
        out.append(
            finding(
                "hparam-bad-value",
                f"{arch}.embedding_length {n_embd} is not divisible by head_count {n_head}",
                K.Attention.HEAD_COUNT.format(arch=arch),
            )
        )
    if n_head and n_head_kv and n_head_kv > 0 and n_head % n_head_kv:
        out.append(
            finding(
                "hparam-bad-value",
                f"{arch}.attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}",
                K.Attention.HEAD_COUNT_KV.format(arch=arch),
            )
        )
    return out


def _llama_block_shapes(hp: _HParams) -> dict[str, tuple[int | None, ...]]:
    """The ggml shape of each tensor of a Llama-like block (None: a dimension the hyperparameters leave
    open), by its name less the ``blk.N.`` prefix."""
    n_embd, n_ff, n_head, n_head_kv = hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv
    head_dim, head_dim_v = hp.head_dim, hp.head_dim_v
    q_out = n_head * head_dim if n_head and head_dim else None
    k_out = n_head_kv * head_dim if n_head_kv and head_dim else None
    v_out = n_head_kv * head_dim_v if n_head_kv and head_dim_v else None
    o_in = n_head * head_dim_v if n_head and head_dim_v else None
    return {
        "attn_norm.weight": (n_embd,),
        "attn_q.weight": (n_embd, q_out),
        "attn_k.weight": (n_embd, k_out),
        "attn_v.weight": (n_embd, v_out),
        "attn_output.weight": (o_in, n_embd),
        "ffn_norm.weight": (n_embd,),
        "ffn_gate.weight": (n_embd, n_ff),
        "ffn_up.weight": (n_embd, n_ff),
        "ffn_down.weight": (n_ff, n_embd),
    }


def _check_missing_tensors(
    arch: str,
    per_block: dict[str, tuple[int | None, ...]],
    n_layer: int | None,
    by_name: dict[str, TensorInfo],
) -> list[Finding]:
    """One finding for every block tensor (and embedding / final norm) the architecture needs and the file
    lacks."""
    if not (n_layer and 0 < n_layer <= 4096):
        return []
    missing = [f"blk.{i}.{s}" for i in range(n_layer) for s in per_block if f"blk.{i}.{s}" not in by_name]
    missing += [n for n in ("token_embd.weight", "output_norm.weight") if n not in by_name]
    if not missing:
        return []
    return [
        finding(
            "tensor-missing",
            f"{len(missing)} tensor(s) {arch} needs are missing: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""),
            missing[0],
        )
    ]


def _check_shapes(expect: dict[str, tuple[int | None, ...]], by_name: dict[str, TensorInfo]) -> list[Finding]:
    """Tensors whose shape disagrees with the one the hyperparameters give (None: any size)."""
    out: list[Finding] = []
    for name, want in expect.items():
        t = by_name.get(name)
        if t is None or t.type is None or len(t.dims) > GGML_MAX_DIMS or 0 in t.dims:
            continue  # structurally broken: already reported
        dims = t.dims
        if len(dims) != len(want) or any(w is not None and d != w for d, w in zip(dims, want, strict=False)):
            shown = tuple("?" if w is None else w for w in want)
            out.append(
                finding(
                    "tensor-shape-mismatch",
                    f"tensor {name!r} has ggml shape {list(dims)}, the hyperparameters say {list(shown)}",
                    name,
                )
            )
    return out


def _check_vocab_rows(by_name: dict[str, TensorInfo], n_vocab: int) -> list[Finding]:
    """Embedding and output matrices with another number of rows than the tokenizer has tokens."""
    out: list[Finding] = []
    for name in ("token_embd.weight", "output.weight"):
        t = by_name.get(name)
        if t is not None and len(t.dims) == 2 and t.dims[1] != n_vocab:
            out.append(
                finding(
                    "vocab-size-mismatch",
                    f"tensor {name!r} has {t.dims[1]} rows but the tokenizer has {n_vocab} tokens",
                    name,
                )
            )
    return out


def _check_contradictions(
    g: GGUFFile,
    arch: str,
    by_name: dict[str, TensorInfo],
    n_vocab: int | None,
    n_layer: int | None,
    n_head: int | None,
    n_head_kv: int | None,
    head_dim: int | None,
) -> list[Finding]:
    """Metadata that contradicts itself or the tensors, beyond the shape checks: ``{arch}.vocab_size``
    against the token list and the embedding rows, per-layer head counts against ``block_count``, the
    RoPE dimension against the head size, and the context length against the RoPE scaling."""
    return [
        *_check_vocab_size_key(g, arch, by_name, n_vocab),
        *_check_head_counts(g, arch, n_layer, n_head, n_head_kv),
        *_check_rope(g, arch, head_dim),
    ]


def _check_vocab_size_key(
    g: GGUFFile, arch: str, by_name: dict[str, TensorInfo], n_vocab: int | None
) -> list[Finding]:
    """``{arch}.vocab_size`` against the token list and the embedding rows."""
    out: list[Finding] = []
    key = K.LLM.VOCAB_SIZE.format(arch=arch)
    declared = _int_value(g, key)
    if declared is None:
        return out
    if n_vocab is not None and declared != n_vocab:
        out.append(
            finding(
                "vocab-size-mismatch",
                f"{key} = {declared} but tokenizer.ggml.tokens has {n_vocab} tokens",
                key,
            )
        )
    embd = by_name.get("token_embd.weight")
    if embd is not None and len(embd.dims) == 2 and embd.dims[1] != declared:
        out.append(
            finding(
                "vocab-size-mismatch",
                f"{key} = {declared} but tensor 'token_embd.weight' has {embd.dims[1]} rows",
                key,
            )
        )
    return out


def _check_head_counts(
    g: GGUFFile, arch: str, n_layer: int | None, n_head: int | None, n_head_kv: int | None
) -> list[Finding]:
    """Per-layer arrays of another length than ``block_count``, and more KV heads than heads."""
    out: list[Finding] = []
    for tmpl in (K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV, K.LLM.FEED_FORWARD_LENGTH):
        k = tmpl.format(arch=arch)
        per_layer = _per_layer(g, k)
        if isinstance(per_layer, list) and n_layer is not None and len(per_layer) != n_layer:
            out.append(
                finding(
                    "hparam-contradiction",
                    f"{k} has {len(per_layer)} per-layer values but block_count is {n_layer}",
                    k,
                )
            )
    if n_head and n_head_kv and n_head_kv > n_head:
        k = K.Attention.HEAD_COUNT_KV.format(arch=arch)
        out.append(
            finding("hparam-contradiction", f"{k} = {n_head_kv} is more than head_count = {n_head}", k)
        )
    return out


def _positive_float(g: GGUFFile, key: str, out: list[Finding]) -> Any:
    """``key``'s value; a float that is not a positive number is reported (hparam-bad-value) and read as
    None."""
    value = g.get(key)
    if isinstance(value, float) and not (value > 0 and math.isfinite(value)):
        out.append(finding("hparam-bad-value", f"{key} = {value} must be a positive number", key))
        return None
    return value


def _check_rope(g: GGUFFile, arch: str, head_dim: int | None) -> list[Finding]:
    """The RoPE dimension against the head size, the RoPE base and scaling factor, and the context
    lengths (trained and recommended) against the RoPE scaling."""
    out: list[Finding] = []
    k = K.Rope.DIMENSION_COUNT.format(arch=arch)
    rope_dims = _int_value(g, k)
    if rope_dims is not None and head_dim and (rope_dims > head_dim or rope_dims % 2):
        out.append(
            finding(
                "hparam-contradiction",
                f"{k} = {rope_dims} must be even and at most the head size {head_dim}",
                k,
            )
        )
    ctx_key = K.LLM.CONTEXT_LENGTH.format(arch=arch)
    ctx = _int_value(g, ctx_key)
    _positive_float(g, K.Rope.FREQ_BASE.format(arch=arch), out)
    factor = _positive_float(g, K.Rope.SCALING_FACTOR.format(arch=arch), out)
    orig_key = K.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch)
    orig = _int_value(g, orig_key)
    if ctx is not None and orig is not None and orig > 0:
        if orig > ctx:
            out.append(
                finding(
                    "hparam-contradiction",
                    f"{orig_key} = {orig} is longer than {ctx_key} = {ctx}: the scaling would shrink the "
                    "context",
                    orig_key,
                )
            )
        elif isinstance(factor, float) and ctx > orig * factor * 1.01:
            out.append(
                finding(
                    "context-beyond-rope",
                    f"{ctx_key} = {ctx} is beyond what the RoPE scaling covers ({orig} × {factor:g} = "
                    f"{orig * factor:.0f})",
                    ctx_key,
                )
            )
    rec_key = "gguf_factory.context_length"
    rec = _int_value(g, rec_key)
    if rec is not None and ctx is not None and ctx > 0 and rec > ctx:
        out.append(
            finding(
                "context-beyond-rope",
                f"{rec_key} = {rec} (the recommended context) is above the trained {ctx_key} = {ctx}",
                rec_key,
            )
        )
    return out


def _check_tensor_names(g: GGUFFile, arch: str, n_layer: int | None) -> list[Finding]:
    a = _arch_enum(arch)
    if a is None or a not in gguf.MODEL_TENSORS:
        return []
    # one alternation of every name the architecture uses: one regex match per tensor
    alternatives = []
    for mt in gguf.MODEL_TENSORS[a]:
        base = re.escape(gguf.TENSOR_NAMES[mt]).replace(r"\{bid\}", r"(?P<bid>\d+)", 1)
        alternatives.append("(?:" + base.replace(r"\{bid\}", r"\d+").replace(r"\{xid\}", r"\d+") + ")")
    named = re.compile(rf"^(?:{'|'.join(_unique_groups(alternatives))})(?:\.weight|\.bias|\.scale)?$")
    out = Findings()
    for name in dict.fromkeys(t.name for t in g.tensors):  # each name once (duplicates are their own finding)
        m = named.match(name)
        if m is None:
            out.add("tensor-unexpected", f"tensor {name!r} is not a {arch} tensor name", name)
            continue
        bid = next((v for k, v in m.groupdict().items() if v is not None), None)
        if bid is not None and n_layer is not None and int(bid) >= n_layer:
            out.add(
                "tensor-unexpected",
                f"tensor {name!r} belongs to block {bid} but block_count is {n_layer}",
                name,
            )
    return out.done()


def _unique_groups(alternatives: list[str]) -> list[str]:
    """Give each alternative's ``bid`` group a name of its own (a regex may not reuse one)."""
    return [alt.replace("(?P<bid>", f"(?P<bid{i}>") for i, alt in enumerate(alternatives)]


def _is_adapter(g: GGUFFile) -> bool:
    v = g.get(K.General.TYPE)
    return isinstance(v, str) and v == "adapter"


def _vocab_size(g: GGUFFile) -> int | None:
    kv = g.metadata.get(K.Tokenizer.LIST)
    if kv is None or kv.type != VT.ARRAY:
        return None
    return kv.count


def _check_tokenizer(g: GGUFFile, is_adapter: bool = False) -> list[Finding]:
    out: list[Finding] = []
    md = g.metadata
    model = md.get(K.Tokenizer.MODEL)
    if model is None or K.Tokenizer.LIST not in md:
        if not is_adapter and (
            model is None or not isinstance(model.value, str) or model.value not in NO_VOCAB
        ):
            out.append(finding("tokenizer-missing", "no tokenizer.ggml.model or tokenizer.ggml.tokens"))
    elif isinstance(model.value, str) and model.value not in TOKENIZER_MODELS:
        out.append(
            finding(
                "tokenizer-model-unknown",
                f"tokenizer model {model.value!r} is unknown to llama.cpp",
                model.key,
            )
        )
    n_vocab = _vocab_size(g)
    if n_vocab is None:
        return out
    for key in (K.Tokenizer.SCORES, K.Tokenizer.TOKEN_TYPE):
        kv = md.get(key)
        if kv is not None and kv.type == VT.ARRAY and kv.count != n_vocab:
            out.append(
                finding(
                    "tokenizer-length-mismatch",
                    f"{key} has {kv.count} entries but tokenizer.ggml.tokens has {n_vocab}",
                    key,
                )
            )
    for kv in g.kvs:
        if SPECIAL_ID_RE.match(kv.key) and kv.type in INT_TYPES and isinstance(kv.value, int):
            if kv.value in NO_TOKEN:
                continue
            if not 0 <= kv.value < n_vocab:
                out.append(
                    finding(
                        "special-token-out-of-range",
                        f"{kv.key} = {kv.value} but the vocabulary has {n_vocab} tokens",
                        kv.key,
                    )
                )
    return out


def _main_weight_types(g: GGUFFile) -> dict[gguf.GGMLQuantizationType, int]:
    counts: dict[gguf.GGMLQuantizationType, int] = {}
    for t in g.tensors:
        if len(t.dims) >= 2 and t.name.endswith(".weight") and t.type is not None:
            if t.name in ("token_embd.weight", "output.weight"):
                continue
            counts[t.type] = counts.get(t.type, 0) + 1
    return counts


def _check_file_type(g: GGUFFile) -> list[Finding]:
    kv = g.metadata.get(K.General.FILE_TYPE)
    if kv is None or not isinstance(kv.value, int) or kv.type not in INT_TYPES:
        return []
    try:
        ftype = gguf.LlamaFileType(kv.value)
    except ValueError:
        return [finding("file-type-unknown", f"general.file_type = {kv.value} is not a known value", kv.key)]
    counts = _main_weight_types(g)
    total = sum(counts.values())
    if not total:
        return []
    float_expect = {
        gguf.LlamaFileType.ALL_F32: QT.F32,
        gguf.LlamaFileType.MOSTLY_F16: QT.F16,
        gguf.LlamaFileType.MOSTLY_BF16: QT.BF16,
    }
    n_quant = sum(n for t, n in counts.items() if t not in FLOAT_QTYPES)
    main = max(counts, key=lambda t: counts[t])
    if ftype in float_expect:
        want = float_expect[ftype]
        ok = (counts.get(want, 0) == total) if ftype == gguf.LlamaFileType.ALL_F32 else main == want
    elif ftype == gguf.LlamaFileType.GUESSED:
        ok = True
    else:
        ok = n_quant * 2 >= total
    if ok:
        return []
    summary = ", ".join(f"{t.name}×{n}" for t, n in sorted(counts.items(), key=lambda x: -x[1]))
    return [
        finding(
            "file-type-mismatch",
            f"general.file_type says {ftype.name} but the weight matrices are {summary}",
            kv.key,
        )
    ]


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


@dataclass
class TensorStats:
    name: str
    n_nan: int = 0
    n_inf: int = 0
    absmax: float = 0.0
    all_zero: bool = True
    checked: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


PLAIN_DTYPES = {
    QT.F32: "f4",
    QT.F16: "f2",
    QT.F64: "f8",
    QT.I8: "i1",
    QT.I16: "i2",
    QT.I32: "i4",
    QT.I64: "i8",
}


SMALL_FLOAT_DTYPES = {QT.F32: "f4", QT.F16: "f2"}


def _decode(raw: np.ndarray, qt: gguf.GGMLQuantizationType, row_bytes: int, bo: str = "<") -> np.ndarray:
    if qt in PLAIN_DTYPES:
        return raw.view(np.dtype(bo + PLAIN_DTYPES[qt]))
    if qt == QT.BF16:
        return (raw.view(np.dtype(bo + "u2")).astype(np.uint32) << 16).view(np.float32)
    if bo != "<":
        raise NotImplementedError(f"big-endian {qt.name} data")
    from gguf.quants import dequantize

    return dequantize(raw.reshape(-1, row_bytes), qt)


def tensor_stats(g: GGUFFile, t: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> TensorStats:
    """NaN/Inf counts, max |x| and all-zero flag, reading the data in bounded chunks."""
    st = TensorStats(t.name)
    data = tensor_data(g, t)
    qt = t.type
    if data is None or qt is None:
        st.checked = False
        return st
    fmt = SMALL_FLOAT_DTYPES.get(qt)
    if fmt is not None and data.shape[0] <= chunk_bytes and data.shape[0] % int(fmt[1]) == 0:
        # one small float tensor (a crafted header has 40 k of them): one reduction, as max() propagates
        # NaN and Inf; a tensor with either is counted below
        m = float(np.abs(np.asarray(data).view(g.byte_order + fmt)).max()) if data.shape[0] else 0.0
        if math.isfinite(m):
            st.absmax, st.all_zero = m, m == 0.0
            return st
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    row_bytes = t.dims[0] // block * type_size if t.dims else type_size
    step = max(row_bytes, chunk_bytes // row_bytes * row_bytes)
    if qt in FLOAT_QTYPES:
        step = max(step - step % 8, 8)
    try:
        for pos in range(0, data.shape[0], step):
            raw = np.asarray(data[pos : pos + step])
            x = _decode(raw, qt, row_bytes, g.byte_order)
            if x.dtype.kind == "f" and x.size and np.isfinite(np.sum(x, dtype=np.float64)):
                # the common case, in two reductions: no NaN or Inf (a finite sum has neither)
                absmax = float(np.max(np.abs(x)))
                st.absmax = max(st.absmax, absmax)
                st.all_zero = st.all_zero and absmax == 0.0
            elif x.dtype.kind == "f":
                nan = np.isnan(x)
                inf = np.isinf(x)
                st.n_nan += int(nan.sum())
                st.n_inf += int(inf.sum())
                finite = x[~(nan | inf)]
                if finite.size:
                    st.absmax = max(st.absmax, float(np.abs(finite.astype(np.float32)).max()))
                    if st.all_zero and np.any(finite != 0):
                        st.all_zero = False
            else:
                if x.size:
                    st.absmax = max(st.absmax, float(np.abs(x.astype(np.float64)).max()))
                if st.all_zero and np.any(x != 0):
                    st.all_zero = False
    except (NotImplementedError, ValueError, KeyError) as e:
        st.checked = False
        st.extra["error"] = str(e)
    finally:
        del data
    return st


def check_data(g: GGUFFile, skip: set[int]) -> tuple[list[Finding], int]:
    out = Findings()
    checked = 0
    with np.errstate(all="ignore"):
        for t in g.tensors:
            if t.index in skip:
                continue
            st = tensor_stats(g, t)
            if not st.checked:
                out.append(
                    finding("data-not-checked", f"tensor {t.name!r} ({t.type_name}) was not read", t.name)
                )
                continue
            checked += 1
            if st.n_nan:
                out.append(finding("tensor-nan", f"tensor {t.name!r} has {st.n_nan} NaN value(s)", t.name))
            if st.n_inf:
                out.append(
                    finding("tensor-inf", f"tensor {t.name!r} has {st.n_inf} infinite value(s)", t.name)
                )
            if (
                st.all_zero
                and not st.n_nan
                and not st.n_inf
                and t.name.endswith(".weight")
                and t.n_elements > 1
            ):
                out.append(finding("tensor-all-zero", f"weight tensor {t.name!r} is all zeros", t.name))
            elif st.absmax > EXTREME_ABS:
                out.append(
                    finding(
                        "tensor-extreme-values", f"tensor {t.name!r} has |x| up to {st.absmax:.3g}", t.name
                    )
                )
    return out.done(), checked


# ---------------------------------------------------------------------------------------------------
# template + the whole run
# ---------------------------------------------------------------------------------------------------


def _token_text(g: GGUFFile, key: str, default: str) -> str:
    tokens = g.get(K.Tokenizer.LIST)
    tid = g.get(key)
    if isinstance(tokens, list) and isinstance(tid, int) and 0 <= tid < len(tokens):
        return tokens[tid]
    return default


def check_chat_template(g: GGUFFile, timeout: float = 3.0) -> list[Finding]:
    kv = g.metadata.get(K.Tokenizer.CHAT_TEMPLATE)
    if kv is None or not isinstance(kv.value, str):
        return [finding("template-missing", "no tokenizer.chat_template (llama.cpp falls back to a default)")]
    bos = _token_text(g, K.Tokenizer.BOS_ID, "<s>")
    eos = _token_text(g, K.Tokenizer.EOS_ID, "</s>")
    return [finding(p.code, p.message, kv.key) for p in check_template(kv.value, bos, eos, timeout=timeout)]


def validate(
    path: str | Path,
    *,
    smoke: bool = True,
    data: bool = True,
    template_timeout: float = 3.0,
    smoke_timeout: float = 120.0,
) -> ValidationReport:
    """Run every check on ``path``; never raises for a file's content (a fatal defect is a finding)."""
    t0 = time.perf_counter()
    p = Path(path)
    with gc_paused():  # a crafted header's million tensor infos: see gc_paused
        try:
            g = read_gguf(p)
        except GGUFFormatError as e:
            code = e.code if e.code in CATALOG else "malformed"
            return ValidationReport(
                p, [finding(code, str(e))], unusable=True, seconds=time.perf_counter() - t0
            )
        structure, bad = check_structure(g)
        findings = Findings(structure)
        findings += check_metadata(g)
        checked = 0
        if data:
            more, checked = check_data(g, bad)
            findings += more
        findings += check_chat_template(g, timeout=template_timeout)
    report = ValidationReport(p, findings.done(), checked_tensors=checked)
    if smoke:
        if report.at_least(Severity.ERROR):
            report.findings.append(finding("smoke-skipped", "not run: the file has error-level findings"))
        else:
            report.smoke = smoke_test(p, timeout=smoke_timeout)
            if not report.smoke.ok:
                report.findings.append(
                    finding(report.smoke.code or "smoke-load-failed", report.smoke.message)
                )
    report.seconds = time.perf_counter() - t0
    return report


def render_validation(r: ValidationReport, console: Any) -> None:
    """Print the findings as a rich table and a one-line verdict."""
    from rich.table import Table

    colour = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
    if r.findings:
        table = Table(title=f"{r.path.name}: {len(r.findings)} finding(s)")
        for col in ("severity", "code", "category", "message"):
            table.add_column(col, overflow="fold")
        for f in sorted(r.findings, key=lambda f: -RANK[f.severity]):
            c = colour[f.severity]
            table.add_row(f"[{c}]{f.severity.value}[/]", f.code, f.category, f.message)
        console.print(table)
    if r.smoke is not None and r.smoke.ok:
        console.print(
            f"llama.cpp smoke test: loaded and generated {r.smoke.n_tokens} token(s) "
            f"for {len(r.smoke.replies)} prompts "
            + (
                "through its chat template"
                if r.smoke.chat_template
                else f"as raw text ({r.smoke.template_note})"
            )
        )
    verdict = {0: "[green]clean[/]", 1: "[yellow]findings[/]", 2: "[red]unusable file[/]"}[r.exit_code]
    console.print(f"{r.path}: {verdict} ({r.checked_tensors} tensors read, {r.seconds:.2f} s)")
