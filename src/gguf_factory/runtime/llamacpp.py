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

    def close(self) -> None:
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
) -> LlamaCppChatModel:
    """Load a GGUF file into llama.cpp.

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
    quiet = contextlib.nullcontext() if verbose else _quiet_stderr()
    try:
        with quiet:
            llm = llama_cpp.Llama(
                model_path=str(p),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                seed=seed,
                verbose=verbose,
                **lora,
            )
    except ValueError as e:  # llama-cpp-python raises ValueError when llama.cpp fails to load
        with_lora = f" with the LoRA adapter {lora_path}" if lora_path else ""
        raise ModelError(f"llama.cpp could not load {p}{with_lora}: {e}") from e
    return LlamaCppChatModel(p, llm, llm.n_ctx())


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
