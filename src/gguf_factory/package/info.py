"""What the exports need to know about a GGUF, read with the doctor's hostile-file-safe reader."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..doctor.reader import GGUFFormatError, KVEntry, read_gguf
from ..errors import InputError
from ..files import require_file

K = gguf.Keys
CONTEXT_KEY = "gguf_factory.context_length"
MAX_DEFAULT_CTX = 8192  # num_ctx when the file recommends none: the trained context, at most this


@dataclass
class ModelInfo:
    path: Path
    name: str
    basename: str
    architecture: str | None
    qtype: str
    size_bytes: int
    n_params: int
    tensor_bytes: int
    context_length: int | None  # trained (<arch>.context_length)
    recommended_context: int | None  # gguf_factory.context_length
    chat_template: str | None
    bos: str
    eos: str
    add_bos: bool
    size_label: str | None
    license: str | None
    n_layers: int | None
    embedding_length: int | None
    profile: str | None
    parts: list[Path] = field(default_factory=list)
    """Every file of the model: ``[path]``, or each part of a split set (``path`` is the first part;
    ``size_bytes`` counts them all)."""
    source_model: str | None = None
    """``gguf_factory.source_model``: the model the file was converted from (a Hub id or a folder name)."""
    general: dict[str, object] = field(default_factory=dict)
    """The ``general.*`` key/values with plain values (strings, numbers, lists of strings)."""

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.n_params if self.n_params else 0.0

    @property
    def num_ctx(self) -> int | None:
        if self.recommended_context:
            return self.recommended_context
        if self.context_length:
            return min(self.context_length, MAX_DEFAULT_CTX)
        return None


def _str(v: object) -> str | None:
    return v if isinstance(v, str) and v else None


def _int(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    try:
        n = int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def _token(tokens: object, idx: object) -> str:
    i = _int(idx) if idx != 0 else 0
    if i is None or not isinstance(tokens, list) or not 0 <= i < len(tokens):
        return ""
    t = tokens[i]
    return t if isinstance(t, str) else ""


def _qtype(file_type: object, tensor_types: list[str]) -> str:
    ft = _int(file_type) if file_type != 0 else 0
    if ft is not None:
        try:
            name = gguf.LlamaFileType(ft).name
        except ValueError:
            name = ""
        if name and name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if tensor_types:  # the commonest tensor type
        return max(set(tensor_types), key=tensor_types.count)
    return "unknown"


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Metadata of a GGUF for packaging; raises :class:`InputError` when it is not a readable GGUF."""
    p = require_file(path, "GGUF file")
    try:
        g = read_gguf(p)
    except GGUFFormatError as e:
        raise InputError(f"{p}: not a readable GGUF: {e}") from None
    arch = g.architecture
    n_params = sum(t.n_elements for t in g.tensors)
    tensor_bytes = sum(t.n_bytes or 0 for t in g.tensors)
    tokens = g.get(K.Tokenizer.LIST)
    model = g.get(K.Tokenizer.MODEL)
    add_bos_raw = g.get(K.Tokenizer.ADD_BOS)
    # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS, the others do not
    add_bos = bool(add_bos_raw) if isinstance(add_bos_raw, bool) else model == "llama"
    template = g.get(K.Tokenizer.CHAT_TEMPLATE)
    name = _str(g.get(K.General.NAME)) or p.stem
    return ModelInfo(
        path=p,
        name=name,
        basename=_str(g.get(K.General.BASENAME)) or name,
        architecture=arch,
        qtype=_qtype(g.get(K.General.FILE_TYPE), [t.type_name for t in g.tensors]),
        size_bytes=sum(q.stat().st_size for q in g.paths),
        n_params=n_params,
        tensor_bytes=tensor_bytes,
        context_length=_int(g.get(f"{arch}.context_length")) if arch else None,
        recommended_context=_int(g.get(CONTEXT_KEY)),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        bos=_token(tokens, g.get(K.Tokenizer.BOS_ID)),
        eos=_token(tokens, g.get(K.Tokenizer.EOS_ID)),
        add_bos=add_bos,
        size_label=_str(g.get(K.General.SIZE_LABEL)),
        license=_str(g.get(K.General.LICENSE)),
        n_layers=_int(g.get(f"{arch}.block_count")) if arch else None,
        embedding_length=_int(g.get(f"{arch}.embedding_length")) if arch else None,
        profile=_str(g.get("gguf_factory.profile")),
        parts=g.paths,
        source_model=_str(g.get("gguf_factory.source_model")),
        general=_general(g.kvs),
    )


def _general(kvs: list[KVEntry]) -> dict[str, object]:
    """``general.*`` values that a model card can use: strings, numbers, lists of strings (first
    occurrence of each key)."""
    out: dict[str, object] = {}
    for kv in kvs:
        if not kv.key.startswith("general.") or kv.key in out:
            continue
        v = kv.value
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            out[kv.key] = v
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[kv.key] = list(v)
    return out
