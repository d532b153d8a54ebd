"""``repair``: fix what the file alone allows, write a new GGUF, never touch the input.

Fixed from the file itself: duplicate keys, nested arrays, a bad general.alignment, invalid UTF-8 strings,
tensor offsets that are misaligned or not packed in order (data re-packed), identical duplicate tensors,
a missing general.architecture (from the hyperparameter key prefix), hyperparameters that are missing,
mistyped, impossible or contradicted by the tensor shapes (re-derived from the tensors), mistyped
general./tokenizer. keys, tokenizer arrays of different lengths, a missing tokenizer model name, special
token ids outside the vocabulary, general.file_type, and a broken or unsafe chat template (replaced with
``chat_template`` when given, which must itself pass the checks, else removed).

With ``source`` (a good GGUF of the same model), damaged tensor data is rebuilt from it: NaN/Inf/all-zero
tensors, truncated data, tensors out of bounds or overlapping.

``source`` may also be a Hugging Face folder of the model: it is converted with our own converter into a
temporary GGUF beside the output (removed afterwards) in the damaged tensors' type (F32/F16/BF16/Q8_0), or
to F32 and then through llama.cpp's quantizer with one rule per damaged quantized tensor forcing its type;
the damaged tensors are then rebuilt from that file as from any source GGUF.

Refused, with the reason: anything else that needs information the file no longer holds (missing tensors,
unknown tensor types, vocabulary/embedding mismatches, unknown architectures...), and a source whose
tensor names, shapes or types differ from the damaged file's.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import FactoryError
from ..files import check_output_path, require_file
from ..gguf_writer import StreamingWriter, split_limits, write_gguf
from ..splitset import SPLIT_KEYS
from .reader import VT, GGUFFile, GGUFFormatError, TensorInfo, read_gguf, tensor_data
from .template import check_template
from .validate import (
    ARCH_KEY_TYPES,
    INT_TYPES,
    OTHER_KEY_TYPES,
    Finding,
    Severity,
    ValidationReport,
    _known_archs,
    _main_weight_types,
    validate,
)

log = logging.getLogger(__name__)
K = gguf.Keys
QT = gguf.GGMLQuantizationType

# Findings repair can fix from the file alone (others at warning level are left as they are).
REPAIRABLE = frozenset(
    {
        "kv-duplicate-key",
        "kv-nested-array",
        "bad-alignment",
        "string-not-utf8",
        "tensor-offset-misaligned",
        "tensor-offset-gap",
        "tensor-duplicate-name",
        "trailing-bytes",
        "arch-missing",
        "hparam-missing",
        "hparam-wrong-type",
        "hparam-bad-value",
        "tensor-shape-mismatch",
        "kv-wrong-type",
        "tokenizer-length-mismatch",
        "tokenizer-missing",
        "special-token-out-of-range",
        "file-type-mismatch",
        "file-type-unknown",
        "template-empty",
        "template-syntax-error",
        "template-render-error",
        "template-unsafe",
        "template-timeout",
        "template-ignores-messages",
    }
)
SPECIAL_CANDIDATES = {
    K.Tokenizer.EOS_ID: ("<|im_end|>", "</s>", "<|eot_id|>", "<|endoftext|>", "<eos>", "<|end|>"),
    K.Tokenizer.BOS_ID: ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    K.Tokenizer.EOT_ID: ("<|eot_id|>", "<|im_end|>", "<|end|>"),
    K.Tokenizer.UNK_ID: ("<unk>", "<|unk|>"),
    K.Tokenizer.PAD_ID: ("<pad>", "<|pad|>", "<|endoftext|>"),
}
DEFAULT_RMS_EPS = 1e-5


class RepairError(FactoryError):
    """The file cannot be repaired from what it holds (the message says why)."""


@dataclass
class RepairResult:
    path: Path
    actions: list[str]
    fixed: list[str]  # finding codes that were present before and are gone after
    before: ValidationReport
    after: ValidationReport
    remaining: list[Finding] = field(default_factory=list)


TENSOR_DATA_CODES = frozenset(
    {
        "tensor-nan",
        "tensor-inf",
        "tensor-all-zero",
        "data-truncated",
        "tensor-offset-out-of-bounds",
        "tensor-overlap",
    }
)


def _damaged_tensors(g: GGUFFile, findings: list[Finding]) -> set[str]:
    names: set[str] = set()
    for f in findings:
        if f.code == "data-truncated":
            for t in g.tensors:
                part = g.part_of(t)  # a split set: each part has its own data section and size
                if part.data_offset + t.offset + (t.n_bytes or 0) > part.file_size:
                    names.add(t.name)
        elif f.code == "tensor-overlap":
            spans = sorted((t.part, t.offset, t.offset + (t.n_bytes or 0), t.name) for t in g.tensors)
            for (ap, a0, a1, an), (bp, b0, _b1, bn) in zip(spans, spans[1:], strict=False):
                if ap == bp and b0 < a1 and a0 <= b0:
                    names |= {an, bn}
        elif f.code in TENSOR_DATA_CODES and f.subject:
            names.add(f.subject)
    return names


def _from_source(
    g: GGUFFile, src: Path, source: Path, blocking: list[Finding], workdir: Callable[[], Path]
) -> tuple[list[Finding], dict[str, tuple[GGUFFile, TensorInfo]]]:
    """The findings still blocking once damaged tensors come from ``source``, and the replacements.

    ``source`` is a GGUF of the same model, or a Hugging Face folder converted here (into ``workdir()``).
    """
    damaged = sorted(_damaged_tensors(g, blocking))
    if source.is_dir():
        replace = _from_hf_folder(g, src, source, damaged, workdir)
    else:
        try:
            sg = read_gguf(require_file(source, "source GGUF"))
        except GGUFFormatError as e:
            raise RepairError(f"the source {source} is not a readable GGUF: {e}") from e
        replace = {}
        for name in damaged:
            t, st = g.tensor(name), sg.tensor(name)
            if t is None or st is None or st.dims != t.dims or st.raw_type != t.raw_type:
                raise RepairError(
                    f"cannot rebuild tensor {name!r} of {src}: "
                    f"{source} has no tensor of that name, shape and type"
                )
            if tensor_data(sg, st) is None:
                raise RepairError(f"cannot rebuild tensor {name!r}: its data in {source} is unreadable too")
            replace[name] = (sg, st)
    left = [f for f in blocking if f.code not in TENSOR_DATA_CODES]
    return left, replace


def _type_name(raw_type: int) -> str:
    try:
        return QT(raw_type).name
    except ValueError:
        return f"type {raw_type}"


def _quant_file_type(g: GGUFFile) -> str:
    """The llama.cpp file type to quantize a rebuilt source to (the damaged file's own, when usable)."""
    from ..quantize import IMATRIX_TYPES, QUANT_TYPES

    ft = g.get(K.General.FILE_TYPE)
    if isinstance(ft, int) and not isinstance(ft, bool):
        try:
            name = gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            name = ""
        if name in QUANT_TYPES and name not in IMATRIX_TYPES:
            return name
    return "Q8_0"  # the damaged tensors' own types are forced with one rule each


def _from_hf_folder(
    g: GGUFFile, src: Path, hf_dir: Path, damaged: list[str], workdir: Callable[[], Path]
) -> dict[str, tuple[GGUFFile, TensorInfo]]:
    """Convert ``hf_dir`` with our converter (and llama.cpp's quantizer for quantized tensors) into GGUFs
    holding the damaged tensors in their own types, and pick the replacements from them."""
    from ..convert import OUTTYPES, convert
    from ..quantize import quantize

    if not (hf_dir / "config.json").is_file():
        raise RepairError(
            f"--source {hf_dir} is a folder without config.json: not a Hugging Face model folder"
        )
    float_outtype = {int(qt): name for name, (qt, _ft) in OUTTYPES.items()}
    built: dict[str, GGUFFile] = {}  # outtype (or "quantized") -> the converted source

    def build(kind: str) -> GGUFFile:
        if kind in built:
            return built[kind]
        if kind == "quantized":
            f32 = build("f32")
            qtype = _quant_file_type(g)
            rules = [
                f"^{re.escape(n)}$={_type_name(t.raw_type)}"
                for n in damaged
                if (t := g.tensor(n)) is not None and t.raw_type not in float_outtype
            ]
            path = workdir() / f"source-{qtype}.gguf"
            log.info("quantizing the converted %s to %s for the damaged tensors", hf_dir, qtype)
            try:
                quantize(f32.path, path, qtype, tensor_types=rules, threads=2)
            except FactoryError as e:
                raise RepairError(
                    f"cannot rebuild the quantized tensors of {src} from {hf_dir}: llama.cpp's quantizer "
                    f"refused ({e})"
                ) from e
        else:
            path = workdir() / f"source-{kind.upper()}.gguf"
            log.info("converting %s to %s to rebuild damaged tensors", hf_dir, kind.upper())
            try:
                convert(hf_dir, path, outtype=kind)
            except FactoryError as e:
                raise RepairError(f"cannot rebuild tensors of {src}: converting {hf_dir} failed: {e}") from e
        try:
            built[kind] = read_gguf(path)
        except GGUFFormatError as e:  # pragma: no cover - our own writer's output
            raise RepairError(f"the GGUF converted from {hf_dir} is unreadable: {e}") from e
        return built[kind]

    replace: dict[str, tuple[GGUFFile, TensorInfo]] = {}
    for name in damaged:
        t = g.tensor(name)
        if t is None:
            raise RepairError(f"cannot rebuild tensor {name!r} of {src}: its header entry is unreadable")
        match = None
        for sg in built.values():  # a conversion made for another tensor may already hold this one
            st = sg.tensor(name)
            if st is not None and st.dims == t.dims and st.raw_type == t.raw_type:
                match = (sg, st)
                break
        if match is None:
            kind = float_outtype.get(t.raw_type, "quantized")
            sg = build(kind)
            st = sg.tensor(name)
            if st is None:
                raise RepairError(
                    f"cannot rebuild tensor {name!r} of {src}: the model converted from {hf_dir} has no "
                    "tensor of that name (is it the same model?)"
                )
            if st.dims != t.dims or st.raw_type != t.raw_type:
                raise RepairError(
                    f"cannot rebuild tensor {name!r} of {src}: converted from {hf_dir} it is "
                    f"{_type_name(st.raw_type)} {list(st.dims)}, the damaged file holds "
                    f"{_type_name(t.raw_type)} {list(t.dims)} (not the same model, or a type our "
                    "converter and llama.cpp's quantizer do not reproduce)"
                )
            match = (sg, st)
        if tensor_data(*match) is None:  # pragma: no cover - our own writer's output
            raise RepairError(f"cannot rebuild tensor {name!r}: its converted data is unreadable")
        replace[name] = match
    return replace


def _blocking(report: ValidationReport) -> list[Finding]:
    return [f for f in report.at_least(Severity.ERROR) if f.code not in REPAIRABLE]


def _derive_hparams(g: GGUFFile, arch: str) -> dict[str, int]:
    """Hyperparameters implied by the tensor shapes (ggml order: dims[0] is the input size)."""
    by = {t.name: t for t in g.tensors}
    out: dict[str, int] = {}
    emb = by.get("token_embd.weight")
    if emb is not None and len(emb.dims) == 2:
        out[K.LLM.EMBEDDING_LENGTH.format(arch=arch)] = emb.dims[0]
    blocks = {int(m.group(1)) for t in g.tensors if (m := re.match(r"^blk\.(\d+)\.", t.name))}
    if blocks:
        out[K.LLM.BLOCK_COUNT.format(arch=arch)] = max(blocks) + 1
    up = by.get("blk.0.ffn_up.weight") or by.get("blk.0.ffn_gate.weight")
    if up is not None and len(up.dims) == 2:
        out[K.LLM.FEED_FORWARD_LENGTH.format(arch=arch)] = up.dims[1]
    head_dim = None
    for key in (K.Attention.KEY_LENGTH, K.Rope.DIMENSION_COUNT):
        v = g.get(key.format(arch=arch))
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            head_dim = v
            break
    q, k = by.get("blk.0.attn_q.weight"), by.get("blk.0.attn_k.weight")
    if head_dim and q is not None and len(q.dims) == 2 and q.dims[1] % head_dim == 0:
        out[K.Attention.HEAD_COUNT.format(arch=arch)] = q.dims[1] // head_dim
    if head_dim and k is not None and len(k.dims) == 2 and k.dims[1] % head_dim == 0:
        out[K.Attention.HEAD_COUNT_KV.format(arch=arch)] = k.dims[1] // head_dim
    return out


def _infer_arch(g: GGUFFile) -> str | None:
    known = _known_archs()
    for kv in g.kvs:
        prefix = kv.key.split(".", 1)[0]
        if prefix in known and kv.key.endswith((".block_count", ".context_length", ".embedding_length")):
            return prefix
    return None


def _convert(value: Any, vt: gguf.GGUFValueType) -> Any:
    """``value`` as ``vt`` or raise ValueError."""
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"{type(value).__name__} value")
    if vt == VT.BOOL:
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if isinstance(value, int | bool):
            return bool(value)
        raise ValueError(value)
    if vt == VT.STRING:
        return str(value)
    if vt in INT_TYPES:
        f = float(value)
        if not f.is_integer() or f < 0:
            raise ValueError(value)
        return int(f)
    if vt in (VT.FLOAT32, VT.FLOAT64):
        return float(value)
    raise ValueError(value)


def _file_type_for(g: GGUFFile) -> gguf.LlamaFileType | None:
    counts = _main_weight_types(g)
    if not counts:
        return None
    if set(counts) == {QT.F32}:
        return gguf.LlamaFileType.ALL_F32
    main = max(counts, key=lambda t: counts[t])
    for name in (f"MOSTLY_{main.name}", f"MOSTLY_{main.name}_M"):
        if hasattr(gguf.LlamaFileType, name):
            return getattr(gguf.LlamaFileType, name)
    return None


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def repair(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    chat_template: str | None = None,
    smoke: bool = False,
    source: str | os.PathLike[str] | None = None,
    split_max_size: int | str | None = None,
    split_max_tensors: int | None = None,
) -> RepairResult:
    """Write a repaired copy of ``path`` to ``output`` (atomically; never over the input).

    ``source``: a GGUF of the same model (same tensor names, shapes and types, e.g. an earlier good copy)
    or its Hugging Face folder, from which damaged tensors are rebuilt: NaN/Inf/all-zero data, truncated
    data, tensors out of bounds or overlapping.

    A split set is read whole from its first part. The repaired model is one file, or a split set with
    ``split_max_size`` / ``split_max_tensors`` (as ``convert``'s); ``RepairResult.path`` is then its
    first part.
    """
    split = split_limits(split_max_size, split_max_tensors)
    src = require_file(path, "GGUF file")
    if Path(output).exists() and Path(output).resolve() == src.resolve():
        raise RepairError(f"refusing to write over the input {src}: choose another output path")
    out = check_output_path(output, inputs=[src, source])
    try:
        g = read_gguf(src)
    except GGUFFormatError as e:
        raise RepairError(f"cannot repair {src}: the file is unreadable ({e.code}): {e}") from e
    before = validate(src, smoke=False)
    blocking = _blocking(before)
    replace: dict[str, tuple[GGUFFile, TensorInfo]] = {}
    tmp_dirs: list[Path] = []

    def workdir() -> Path:  # beside the output: same disk, and removed before returning
        if not tmp_dirs:
            tmp_dirs.append(Path(tempfile.mkdtemp(prefix=f".{out.name}.source-", dir=out.parent)))
        return tmp_dirs[0]

    try:
        if source is not None:
            blocking, replace = _from_source(g, src, Path(source), blocking, workdir)
        return _repair_with(g, src, out, before, blocking, replace, source, chat_template, smoke, split)
    finally:
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)


_KVs = dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]
"""Key -> (value, type, array subtype): the key/values the repaired file is written with."""


def _repair_with(
    g: GGUFFile,
    src: Path,
    out: Path,
    before: ValidationReport,
    blocking: list[Finding],
    replace: dict[str, tuple[GGUFFile, TensorInfo]],
    source: str | os.PathLike[str] | None,
    chat_template: str | None,
    smoke: bool,
    split: tuple[int, int] = (0, 0),
) -> RepairResult:
    _refuse_unrepairable(src, blocking, source, chat_template)
    codes = {f.code for f in before.findings}
    actions: list[str] = []

    arch = g.architecture
    if arch is None:
        arch = _infer_arch(g)
        if arch is None:
            raise RepairError(f"cannot repair {src}: general.architecture is missing and cannot be inferred")
        actions.append(f"set general.architecture = {arch!r} (from the hyperparameter keys)")

    kvs = _copy_kvs(g, codes, actions)
    _fix_key_types(kvs, actions)
    _fix_hparams(g, src, arch, before, codes, kvs, actions)
    _fix_tokenizer(before, kvs, actions)
    _fix_file_type(g, codes, kvs, actions)
    _fix_chat_template(codes, chat_template, kvs, actions)

    tensors = _unique_tensors(g, src, actions)
    for name in replace:
        actions.append(f"rebuilt tensor {name!r} from {source}")
    if replace or codes & {
        "tensor-offset-misaligned",
        "tensor-offset-gap",
        "bad-alignment",
        "trailing-bytes",
    }:
        actions.append("re-packed the tensor data in order at the default alignment")

    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.WARNING)  # the writer's INFO lines name the temporary file
    if g.parts:
        actions.append(f"read the {len(g.parts)} parts of the split set")
    try:
        parts = _write(g, src, out, arch, kvs, tensors, replace, split)
    finally:
        gguf_log.setLevel(level)
    out = parts[0]
    after = validate(out, smoke=smoke)
    after_codes = {f.code for f in after.at_least(Severity.WARNING)}
    fixed = sorted({f.code for f in before.at_least(Severity.WARNING)} - after_codes)
    log.debug("repaired %s -> %s: %s", src, out, "; ".join(actions) or "nothing to do")
    return RepairResult(out, actions, fixed, before, after, after.at_least(Severity.WARNING))


def _refuse_unrepairable(
    src: Path, blocking: list[Finding], source: str | os.PathLike[str] | None, chat_template: str | None
) -> None:
    """Refuse, before any work, findings repair cannot fix and a replacement template that is unusable."""
    if blocking:
        detail = "; ".join(f"{f.code}: {f.message}" for f in blocking[:4])
        raise RepairError(
            f"cannot repair {src} {'from the file alone' if source is None else 'even with the source'} "
            f"({len(blocking)} unrepairable finding(s)): {detail}"
        )
    if chat_template is not None:
        problems = check_template(chat_template)
        if problems:
            raise RepairError(f"the replacement chat template is not usable: {problems[0].message}")


def _copy_kvs(g: GGUFFile, codes: set[str], actions: list[str]) -> _KVs:
    """The file's key/values, less second copies, nested arrays and the keys the writer sets itself."""
    kvs: _KVs = {}
    for kv in g.kvs:
        if kv.key in kvs:
            actions.append(f"dropped the second {kv.key!r}")
            continue
        if kv.type == VT.ARRAY and kv.subtype == VT.ARRAY:
            actions.append(f"dropped nested array {kv.key!r}")
            continue
        if kv.key in (K.General.ALIGNMENT, K.General.ARCHITECTURE, *SPLIT_KEYS):
            continue  # the writer sets them
        kvs[kv.key] = (kv.value, kv.type, kv.subtype)
    if "bad-alignment" in codes:
        actions.append(f"reset general.alignment to the default {gguf.GGUF_DEFAULT_ALIGNMENT}")
    if "string-not-utf8" in codes:
        actions.append("replaced invalid UTF-8 bytes in strings with U+FFFD")
    return kvs


def _fix_key_types(kvs: _KVs, actions: list[str]) -> None:
    """Convert mistyped general./tokenizer. keys to the type llama.cpp reads (dropped when they cannot be)."""
    for key, (vt, sub) in OTHER_KEY_TYPES.items():
        if key not in kvs or key == K.General.ARCHITECTURE:
            continue
        value, t, s = kvs[key]
        if t == vt and (sub is None or s == sub):
            continue
        try:
            kvs[key] = (_convert(value, vt), vt, None)
            actions.append(f"converted {key} from {t.name} to {vt.name}")
        except ValueError:
            del kvs[key]
            actions.append(f"dropped {key} (a {t.name} that cannot become {vt.name})")


def _fix_hparams(
    g: GGUFFile,
    src: Path,
    arch: str,
    before: ValidationReport,
    codes: set[str],
    kvs: _KVs,
    actions: list[str],
) -> None:
    """Hyperparameters that are missing, mistyped, impossible or contradicted by the tensor shapes:
    re-derived from the tensors, converted, or (the RMS norm epsilon) set to the usual value."""
    derived = _derive_hparams(g, arch)
    hp_codes = {"hparam-missing", "hparam-wrong-type", "hparam-bad-value", "tensor-shape-mismatch"}
    bad_keys = {f.subject for f in before.findings if f.code in hp_codes and f.subject}
    for key in sorted(bad_keys):
        if not key.startswith(f"{arch}."):
            continue  # a tensor name (shape mismatch): handled through the derived values below
        tmpl = key.replace(f"{arch}.", "{arch}.", 1)
        vt = ARCH_KEY_TYPES.get(tmpl, (VT.UINT32, False))[0]
        if key in derived:
            kvs[key] = (derived[key], vt, None)
            actions.append(f"set {key} = {derived[key]} (from the tensor shapes)")
        elif key in kvs:
            try:
                kvs[key] = (_convert(kvs[key][0], vt), vt, None)
                actions.append(f"converted {key} to {vt.name}")
            except ValueError:
                raise RepairError(
                    f"cannot repair {src}: {key} = {kvs[key][0]!r} cannot become {vt.name}"
                ) from None
        elif tmpl == K.Attention.LAYERNORM_RMS_EPS:
            kvs[key] = (DEFAULT_RMS_EPS, VT.FLOAT32, None)
            actions.append(f"set {key} = {DEFAULT_RMS_EPS} (assumed: the usual value)")
        else:
            raise RepairError(f"cannot repair {src}: {key} is missing and the tensors do not imply it")
    if "tensor-shape-mismatch" in codes:
        for key, value in derived.items():
            if key in kvs and kvs[key][0] != value and isinstance(kvs[key][0], int):
                vt = kvs[key][1]
                kvs[key] = (value, vt, None)
                actions.append(f"set {key} = {value} (the tensor shapes disagreed)")


def _fix_tokenizer(before: ValidationReport, kvs: _KVs, actions: list[str]) -> None:
    """Tokenizer arrays resized to the token list, a missing model name inferred, and special token ids
    outside the vocabulary pointed at a usual token (or dropped)."""
    tokens = kvs.get(K.Tokenizer.LIST, (None,))[0]
    n_vocab = len(tokens) if isinstance(tokens, list) else None
    if n_vocab is None:
        return
    for key, fill in ((K.Tokenizer.TOKEN_TYPE, gguf.TokenType.NORMAL), (K.Tokenizer.SCORES, 0.0)):
        if key in kvs:
            value, t, s = kvs[key]
            arr = list(_plain(value))
            if len(arr) != n_vocab:
                arr = (arr + [type(arr[0] if arr else fill)(fill)] * n_vocab)[:n_vocab]
                kvs[key] = (arr, t, s)
                actions.append(f"resized {key} to the {n_vocab} tokens")
    if K.Tokenizer.MODEL not in kvs:
        model = "gpt2" if K.Tokenizer.MERGES in kvs else "llama"
        kvs[K.Tokenizer.MODEL] = (model, VT.STRING, None)
        actions.append(f"set tokenizer.ggml.model = {model!r} (inferred from the tokenizer arrays)")
    for f in before.findings:
        if f.code != "special-token-out-of-range" or not f.subject:
            continue
        pick = next((tokens.index(c) for c in SPECIAL_CANDIDATES.get(f.subject, ()) if c in tokens), None)
        if pick is None:
            del kvs[f.subject]
            actions.append(f"dropped {f.subject} (out of range, no usual token to point it at)")
        else:
            kvs[f.subject] = (pick, VT.UINT32, None)
            actions.append(f"set {f.subject} = {pick} ({tokens[pick]!r})")


def _fix_file_type(g: GGUFFile, codes: set[str], kvs: _KVs, actions: list[str]) -> None:
    """general.file_type set from the tensor types (dropped when no value matches them)."""
    if codes & {"file-type-mismatch", "file-type-unknown"}:
        ft = _file_type_for(g)
        if ft is None:
            kvs.pop(K.General.FILE_TYPE, None)
            actions.append("dropped general.file_type (no matching value)")
        else:
            kvs[K.General.FILE_TYPE] = (int(ft), VT.UINT32, None)
            actions.append(f"set general.file_type = {int(ft)} ({ft.name}, from the tensor types)")


def _fix_chat_template(codes: set[str], chat_template: str | None, kvs: _KVs, actions: list[str]) -> None:
    """The given chat template replaces the file's; else a broken or unsafe one is removed."""
    template_codes = {c for c in codes if c.startswith("template-") and c in REPAIRABLE}
    if chat_template is not None:
        kvs[K.Tokenizer.CHAT_TEMPLATE] = (chat_template, VT.STRING, None)
        actions.append("replaced the chat template with the given one")
    elif template_codes:
        kvs.pop(K.Tokenizer.CHAT_TEMPLATE, None)
        actions.append(
            f"removed the chat template ({', '.join(sorted(template_codes))}); "
            "pass --chat-template to set one"
        )


def _unique_tensors(g: GGUFFile, src: Path, actions: list[str]) -> list[TensorInfo]:
    """The file's tensors less identical duplicates (two different tensors of one name are refused)."""
    tensors: list[TensorInfo] = []
    seen: dict[str, TensorInfo] = {}
    for t in g.tensors:
        if t.name in seen:
            first = seen[t.name]
            a, b = tensor_data(g, first), tensor_data(g, t)
            same = a is not None and b is not None and t.dims == first.dims and t.raw_type == first.raw_type
            if not same or not np.array_equal(a, b):
                raise RepairError(f"cannot repair {src}: two different tensors are named {t.name!r}")
            actions.append(f"dropped the identical duplicate tensor {t.name!r}")
            continue
        seen[t.name] = t
        tensors.append(t)
    return tensors


def _write(
    g: GGUFFile,
    src: Path,
    out: Path,
    arch: str,
    kvs: _KVs,
    tensors: list[TensorInfo],
    replace: dict[str, tuple[GGUFFile, TensorInfo]],
    split: tuple[int, int] = (0, 0),
) -> list[Path]:
    w = StreamingWriter(None, arch, split_max_size=split[0], split_max_tensors=split[1])
    for key, (value, vt, sub) in kvs.items():
        if vt == VT.ARRAY:
            w.add_key_value(key, _plain(value), vt, sub_type=sub)
        else:
            w.add_key_value(key, value, vt)
    blocks: list[tuple[np.ndarray, int]] = []
    for t in tensors:
        data = tensor_data(*replace[t.name]) if t.name in replace else tensor_data(g, t)
        qt = t.type
        if data is None or qt is None:
            raise RepairError(f"cannot repair {src}: tensor {t.name!r} data cannot be read")
        block, type_size = gguf.GGML_QUANT_SIZES[qt]
        row = t.dims[0] // block * type_size
        byte_shape = (*reversed(t.dims[1:]), row)
        w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), data.nbytes, raw_dtype=qt)
        blocks.append((data, data.nbytes))

    def write_data(writer: StreamingWriter) -> None:
        for arr, nbytes in blocks:
            writer.write_tensor_chunks(iter([arr]), nbytes)

    return write_gguf(w, out, write_data, inputs=g.paths)
