"""``inspect``: what is in a GGUF — metadata, hyperparameters, tensors, bits per weight, size by tensor
group, tokenizer, chat template — and the RAM a context length needs (weights + KV cache)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import InputError
from ..files import human_size
from .reader import KNOWN_TYPES, VT, GGUFFile, KVEntry, gc_paused, read_gguf

K = gguf.Keys
KV_CACHE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}
ARRAY_PREVIEW = 8
MAX_TABLE_ROWS = 100  # rows of a metadata table printed (a crafted header can hold a million keys)
MAX_CELL_CHARS = 300
MAX_TEMPLATE_CHARS = 20_000


@dataclass
class TensorRow:
    name: str
    shape: list[int]  # numpy order
    type: str
    n_elements: int
    n_bytes: int | None


@dataclass
class MemoryEstimate:
    n_ctx: int
    weights_bytes: int
    kv_cache_bytes: int
    kv_type: str
    n_layer: int
    n_embd_k_gqa: int
    n_embd_v_gqa: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass
class InspectReport:
    path: Path
    file_size: int
    version: int
    alignment: int
    architecture: str | None
    name: str | None
    metadata: dict[str, Any]  # arrays summarised
    hparams: dict[str, Any]  # "{arch}." keys, prefix stripped
    tensors: list[TensorRow]  # every tensor, or the first ``max_rows``
    n_tensors: int
    n_params: int
    tensor_bytes: int
    bits_per_weight: float
    groups: dict[str, dict[str, int]]  # group -> n_tensors, n_params, n_bytes
    type_counts: dict[str, int]
    tokenizer: dict[str, Any]
    chat_template: str | None
    memory: list[MemoryEstimate] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    parts: list[Path] = field(default_factory=list)
    """A split set: every part, first part first (``file_size`` counts them all); empty otherwise."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["parts"] = [str(p) for p in self.parts]
        for m, mem in zip(d["memory"], self.memory, strict=True):
            m["total_bytes"] = mem.total_bytes
        return d


def _jsonable(kv: KVEntry) -> Any:
    v = kv.value
    if kv.type == VT.ARRAY:
        items = v.tolist() if isinstance(v, np.ndarray) else list(v)
        if len(items) > ARRAY_PREVIEW:
            return {"type": kv.type_name, "count": kv.count, "first": items[:ARRAY_PREVIEW]}
        return items
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


_BLOCK_PREFIX = re.compile(r"^blk\.\d+\.")


def tensor_group(name: str) -> str:
    """token_embd | output | attention | ffn | norm | other, by the gguf tensor name."""
    base = _BLOCK_PREFIX.sub("", name).rsplit(".", 1)[0]
    if base == "token_embd":
        return "embedding"
    if base == "output":
        return "output"
    if "norm" in base:
        return "norm"
    if base.startswith("attn"):
        return "attention"
    if base.startswith("ffn"):
        return "ffn"
    return "other"


def _hp_int(g: GGUFFile, arch: str, tmpl: str) -> list[int] | int | None:
    v = g.get(tmpl.format(arch=arch))
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "iu":
        return [int(x) for x in v]
    return None


def estimate_memory(
    g: GGUFFile, n_ctx: int, tensor_bytes: int, kv_type: str = "f16"
) -> MemoryEstimate | None:
    """Weights + KV cache: n_layer * n_ctx * (n_embd_k_gqa + n_embd_v_gqa) * bytes per element."""
    arch = g.architecture
    if arch is None:
        return None
    n_layer = _hp_int(g, arch, K.LLM.BLOCK_COUNT)
    n_embd = _hp_int(g, arch, K.LLM.EMBEDDING_LENGTH)
    n_head = _hp_int(g, arch, K.Attention.HEAD_COUNT)
    n_head_kv = _hp_int(g, arch, K.Attention.HEAD_COUNT_KV)
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_head is None or n_layer <= 0:
        return None
    heads = n_head if isinstance(n_head, list) else [n_head] * n_layer
    heads_kv = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv or 0] * n_layer
    heads_kv = [hk if hk else h for hk, h in zip(heads_kv, heads, strict=False)]
    k_len = _hp_int(g, arch, K.Attention.KEY_LENGTH)
    v_len = _hp_int(g, arch, K.Attention.VALUE_LENGTH)
    h0 = max(heads) if heads else 0
    if h0 <= 0:
        return None
    k_len = k_len if isinstance(k_len, int) else n_embd // h0
    v_len = v_len if isinstance(v_len, int) else k_len
    k_total = sum(hk * k_len for hk in heads_kv[:n_layer])
    v_total = sum(hk * v_len for hk in heads_kv[:n_layer])
    per_elem = KV_CACHE_BYTES[kv_type]
    kv = int(n_ctx * (k_total + v_total) * per_elem)
    return MemoryEstimate(n_ctx, tensor_bytes, kv, kv_type, n_layer, k_total // n_layer, v_total // n_layer)


def _tokenizer_summary(g: GGUFFile) -> dict[str, Any]:
    md = g.metadata
    out: dict[str, Any] = {}
    model = g.get(K.Tokenizer.MODEL)
    if model is None:
        return out
    out["model"] = model
    out["pre"] = g.get(K.Tokenizer.PRE)
    tokens = g.get(K.Tokenizer.LIST)
    out["n_tokens"] = len(tokens) if isinstance(tokens, list) else None
    merges = md.get(K.Tokenizer.MERGES)
    out["n_merges"] = merges.count if merges is not None else None
    special: dict[str, Any] = {}
    for kv in g.kvs:
        m = re.match(r"^tokenizer\.ggml\.([a-z_]+)_token_id$", kv.key)
        if m and isinstance(kv.value, int):
            text = tokens[kv.value] if isinstance(tokens, list) and 0 <= kv.value < len(tokens) else None
            special[m.group(1)] = {"id": kv.value, "text": text}
    out["special"] = special
    for key in (K.Tokenizer.ADD_BOS, K.Tokenizer.ADD_EOS):
        if key in md:
            out[key.rsplit(".", 1)[-1]] = g.get(key)
    ttype = g.get(K.Tokenizer.TOKEN_TYPE)
    if isinstance(ttype, np.ndarray) and ttype.size:
        counts: dict[str, int] = {}
        for v, n in zip(*np.unique(ttype, return_counts=True), strict=True):
            try:
                label = gguf.TokenType(int(v)).name.lower()
            except ValueError:
                label = str(int(v))
            counts[label] = int(n)
        out["token_types"] = counts
    return out


def inspect_gguf(
    path: str | Path, ctx: int | None = None, kv_type: str = "f16", max_rows: int | None = None
) -> InspectReport:
    """Read ``path`` with the safe reader and summarise it. ``ctx``: context length for the RAM estimate
    (default: a few usual sizes up to the model's training context). ``max_rows``: keep only the first
    rows of the tensor table (``n_tensors`` still counts them all; the totals cover every tensor)."""
    if ctx is not None and ctx <= 0:
        raise InputError(f"--ctx must be a positive number of tokens, got {ctx}")
    if kv_type not in KV_CACHE_BYTES:
        raise InputError(f"unknown KV cache type {kv_type!r}; expected one of {', '.join(KV_CACHE_BYTES)}")
    with gc_paused():  # a crafted header's million tensor infos: see gc_paused
        return _inspect(read_gguf(path), Path(path), ctx, kv_type, max_rows)


def _inspect(g: GGUFFile, path: Path, ctx: int | None, kv_type: str, max_rows: int | None) -> InspectReport:
    arch = g.architecture
    prefix = f"{arch}." if arch else None
    metadata: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    for kv in g.kvs:
        if kv.key in metadata:
            continue
        metadata[kv.key] = _jsonable(kv)
        if prefix and kv.key.startswith(prefix):
            hparams[kv.key[len(prefix) :]] = metadata[kv.key]
    rows: list[TensorRow] = []
    groups: dict[str, dict[str, int]] = {}
    type_counts: dict[str, int] = {}
    n_params = 0
    n_bytes_total = 0
    keep = len(g.tensors) if max_rows is None else max_rows
    by_type: dict[int, int] = {}
    group_of: dict[str, str] = {}
    for t in g.tensors:  # one cheap pass: a crafted header has millions
        nb = t.n_bytes
        n = prod(t.dims)
        if len(rows) < keep:
            rows.append(TensorRow(t.name, list(t.shape), t.type_name, n, nb))
        n_params += n
        n_bytes_total += nb or 0
        group = group_of.get(t.name)
        if group is None:
            group = group_of[t.name] = tensor_group(t.name)
        grp = groups.setdefault(group, {"n_tensors": 0, "n_params": 0, "n_bytes": 0})
        grp["n_tensors"] += 1
        grp["n_params"] += n
        grp["n_bytes"] += nb or 0
        by_type[t.raw_type] = by_type.get(t.raw_type, 0) + 1
    for raw, count in by_type.items():
        name = KNOWN_TYPES[raw].name if raw in KNOWN_TYPES else f"unknown({raw})"
        type_counts[name] = type_counts.get(name, 0) + count
    bpw = 8 * n_bytes_total / n_params if n_params else 0.0
    template = g.get(K.Tokenizer.CHAT_TEMPLATE)
    memory: list[MemoryEstimate] = []
    if ctx is not None:
        sizes = [ctx]
    else:
        train_ctx = _hp_int(g, arch, K.LLM.CONTEXT_LENGTH) if arch else None
        sizes = [c for c in (512, 2048, 4096, 8192) if not isinstance(train_ctx, int) or c < train_ctx]
        if isinstance(train_ctx, int) and train_ctx > 0:
            sizes.append(train_ctx)
    for c in sizes:
        est = estimate_memory(g, c, n_bytes_total, kv_type)
        if est is not None:
            memory.append(est)
    return InspectReport(
        path=path,
        file_size=g.total_size,
        version=g.version,
        alignment=g.alignment,
        architecture=arch,
        name=g.get(K.General.NAME) if isinstance(g.get(K.General.NAME), str) else None,
        metadata=metadata,
        hparams=hparams,
        tensors=rows,
        n_tensors=len(g.tensors),
        n_params=n_params,
        tensor_bytes=n_bytes_total,
        bits_per_weight=bpw,
        groups=groups,
        type_counts=type_counts,
        tokenizer=_tokenizer_summary(g),
        chat_template=template if isinstance(template, str) else None,
        memory=memory,
        issues=[f"{i.code}: {i.message}" for i in g.issues],
        parts=g.paths if g.parts else [],
    )


def render_inspect(r: InspectReport, console: Any, max_tensors: int = 40) -> None:
    """Print the report as rich tables."""
    from rich.table import Table

    head = Table(title=f"{r.path.name}", show_header=False)
    head.add_row("architecture", str(r.architecture))
    head.add_row("name", str(r.name))
    head.add_row("GGUF version / alignment", f"{r.version} / {r.alignment}")
    head.add_row("file size", human_size(r.file_size))
    if r.parts:
        head.add_row("split", f"{len(r.parts)} parts: {r.parts[0].name} ... {r.parts[-1].name}")
    head.add_row("parameters", f"{r.n_params:,}")
    head.add_row("bits per weight", f"{r.bits_per_weight:.2f}")
    head.add_row("tensor types", ", ".join(f"{k}×{v}" for k, v in sorted(r.type_counts.items())))
    console.print(head)

    hp = Table(title="hyperparameters")
    hp.add_column("key")
    hp.add_column("value")
    hp_rows = list(r.hparams.items())[: MAX_TABLE_ROWS + 1]
    _rows(hp, [(_cell(k), _cell(v)) for k, v in hp_rows], len(r.hparams))
    console.print(hp)

    groups = Table(title="size by tensor group")
    for col in ("group", "tensors", "parameters", "size", "share"):
        groups.add_column(col, justify="left" if col == "group" else "right")
    for name, g in sorted(r.groups.items(), key=lambda x: -x[1]["n_bytes"]):
        share = g["n_bytes"] / r.tensor_bytes if r.tensor_bytes else 0
        groups.add_row(
            name, str(g["n_tensors"]), f"{g['n_params']:,}", human_size(g["n_bytes"]), f"{share:.1%}"
        )
    console.print(groups)

    if r.memory:
        mem = Table(title="RAM for a context length (weights + KV cache)")
        for col in ("n_ctx", "weights", f"KV cache ({r.memory[0].kv_type})", "total"):
            mem.add_column(col, justify="right")
        for m in r.memory:
            mem.add_row(
                str(m.n_ctx),
                human_size(m.weights_bytes),
                human_size(m.kv_cache_bytes),
                human_size(m.total_bytes),
            )
        console.print(mem)

    tok = Table(title="tokenizer", show_header=False)
    for k, v in r.tokenizer.items():
        if k == "special":
            v = ", ".join(f"{n}={d['id']} {_cell(d['text'], 40)!r}" for n, d in v.items())
        tok.add_row(k, _cell(v))
    console.print(tok)

    ts = Table(title=f"tensors ({r.n_tensors})")
    for col in ("name", "shape", "type", "size"):
        ts.add_column(col)
    for row in r.tensors[:max_tensors]:
        ts.add_row(
            row.name, str(row.shape), row.type, "?" if row.n_bytes is None else human_size(row.n_bytes)
        )
    if r.n_tensors > max_tensors:
        ts.add_row(f"... {r.n_tensors - max_tensors} more (use --json for all)", "", "", "")
    console.print(ts)

    other = Table(title="metadata", show_header=False)
    shown = [
        (k, v)
        for k, v in r.metadata.items()
        if not (k.startswith("tokenizer.ggml.") or k == K.Tokenizer.CHAT_TEMPLATE or k in r.hparams)
        and not (r.architecture and k.startswith(f"{r.architecture}."))
    ]
    _rows(other, [(_cell(k), _cell(v)) for k, v in shown[: MAX_TABLE_ROWS + 1]], len(shown))
    console.print(other)
    if r.chat_template:
        console.print("[bold]chat template[/]")
        text = r.chat_template
        if len(text) > MAX_TEMPLATE_CHARS:
            more = len(r.chat_template) - MAX_TEMPLATE_CHARS
            text = text[:MAX_TEMPLATE_CHARS] + f"\n... {more} more characters"
        console.print(text, markup=False, highlight=False)
    for issue in r.issues[:MAX_TABLE_ROWS]:
        console.print(f"[yellow]warning:[/] {_cell(issue)}", highlight=False)


def _cell(v: object, limit: int = MAX_CELL_CHARS) -> str:
    """A value as table text, cut at ``limit`` characters (a header may hold a megabyte-long string)."""
    text = str(v)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _rows(table: Any, rows: list[tuple[str, str]], total: int) -> None:
    for row in rows[:MAX_TABLE_ROWS]:
        table.add_row(*row)
    if total > MAX_TABLE_ROWS:
        table.add_row(f"... {total - MAX_TABLE_ROWS} more (use --json for all)", "")
