"""Load a GGUF into llama.cpp (through llama-cpp-python) behind one small ChatModel interface.

This module imports neither torch nor transformers: a process that only chats stays small.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, ModelError
from .files import require_file

log = logging.getLogger(__name__)

DEFAULT_CTX = 2048
Messages = Sequence[dict[str, str]]


@dataclass
class GenerationSettings:
    max_tokens: int = 128
    temperature: float = 0.0  # greedy by default: small chat models babble when sampled hot
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None


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


class ChatModel:
    """A GGUF model loaded in llama.cpp. Use :func:`load` to make one."""

    def __init__(self, path: Path, llm: Any, n_ctx: int):
        self.path = path
        self.llm = llm
        self.n_ctx = n_ctx
        self.metadata: dict[str, str] = dict(getattr(llm, "metadata", {}) or {})

    @property
    def name(self) -> str:
        return self.metadata.get("general.name") or self.path.stem

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    # --- chat -------------------------------------------------------------------------------------
    def chat(self, messages: Messages, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        """Answer ``messages`` (OpenAI-style dicts) with the GGUF's own chat template.

        Returns the reply text, or an iterator of text pieces when ``stream=True``.
        """
        _check_messages(messages)
        s = GenerationSettings(**settings)
        out = self.llm.create_chat_completion(
            messages=[dict(m) for m in messages],
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed,
            stream=stream,
        )
        if stream:
            return _chat_pieces(out)
        return (out["choices"][0]["message"].get("content") or "").strip()

    # --- raw completion ---------------------------------------------------------------------------
    def generate(self, prompt: str, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        """Continue ``prompt`` as plain text (no chat template)."""
        s = GenerationSettings(**settings)
        out = self.llm.create_completion(
            prompt=prompt,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repeat_penalty=s.repeat_penalty,
            seed=s.seed,
            stream=stream,
        )
        if stream:
            return (chunk["choices"][0]["text"] for chunk in out)
        return out["choices"][0]["text"]

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def is_end_of_generation(self, token: int) -> bool:
        """True for the tokens that end a reply (EOS, end-of-turn, ...), as llama.cpp's vocab marks them."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chat_pieces(chunks: Any) -> Iterator[str]:
    for chunk in chunks:
        piece = chunk["choices"][0].get("delta", {}).get("content")
        if piece:
            yield piece


def _check_messages(messages: Messages) -> None:
    if not messages:
        raise InputError("no messages to answer")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"message {i}: unknown role {m['role']!r}")


def load(
    path: str | os.PathLike[str],
    *,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    seed: int = 1234,
    verbose: bool = False,
) -> ChatModel:
    """Load a GGUF file into llama.cpp.

    ``n_ctx`` defaults to the recommended context stored by ``quantize`` (``gguf_factory.context_length``,
    set by a use-case profile), else to min(the model's trained context, 2048).
    """
    import llama_cpp

    p = require_file(path, "model file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"not a GGUF file: {p}")
    threads = n_threads or os.cpu_count() or 1
    if n_ctx is None:
        recommended, trained = read_context_lengths(p)
        if recommended:
            n_ctx = recommended
        else:
            n_ctx = min(trained, DEFAULT_CTX) if trained else DEFAULT_CTX
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
            )
    except ValueError as e:  # llama-cpp-python raises ValueError when llama.cpp fails to load
        raise ModelError(f"llama.cpp could not load {p}: {e}") from e
    return ChatModel(p, llm, llm.n_ctx())


RECOMMENDED_CTX_KEY = "gguf_factory.context_length"  # written by quantize (profiles, --ctx)


def read_context_length(path: Path) -> int | None:
    """The trained context length stored in the GGUF (``<arch>.context_length``), or None."""
    return read_context_lengths(path)[1]


def read_context_lengths(path: Path) -> tuple[int | None, int | None]:
    """(recommended ``gguf_factory.context_length``, trained ``<arch>.context_length``); None if absent."""
    from .quantize import scan_gguf_header  # header only: fast even with a 262 k-token vocabulary

    try:
        meta, _ = scan_gguf_header(path)
    except InputError as e:
        raise ModelError(f"cannot read GGUF metadata of {path}: {e}") from e

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
