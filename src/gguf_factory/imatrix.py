"""Importance matrix from the user's own chat data, computed by llama.cpp, written in llama.cpp's GGUF format.

llama.cpp's ``llama-imatrix`` tool is not part of llama-cpp-python, so this module does what it does through
the public C API: the scheduler's eval callback (``llama_context_params.cb_eval``) is asked about every graph
node; for each matrix multiplication (``MUL_MAT`` / ``MUL_MAT_ID``) whose first operand is a model weight
(``blk.*``, optionally ``output.weight``) it reads the activations (the second operand) with
``ggml_backend_tensor_get`` and accumulates, per weight (and per expert), the per-column sum of squares and
the number of rows seen. The result is written as ``<weight>.in_sum2`` / ``<weight>.counts`` tensors with
``general.type = imatrix`` — the format :func:`gguf_factory.quantize.load_imatrix` and llama.cpp's quantizer
read. ``ggml_tensor`` is read through a ctypes mirror of the struct in this build's ``ggml.h``; the mirror is
checked against ``ggml_get_name`` / ``ggml_nbytes`` at start-up so a layout change fails loudly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, FactoryError, InputError, ModelError
from .files import atomic_path, check_output_path, require_file

log = logging.getLogger(__name__)

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
_TYPE_F32, _TYPE_F16, _TYPE_I32 = 0, 1, 26


class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the bundled ggml (include/ggml.h)."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(_GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


class ImatrixError(FactoryError):
    """The importance matrix could not be computed."""


@dataclass
class ImatrixResult:
    path: Path
    entries: int
    chunks: int
    tokens: int
    chunk_size: int
    seconds: float
    dataset: str
    names: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- ggml access


class _Ggml:
    """The few libggml-base symbols needed, with the struct mirror validated against them."""

    def __init__(self) -> None:
        import llama_cpp

        libdir = Path(llama_cpp.__file__).parent / "lib"
        cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
        lib = None
        for c in cands:
            try:
                lib = ctypes.CDLL(str(c))
                break
            except OSError:
                continue
        if lib is None:
            from llama_cpp import _ggml

            lib = _ggml.libggml
        try:
            self.op_name = lib.ggml_op_name
            self.get_name = lib.ggml_get_name
            self.nbytes = lib.ggml_nbytes
            self.tensor_get = lib.ggml_backend_tensor_get
        except AttributeError as e:
            raise ImatrixError(f"this llama.cpp build does not export what imatrix needs: {e}") from None
        self.op_name.argtypes, self.op_name.restype = [ctypes.c_int], ctypes.c_char_p
        self.get_name.argtypes, self.get_name.restype = [ctypes.c_void_p], ctypes.c_void_p
        self.nbytes.argtypes, self.nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.tensor_get.restype = None
        ops: dict[str, int] = {}
        for i in range(128):  # MUL_MAT and MUL_MAT_ID sit early in enum ggml_op; stop once both are seen
            n = self.op_name(i)
            if not n:
                break
            ops[n.decode()] = i
            if "MUL_MAT" in ops and "MUL_MAT_ID" in ops:
                break
        if "MUL_MAT" not in ops or "MUL_MAT_ID" not in ops:
            raise ImatrixError("cannot find the MUL_MAT op ids in this ggml build")
        self.mul_mat, self.mul_mat_id = ops["MUL_MAT"], ops["MUL_MAT_ID"]
        self.checked = False

    def check_layout(self, addr: int) -> None:
        """The mirror's ``name`` offset and size must agree with ggml's own accessors on a real tensor."""
        t = _GGMLTensor.from_address(addr)
        name_at = self.get_name(addr)
        if name_at != addr + _GGMLTensor.name.offset:
            raise ImatrixError("ggml_tensor layout differs from this module's mirror (name offset)")
        ne, nb = list(t.ne), list(t.nb)
        if any(n < 1 for n in ne) or nb[0] <= 0:
            raise ImatrixError("ggml_tensor layout differs from this module's mirror (ne/nb)")
        if t.type == _TYPE_F32:
            expect = 4 + sum((ne[i] - 1) * nb[i] for i in range(GGML_MAX_DIMS))
            if self.nbytes(addr) != expect:
                raise ImatrixError("ggml_tensor layout differs from this module's mirror (nbytes)")
        self.checked = True

    def read(self, t: _GGMLTensor, addr: int) -> np.ndarray:
        """A tensor's values as an array of shape (ne3, ne2, ne1, ne0), honouring its strides."""
        dtype = {_TYPE_F32: np.float32, _TYPE_F16: np.float16, _TYPE_I32: np.int32}.get(t.type)
        if dtype is None:
            raise ImatrixError(
                f"unsupported activation type id {t.type} in {t.name.decode(errors='replace')}"
            )
        size = self.nbytes(addr)
        buf = np.empty(size, dtype=np.uint8)
        self.tensor_get(addr, buf.ctypes.data, 0, size)
        item = np.dtype(dtype).itemsize
        ne, nb = list(t.ne), list(t.nb)
        arr = np.lib.stride_tricks.as_strided(
            buf[: size - size % item].view(dtype),
            shape=(ne[3], ne[2], ne[1], ne[0]),
            strides=(nb[3], nb[2], nb[1], nb[0]),
            writeable=False,
        )
        return np.array(arr)  # own copy


class _Collector:
    """The eval callback: accumulates sums of squared activations per weight (per expert)."""

    def __init__(self, ggml: _Ggml, include_output: bool):
        import llama_cpp

        self.ggml = ggml
        self.include_output = include_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def _wanted(self, t: _GGMLTensor) -> str | None:
        if t.op not in (self.ggml.mul_mat, self.ggml.mul_mat_id) or not t.src[0] or not t.src[1]:
            return None
        name = t.src[0].contents.name.decode("utf-8", errors="replace")
        if name.startswith("blk.") or (self.include_output and name == "output.weight"):
            return name
        return None

    def _cb(self, addr: int, ask: bool, _user: Any) -> bool:
        try:
            t = _GGMLTensor.from_address(addr)
            if not self.ggml.checked:
                self.ggml.check_layout(addr)
            name = self._wanted(t)
            if ask:
                return name is not None
            if name is None:
                return True
            if t.op == self.ggml.mul_mat:
                self._mul_mat(name, t)
            else:
                self._mul_mat_id(name, t)
            return True
        except BaseException as e:  # never let an exception cross the C boundary
            self.error = e
            return False

    def _slot(self, name: str, n_mat: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.sums.get(name)
        if s is None:
            s = self.sums[name] = np.zeros((n_mat, width), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.float64)
        elif s.shape != (n_mat, width):
            raise ImatrixError(f"inconsistent activation shape for {name}: {s.shape} vs {(n_mat, width)}")
        return s, self.counts[name]

    def _mul_mat(self, name: str, t: _GGMLTensor) -> None:
        w = t.src[0].contents
        src1_addr = ctypes.addressof(t.src[1].contents)
        x = self.ggml.read(t.src[1].contents, src1_addr).astype(np.float64)  # (ne3, ne2, ne1, ne0)
        w2, w3 = int(w.ne[2]), int(w.ne[3])
        sums, counts = self._slot(name, w2 * w3, int(w.ne[0]))
        if x.shape[3] != sums.shape[1]:
            raise ImatrixError(f"activation width {x.shape[3]} does not match {name} ({sums.shape[1]})")
        r2, r3 = max(1, x.shape[1] // w2), max(1, x.shape[0] // w3)
        sq = (x * x).sum(axis=2)  # (ne3, ne2, ne0)
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 // r3) * w2 + i2 // r2
                sums[mat] += sq[i3, i2]
                counts[mat] += x.shape[2]

    def _mul_mat_id(self, name: str, t: _GGMLTensor) -> None:
        w = t.src[0].contents
        if not t.src[2]:
            raise ImatrixError(f"MUL_MAT_ID for {name} has no expert ids")
        x = self.ggml.read(t.src[1].contents, ctypes.addressof(t.src[1].contents)).astype(np.float64)
        ids = self.ggml.read(t.src[2].contents, ctypes.addressof(t.src[2].contents))
        x = x[0]  # (n_tokens, n_rows_per_token, ne0)
        ids = ids[0, 0]  # (n_tokens, n_used)
        n_expert = int(w.ne[2])
        sums, counts = self._slot(name, n_expert, int(w.ne[0]))
        n_tok, n_used = ids.shape
        rows = x[:, np.arange(n_used) % x.shape[1], :]  # (n_tokens, n_used, ne0)
        e = ids.reshape(-1).astype(np.int64)
        if e.size and (e.min() < 0 or e.max() >= n_expert):
            raise ImatrixError(f"expert id out of range for {name}")
        np.add.at(sums, e, (rows * rows).reshape(n_tok * n_used, -1))
        np.add.at(counts, e, 1.0)


# --------------------------------------------------------------------------------------------- data


def _data_texts(
    data: str | os.PathLike[str], template_src: str | None, bos: str, eos: str
) -> tuple[Path, list[str]]:
    """The texts to run: a .txt as is; chat data (a prepared folder's train.jsonl or a chat file) rendered."""
    p = Path(data)
    if p.is_dir():
        p = p / "train.jsonl"
        if not p.is_file():
            raise InputError(
                f"no train.jsonl in dataset folder {data} (write one with `gguf-factory prepare`)"
            )
    p = require_file(p, "imatrix data")
    if p.suffix.lower() in (".txt", ".text", ".md"):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e})") from None
        if not text.strip():
            raise DataError(f"{p}: empty text")
        return p, [text]
    from .data import read_chat_file

    convs = [
        [{"role": m.role, "content": m.content} for m in c.messages] for c in read_chat_file(p).conversations
    ]
    if not convs:
        raise DataError(f"{p}: no conversations")
    if template_src:
        from .runtime.templates import ChatTemplate

        tpl = ChatTemplate(template_src, bos_token=bos, eos_token=eos)
        try:
            return p, [tpl.render(c, False) for c in convs]
        except Exception as e:
            raise ModelError(f"the model's chat template failed on {p}: {e}") from None
    log.warning("the model has no chat template: using plain 'role: content' lines")
    return p, ["\n".join(f"{m['role']}: {m['content']}" for m in c) + "\n" for c in convs]


def _tokenize(llama_cpp: Any, vocab: Any, text: str, add_special: bool) -> list[int]:
    raw = text.encode("utf-8")
    n_max = len(raw) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, True)
    if n < 0:
        buf = (llama_cpp.llama_token * -n)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, -n, add_special, True)
    return list(buf[:n])


def _piece(llama_cpp: Any, vocab: Any, tok: int) -> str:
    if tok < 0:
        return ""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, tok, buf, 256, 0, True)
    return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")


def _meta_str(llama_cpp: Any, model: Any, key: str) -> str | None:
    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


# --------------------------------------------------------------------------------------------- compute


def compute_imatrix(
    model_gguf: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    max_tokens: int = 100_000,
    ctx: int = 512,
    threads: int | None = None,
    include_output: bool = False,
) -> ImatrixResult:
    """Run ``data`` through ``model_gguf`` with llama.cpp and write its importance matrix to ``out_path``.

    The data's tokens are cut into chunks of ``ctx`` tokens (each starting with BOS when the vocabulary
    asks for one, the cache cleared between chunks), at most ``max_tokens`` tokens in all; every position is
    an output, so the last block's weights see every token.
    """
    import llama_cpp

    from .runtime import _quiet_stderr

    model_path = require_file(model_gguf, "model")
    with open(model_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"not a GGUF file: {model_path}")
    out = check_output_path(out_path, inputs=[model_path, data])
    if ctx < 8:
        raise InputError(f"ctx must be at least 8, got {ctx}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be positive, got {max_tokens}")
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    t0 = time.perf_counter()
    ggml = _Ggml()
    collector = _Collector(ggml, include_output)

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    with _quiet_stderr():
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
    if not model:
        raise ModelError(f"llama.cpp could not load {model_path}")
    ctx_p = None
    batch = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        src, ids = _data_tokens(llama_cpp, model, vocab, data, bos, max_tokens)
        step = ctx - 1 if add_bos and bos >= 0 else ctx
        chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
        chunks = [c for c in chunks if len(c) >= min(16, step)] or chunks[:1]
        if not chunks:
            raise DataError(f"{src}: no tokens to run")

        cparams = _context_params(llama_cpp, ctx, threads, collector)
        with _quiet_stderr():
            ctx_p = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx_p:
            raise ModelError(f"llama.cpp could not create a context for {model_path}")
        batch = llama_cpp.llama_batch_init(ctx, 0, 1)
        prefix = [bos] if step < ctx else []  # each chunk starts with BOS when the vocabulary asks for one
        n_tokens = _run_chunks(llama_cpp, ctx_p, batch, chunks, prefix, collector)
    finally:
        with _quiet_stderr():
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
            if ctx_p:
                llama_cpp.llama_free(ctx_p)
            llama_cpp.llama_model_free(model)

    if not collector.sums:
        raise ImatrixError(f"no weight matrix multiplication was seen while running {model_path}")
    write_imatrix(
        out,
        collector.sums,
        collector.counts,
        datasets=[src.name],
        chunk_count=len(chunks),
        chunk_size=ctx,
    )
    return ImatrixResult(
        path=out,
        entries=len(collector.sums),
        chunks=len(chunks),
        tokens=n_tokens,
        chunk_size=ctx,
        seconds=time.perf_counter() - t0,
        dataset=str(src),
        names=sorted(collector.sums),
    )


def _data_tokens(
    llama_cpp: Any, model: Any, vocab: Any, data: str | os.PathLike[str], bos: int, max_tokens: int
) -> tuple[Path, list[int]]:
    """The data file and its first ``max_tokens`` tokens (chat data rendered with the model's template)."""
    src, texts = _data_texts(
        data,
        _meta_str(llama_cpp, model, "tokenizer.chat_template"),
        _piece(llama_cpp, vocab, bos),
        _piece(llama_cpp, vocab, int(llama_cpp.llama_vocab_eos(vocab))),
    )
    ids: list[int] = []
    for text in texts:  # rendered templates carry their own BOS text where the template wants it
        ids += _tokenize(llama_cpp, vocab, text, False)
        if len(ids) >= max_tokens:
            break
    return src, ids[:max_tokens]


def _context_params(llama_cpp: Any, ctx: int, threads: int, collector: _Collector) -> Any:
    """A context of ``ctx`` tokens, every one an output, whose eval callback is ``collector``'s."""
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = ctx
    cparams.n_batch = ctx
    cparams.n_ubatch = ctx
    cparams.n_seq_max = 1
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.cb_eval = collector.callback
    cparams.cb_eval_user_data = None
    cparams.no_perf = True
    return cparams


def _run_chunks(
    llama_cpp: Any, ctx_p: Any, batch: Any, chunks: list[list[int]], prefix: list[int], collector: _Collector
) -> int:
    """Decode each chunk (after ``prefix``) from an empty cache, the collector reading the activations;
    returns the number of tokens run."""
    mem = llama_cpp.llama_get_memory(ctx_p)
    n_tokens = 0
    for k, chunk in enumerate(chunks):
        toks = prefix + chunk
        llama_cpp.llama_memory_clear(mem, True)
        for i, tok in enumerate(toks):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(toks)
        rc = llama_cpp.llama_decode(ctx_p, batch)
        if collector.error is not None:
            err = collector.error
            if isinstance(err, FactoryError):
                raise err
            raise ImatrixError(f"reading activations failed: {err!r}") from err
        if rc != 0:
            raise ModelError(f"llama_decode failed on chunk {k + 1} (code {rc})")
        n_tokens += len(toks)
        log.debug("imatrix chunk %d/%d (%d tokens)", k + 1, len(chunks), len(toks))
    return n_tokens


def write_imatrix(
    path: str | os.PathLike[str],
    sums: dict[str, np.ndarray],
    counts: dict[str, np.ndarray],
    *,
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write llama.cpp's GGUF imatrix: ``<w>.in_sum2`` (n_mat x width) and ``<w>.counts`` (n_mat x 1)."""
    import gguf

    out = check_output_path(path)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, "imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix file has no architecture
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
        for name in sorted(sums):
            s = np.ascontiguousarray(np.asarray(sums[name], dtype=np.float32).reshape(len(counts[name]), -1))
            c = np.ascontiguousarray(np.asarray(counts[name], dtype=np.float32).reshape(-1, 1))
            w.add_tensor(f"{name}.in_sum2", s)
            w.add_tensor(f"{name}.counts", c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
