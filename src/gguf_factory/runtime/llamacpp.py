"""The llama.cpp backend (through llama-cpp-python): a GGUF file behind the ChatModel interface."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ModelError
from .base import DEFAULT_CTX, ChatModel, GenerationSettings, Messages, check_messages
from .templates import BoundedChatFormatter, require_safe_template

log = logging.getLogger(__name__)

RECOMMENDED_CTX_KEY = "gguf_factory.context_length"  # written by quantize (profiles, --ctx)
TEMPLATE_KEY = "tokenizer.chat_template"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence llama.cpp's C-level logging to fd 2 while a model loads (verbose=False misses some)."""
    try:
        fd = os.dup(2)
    except OSError:  # no fd 2 (some embedded hosts)
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


class LlamaCppChatModel(ChatModel):
    """A GGUF model loaded in llama.cpp."""

    backend = "llama.cpp"

    def __init__(self, path: Path, llm: Any, n_ctx: int):
        self.path = path
        self.llm = llm
        self.n_ctx = n_ctx
        self.metadata: dict[str, str] = dict(getattr(llm, "metadata", {}) or {})
        self._formatter: BoundedChatFormatter | None = None
        self._loras: dict[Path, Any] = {}  # LoRA adapters loaded on this model (llama_adapter_lora_init)
        lora_path = getattr(llm, "lora_path", None)  # the one llama-cpp-python applied at load, if any
        self._active_loras: tuple[tuple[Path, float], ...] = (
            ((Path(lora_path), float(getattr(llm, "lora_scale", 1.0))),) if lora_path else ()
        )
        template = self.chat_template
        if template and getattr(llm, "chat_format", None) == "chat_template.default":
            # llama-cpp-python would render the GGUF's template itself, unbounded: render it in a worker
            from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

            llm.chat_handler = chat_formatter_to_chat_completion_handler(self.formatter())

    # --- chat -------------------------------------------------------------------------------------
    def chat(self, messages: Messages, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        check_messages(messages)
        s = GenerationSettings(**settings)
        out = self.llm.create_chat_completion(
            messages=[dict(m) for m in messages],
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed,
            stream=stream,
        )
        if stream:
            return _chat_pieces(out)
        return (out["choices"][0]["message"].get("content") or "").strip()

    # --- raw completion ---------------------------------------------------------------------------
    def generate(self, prompt: str, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        s = GenerationSettings(**settings)
        out = self.llm.create_completion(
            prompt=prompt,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed,
            stream=stream,
        )
        if stream:
            return (chunk["choices"][0]["text"] for chunk in out)
        return out["choices"][0]["text"]

    def formatter(self) -> BoundedChatFormatter:
        """The GGUF's chat template as llama-cpp-python's chat handler renders it (its BOS/EOS text, its
        stop token), rendered bounded (:mod:`.templates`)."""
        if self._formatter is None:
            template = self.chat_template
            if not template:
                raise ModelError(f"{self.path} has no chat template (tokenizer.chat_template)")

            def text(token: int) -> str:
                return self.llm._model.token_get_text(token) if token >= 0 else ""

            eos = self.llm.token_eos()
            self._formatter = BoundedChatFormatter(
                template, eos_token=text(eos), bos_token=text(self.llm.token_bos()), stop_token_ids=[eos]
            )
        return self._formatter

    def render_prompt(self, messages: Messages) -> str:
        """``messages`` rendered with the chat template, ready for the assistant's turn (bounded)."""
        check_messages(messages)
        return self.formatter().render(messages)

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Rendered as llama-cpp-python's chat handler renders it (the GGUF's template, its BOS/EOS text)."""
        return self.tokenize(self.render_prompt(messages), special=True, add_bos=False)

    def generate_tokens(self, ids: Sequence[int], **settings: Any) -> Iterator[int]:
        s = GenerationSettings(**settings)
        ids = list(ids)
        if len(ids) >= self.n_ctx:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        budget = min(s.max_tokens, self.n_ctx - len(ids))
        if budget <= 0:
            return
        if s.seed is not None:
            self.llm.set_seed(s.seed)
        self.llm.reset()
        sampled = self.llm.generate(
            ids,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
        )
        n = 0
        for tok in sampled:
            if self.is_end_of_generation(tok):
                return
            yield int(tok)
            n += 1
            if n >= budget:
                return

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def is_end_of_generation(self, token: int) -> bool:
        """True for the tokens that end a reply (EOS, end-of-turn, ...), as llama.cpp's vocab marks them."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def logits(self, text_or_ids: str | Sequence[int], *, add_bos: bool = False) -> np.ndarray:
        ids = self._ids_for_logits(text_or_ids, add_bos)
        llm = self.llm
        n_vocab = llm.n_vocab()
        if max(ids) >= n_vocab or min(ids) < 0:
            raise InputError(f"logits: token ids must be in [0, {n_vocab})")
        out = np.empty((len(ids), n_vocab), dtype=np.float32)
        # The Llama object keeps logits of the last position only (unless built with logits_all), so decode
        # batches that ask llama.cpp for every position's logits, then leave the context empty again.
        llm.reset()
        llm._ctx.kv_cache_clear()
        try:
            for start in range(0, len(ids), llm.n_batch):
                chunk = ids[start : start + llm.n_batch]
                llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
                llm._ctx.decode(llm._batch)
                rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk) * n_vocab,))
                out[start : start + len(chunk)] = rows.reshape(len(chunk), n_vocab)
        finally:
            llm._ctx.kv_cache_clear()
            llm.reset()
        return out

    def embed(self, inputs: Sequence[str | Sequence[int]], *, normalize: bool = True) -> np.ndarray:
        """One embedding per input (text, or token ids): llama.cpp's embedding mode on this model's own
        context, mean-pooled over the input's tokens by llama.cpp (a model loaded with ``pooling="mean"``)
        or here from the per-token hidden states; L2-normalized unless ``normalize=False``.

        A text is tokenized as llama.cpp's own ``embed`` does (BOS added when the model wants one). Each
        input must fit one batch (:attr:`max_embed_tokens`). The context is left empty afterwards."""
        import llama_cpp

        llm = self.llm
        ids_list = [
            self.tokenize(x, add_bos=True) if isinstance(x, str) else [int(t) for t in x] for x in inputs
        ]
        n_vocab, limit = llm.n_vocab(), self.max_embed_tokens
        for i, ids in enumerate(ids_list):
            if not ids:
                raise InputError(f"input {i} has no tokens to embed")
            if len(ids) > limit:
                raise InputError(f"input {i} is {len(ids)} tokens, over the embedding limit of {limit}")
            if min(ids) < 0 or max(ids) >= n_vocab:
                raise InputError(f"input {i}: token ids must be in [0, {n_vocab})")
        ctx = llm._ctx.ctx
        pooled = llama_cpp.llama_pooling_type(ctx) == llama_cpp.LLAMA_POOLING_TYPE_MEAN
        n_embd = llm.n_embd()
        out = np.empty((len(ids_list), n_embd), dtype=np.float32)
        llm.reset()
        llm._ctx.kv_cache_clear()
        llama_cpp.llama_set_embeddings(ctx, True)
        try:
            for row, ids in enumerate(ids_list):
                llm._ctx.kv_cache_clear()
                llm._batch.set_batch(batch=ids, n_past=0, logits_all=True)
                llm._ctx.decode(llm._batch)
                if pooled:
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                    out[row] = np.ctypeslib.as_array(ptr, shape=(n_embd,))
                else:
                    ptr = llama_cpp.llama_get_embeddings(ctx)
                    out[row] = np.ctypeslib.as_array(ptr, shape=(len(ids), n_embd)).mean(axis=0)
        finally:
            llama_cpp.llama_set_embeddings(ctx, False)
            llm._ctx.kv_cache_clear()
            llm.reset()
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.where(norms > 0, norms, 1.0)
        return out

    @property
    def max_embed_tokens(self) -> int:
        """The most tokens one input to :meth:`embed` may have (one llama.cpp micro-batch)."""
        return int(min(self.n_ctx, self.llm.n_batch, self.llm.context_params.n_ubatch))

    # --- prompt cache --------------------------------------------------------------------------------
    def set_prompt_cache(self, capacity_bytes: int) -> None:
        """Keep evaluated prompts (llama.cpp state: the KV cache of prompt + reply) in RAM up to
        ``capacity_bytes``, so that a request sharing a prefix with an earlier one (the next turn of a
        conversation, the same system prompt) evaluates only what follows it: llama-cpp-python's
        ``Llama.set_cache`` with :class:`PromptCache`. 0 turns it off."""
        if capacity_bytes <= 0:
            self.llm.set_cache(None)
            return
        cache = PromptCache(capacity_bytes, keep_scores=bool(getattr(self.llm, "_logits_all", False)))
        cache.namespace = tuple((str(p), s) for p, s in self._active_loras)
        self.llm.set_cache(cache)

    @property
    def prompt_cache(self) -> PromptCache | None:
        cache = getattr(self.llm, "cache", None)
        return cache if isinstance(cache, PromptCache) else None

    def evaluated_tokens(self, reset: bool = False) -> int:
        """Tokens llama.cpp has evaluated on this context (prompt + generated) since the last reset of the
        count (``reset=True`` reads and resets)."""
        import llama_cpp

        ctx = self.llm._ctx.ctx
        data = llama_cpp.llama_perf_context(ctx)
        if reset:
            llama_cpp.llama_perf_context_reset(ctx)
        return int(data.n_p_eval + data.n_eval)

    # --- LoRA adapters switched per request on one loaded base -------------------------------------
    @property
    def active_adapters(self) -> tuple[tuple[Path, float], ...]:
        """The (adapter path, scale) pairs applied to this context now."""
        return self._active_loras

    @property
    def loaded_adapters(self) -> list[Path]:
        """Adapters loaded on this model by :meth:`use_adapters` (and not dropped)."""
        return list(self._loras)

    def use_adapters(self, adapters: Sequence[tuple[str | os.PathLike[str], float]] = ()) -> None:
        """Apply exactly these GGUF LoRA adapters (path, scale) to this model's context, none for the bare
        base: llama.cpp's adapter API, each adapter file loaded once on this model (on first use) and kept
        for the next switch. The evaluated prefix is dropped when the set changes (its KV cache was
        computed with other weights). Not thread-safe: call it while holding the model alone."""
        import ctypes

        import llama_cpp

        want = tuple((Path(p), float(s)) for p, s in adapters)
        if want == self._active_loras:
            return
        ptrs = []
        for p, _ in want:
            if p not in self._loras:
                if not p.is_file():
                    raise InputError(f"LoRA adapter not found: {p}")
                with _quiet_stderr():
                    ptr = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(p).encode("utf-8"))
                if not ptr:
                    raise ModelError(f"llama.cpp could not load the LoRA adapter {p} on {self.path.name}")
                self._loras[p] = ptr
            ptrs.append(self._loras[p])
        ctx = self.llm._ctx.ctx
        if want:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(want))(*ptrs)
            scales = (ctypes.c_float * len(want))(*(s for _, s in want))
            rc = llama_cpp.llama_set_adapters_lora(ctx, arr, len(want), scales)
        else:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        if rc:
            raise ModelError(f"llama.cpp could not apply the LoRA adapters {[str(p) for p, _ in want]}")
        self._active_loras = want
        if isinstance(self.llm.cache, PromptCache):
            self.llm.cache.namespace = tuple((str(p), s) for p, s in want)  # states of this adapter set
        self.llm.reset()  # a reused prefix would carry the previous adapters' KV cache
        self.llm._ctx.kv_cache_clear()

    def drop_adapter(self, path: str | os.PathLike[str]) -> None:
        """Free an adapter loaded by :meth:`use_adapters` (taken off the context first if applied)."""
        import llama_cpp

        p = Path(path)
        if p not in self._loras:
            return
        if any(a == p for a, _ in self._active_loras):
            self.use_adapters(tuple(x for x in self._active_loras if x[0] != p))
        llama_cpp.llama_adapter_lora_free(self._loras.pop(p))

    def close(self) -> None:
        if self._loras and getattr(self.llm, "_ctx", None) is not None:
            for p in list(self._loras):
                self.drop_adapter(p)
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def _chat_pieces(chunks: Any) -> Iterator[str]:
    for chunk in chunks:
        piece = chunk["choices"][0].get("delta", {}).get("content")
        if piece:
            yield piece


def load_gguf(
    p: Path,
    *,
    n_ctx: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    seed: int = 1234,
    verbose: bool = False,
    lora_path: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    pooling: str | None = None,
    n_batch: int | None = None,
    type_k: str | None = None,
    type_v: str | None = None,
    prompt_cache_bytes: int = 0,
) -> LlamaCppChatModel:
    """Load a GGUF file into llama.cpp.

    ``pooling="mean"``: :meth:`LlamaCppChatModel.embed` gets llama.cpp's own mean pooling (generation is
    unchanged). ``n_batch``: llama.cpp's batch size (also the longest input ``embed`` takes). ``type_k`` /
    ``type_v``: the KV cache's type (``f16``, the default, ``q8_0``, ``q4_0``...: :data:`KV_CACHE_TYPES`);
    a quantized V cache needs flash attention, which is then turned on. ``prompt_cache_bytes``: RAM for
    evaluated prompts reused by later requests sharing their prefix
    (:meth:`LlamaCppChatModel.set_prompt_cache`).

    ``n_ctx`` defaults to the recommended context stored by ``quantize`` (``gguf_factory.context_length``,
    set by a use-case profile), else to min(the model's trained context, 2048). ``lora_path``: a GGUF LoRA
    adapter (``convert-lora``) applied on top, scaled by ``lora_scale``.
    """
    import llama_cpp

    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"not a GGUF file: {p}")
    threads = threads or os.cpu_count() or 1
    meta = _header(p)
    check_chat_templates(p, meta)
    if n_ctx is None:
        recommended, trained = _context_lengths(p, meta)
        if recommended:
            n_ctx = recommended
        else:
            n_ctx = min(trained, DEFAULT_CTX) if trained else DEFAULT_CTX
    lora: dict[str, Any] = {}
    if lora_path is not None:
        lp = Path(lora_path)
        if not lp.is_file():
            raise InputError(f"LoRA adapter not found: {lp}")
        with open(lp, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"not a GGUF LoRA adapter: {lp} (convert a PEFT adapter with convert-lora)")
        lora = {"lora_path": str(lp), "lora_scale": float(lora_scale)}
    extra: dict[str, Any] = {}
    if pooling is not None:
        if pooling not in POOLING_TYPES:
            raise InputError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLING_TYPES)}")
        extra["pooling_type"] = getattr(llama_cpp, POOLING_TYPES[pooling])
    if n_batch is not None:
        extra["n_batch"] = extra["n_ubatch"] = int(n_batch)
    for name, value in (("type_k", type_k), ("type_v", type_v)):
        if value is not None:
            extra[name] = kv_cache_type(value)
            _check_kv_block(p, meta, name, str(value).lower())
    if type_v is not None and kv_cache_type(type_v) != llama_cpp.GGML_TYPE_F16:
        extra["flash_attn"] = True  # llama.cpp quantizes the V cache only with flash attention
    quiet = contextlib.nullcontext() if verbose else _quiet_stderr()
    try:
        with quiet:
            llm = _llama_class()(
                model_path=str(p),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                seed=seed,
                verbose=verbose,
                **lora,
                **extra,
            )
    except ValueError as e:  # llama-cpp-python raises ValueError when llama.cpp fails to load
        with_lora = f" with the LoRA adapter {lora_path}" if lora_path else ""
        raise ModelError(f"llama.cpp could not load {p}{with_lora}: {e}") from e
    model = LlamaCppChatModel(p, llm, llm.n_ctx())
    if prompt_cache_bytes:
        model.set_prompt_cache(int(prompt_cache_bytes))
    return model


_LLAMA_CLASS: Any = None


def _llama_class() -> Any:
    """``llama_cpp.Llama`` with samplers that are freed when the next one is made.

    llama-cpp-python makes a sampler chain for every generation (``Llama._init_sampler``) and drops the
    previous one, but its ``LlamaSampler`` sits in a reference cycle (the ``ExitStack`` callback that frees
    it closes over it), so the native chain, with its n_vocab-long candidate buffer (12 bytes a token:
    0.57 MB for SmolLM2's 49,152, 3 MB for Gemma 3's 262,144), lives on until Python's cyclic collector
    happens to run: measured +0.57 MB RSS per request on SmolLM2-135M, request after request. This
    subclass closes the previous sampler instead (nothing uses it once a new one is made: ``generate``
    replaces ``Llama._sampler`` and ``sample`` makes a temporary one only when there is none), and closes
    the last one with the model.
    """
    global _LLAMA_CLASS
    if _LLAMA_CLASS is None:
        import llama_cpp

        class Llama(llama_cpp.Llama):  # type: ignore[misc]
            _made_sampler: Any = None

            def _init_sampler(self, *args: Any, **kwargs: Any) -> Any:
                self._close_made_sampler()
                self._made_sampler = super()._init_sampler(*args, **kwargs)
                return self._made_sampler

            def _close_made_sampler(self) -> None:
                sampler, self._made_sampler = self._made_sampler, None
                if sampler is not None:
                    sampler.close()

            def close(self) -> None:
                self._sampler = None
                self._close_made_sampler()
                super().close()

        _LLAMA_CLASS = Llama
    return _LLAMA_CLASS


class PromptCache:
    """llama-cpp-python's RAM prompt cache (``llama_cpp.LlamaRAMCache``'s interface, set with
    ``Llama.set_cache``: states looked up by longest token prefix, least recently used dropped first), with
    a byte budget that counts everything a state holds, and one partition per ``namespace`` (the LoRA
    adapter set the state was computed with: a state never crosses adapters).

    The logits rows llama-cpp-python copies into every state are kept only for a model that keeps all
    logits (``logits_all``, for logprobs); otherwise one row stands for them (they are not read: llama.cpp
    samples from its own logits), so a state costs its KV cache, not a batch of vocabulary-wide rows."""

    def __init__(self, capacity_bytes: int, *, keep_scores: bool = False):
        from collections import OrderedDict

        self.capacity_bytes = int(capacity_bytes)
        self.cache_state: OrderedDict[tuple[tuple[Any, ...], tuple[int, ...]], Any] = OrderedDict()
        self.namespace: tuple[Any, ...] = ()
        self.keep_scores = keep_scores
        self._bytes = 0
        self.hits = 0

    @staticmethod
    def _state_bytes(state: Any) -> int:
        return int(state.llama_state_size) + int(state.scores.nbytes) + int(state.input_ids.nbytes)

    @property
    def cache_size(self) -> int:
        return self._bytes

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> Any:
        from llama_cpp import Llama

        best, best_len = None, 0
        for ns, k in self.cache_state:
            if ns == self.namespace:
                n = Llama.longest_token_prefix(k, key)
                if n > best_len:
                    best, best_len = (ns, k), n
        return best

    def __getitem__(self, key: Sequence[int]) -> Any:
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("no cached prefix")
        self.cache_state.move_to_end(found)
        self.hits += 1
        return self.cache_state[found]

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: Any) -> None:
        if not self.keep_scores and value.scores.shape[0] > 1:
            value.scores = value.scores[-1:].copy()  # broadcast over the rows on load; never read
        size = self._state_bytes(value)
        k = (self.namespace, tuple(key))
        old = self.cache_state.pop(k, None)
        if old is not None:
            self._bytes -= self._state_bytes(old)
        if size > self.capacity_bytes:
            return  # larger than the whole budget: not kept
        self.cache_state[k] = value
        self._bytes += size
        while self._bytes > self.capacity_bytes and self.cache_state:
            _, dropped = self.cache_state.popitem(last=False)
            self._bytes -= self._state_bytes(dropped)


POOLING_TYPES = {"none": "LLAMA_POOLING_TYPE_NONE", "mean": "LLAMA_POOLING_TYPE_MEAN"}
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
"""KV cache types llama.cpp takes for ``type_k``/``type_v`` (llama-server's --cache-type-k/-v)."""


def kv_cache_type(name: str) -> int:
    """The ggml type id of a KV cache type name (``q8_0`` → GGML_TYPE_Q8_0)."""
    import llama_cpp

    key = str(name).strip().lower()
    if key not in KV_CACHE_TYPES:
        raise InputError(f"unknown KV cache type {name!r}: choose one of {', '.join(KV_CACHE_TYPES)}")
    return int(getattr(llama_cpp, f"GGML_TYPE_{key.upper()}"))


def check_kv_types(path: Path, type_k: str | None = None, type_v: str | None = None) -> None:
    """Refuse (:class:`InputError`, one line) KV cache types llama.cpp cannot use for this GGUF."""
    meta = _header(path)
    for which, value in (("type_k", type_k), ("type_v", type_v)):
        if value is not None:
            kv_cache_type(value)
            _check_kv_block(path, meta, which, str(value).lower())


def _check_kv_block(path: Path, meta: dict[str, Any], which: str, name: str) -> None:
    """A quantized KV cache stores each head's vector in blocks of 32: refuse a model whose heads are not
    a multiple of that in one line (llama.cpp only logs why it cannot make the context)."""
    if name in ("f32", "f16", "bf16"):
        return
    arch = meta.get("general.architecture")

    def get(key: str) -> int | None:
        v = meta.get(f"{arch}.{key}")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    key = "attention.key_length" if which == "type_k" else "attention.value_length"
    head = get(key) or (n_embd // n_head if n_embd and n_head else None)
    if head is not None and head % 32:
        option = "--cache-type-k" if which == "type_k" else "--cache-type-v"
        raise InputError(
            f"{option} {name}: {path.name} has attention heads of {head} values, and a {name} cache "
            "stores them in blocks of 32: use f16 (or bf16, f32) for this model"
        )


def check_chat_templates(path: Path, meta: dict[str, Any] | None = None) -> None:
    """Refuse (:class:`~gguf_factory.errors.TemplateError`) a GGUF whose chat template, or any named one
    (``tokenizer.chat_template.<name>``), does not parse, reaches out of the sandbox, loops or explodes on
    the probe conversations ``validate`` uses, rendered in a bounded worker before llama-cpp-python
    compiles it in this process. BOS/EOS are placeholders here: the token texts are not in the header scan."""
    meta = _header(path) if meta is None else meta
    for key, value in meta.items():
        if (key == TEMPLATE_KEY or key.startswith(TEMPLATE_KEY + ".")) and isinstance(value, str):
            require_safe_template(value, f"{path}: {key}")


def _header(path: Path) -> dict[str, Any]:
    from ..gguf_header import scan_gguf_header  # header only: fast even with a 262 k-token vocabulary

    try:
        meta, _ = scan_gguf_header(path)
    except InputError as e:
        raise ModelError(f"cannot read GGUF metadata of {path}: {e}") from e
    return meta


def read_context_length(path: Path) -> int | None:
    """The trained context length stored in the GGUF (``<arch>.context_length``), or None."""
    return read_context_lengths(path)[1]


def read_context_lengths(path: Path) -> tuple[int | None, int | None]:
    """(recommended ``gguf_factory.context_length``, trained ``<arch>.context_length``); None if absent."""
    return _context_lengths(path, _header(path))


def _context_lengths(path: Path, meta: dict[str, Any]) -> tuple[int | None, int | None]:
    def int_field(key: str) -> int | None:
        value = meta.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{path}: metadata {key} is not an integer")
        return value if value > 0 else None

    recommended = int_field(RECOMMENDED_CTX_KEY)
    arch = meta.get("general.architecture")
    trained = int_field(f"{arch}.context_length") if isinstance(arch, str) else None
    return recommended, trained
