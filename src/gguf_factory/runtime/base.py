"""The ChatModel interface shared by the llama.cpp and transformers backends, and their common settings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

DEFAULT_CTX = 2048
Messages = Sequence[dict[str, str]]


@dataclass
class GenerationSettings:
    max_tokens: int = 128
    temperature: float = 0.0  # greedy by default: small chat models babble when sampled hot
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05  # llama-cpp-python's default, made explicit so both backends sample alike
    repeat_penalty: float = 1.1
    seed: int | None = None


class ChatModel:
    """A loaded chat model, whichever engine runs it. Use :func:`gguf_factory.runtime.load` to make one.

    ``tokenize``/``detokenize``/``logits``/``generate_tokens`` work on the model's own token ids;
    ``chat`` applies the model's own chat template.
    """

    backend: str = ""
    path: Path
    n_ctx: int
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return self.metadata.get("general.name") or self.path.stem

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def chat(self, messages: Messages, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        """Answer ``messages`` (OpenAI-style dicts) with the model's own chat template.

        Returns the reply text (stripped), or an iterator of text pieces when ``stream=True``.
        """
        raise NotImplementedError

    def generate(self, prompt: str, *, stream: bool = False, **settings: Any) -> str | Iterator[str]:
        """Continue ``prompt`` as plain text (no chat template)."""
        raise NotImplementedError

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The token ids of ``messages`` rendered with the chat template, ready for the assistant's turn."""
        raise NotImplementedError

    def generate_tokens(self, ids: Sequence[int], **settings: Any) -> Iterator[int]:
        """Yield the ids of the tokens generated after ``ids``, one at a time as soon as each is chosen;
        stops before an end-of-generation token, at ``max_tokens`` or at the end of the context."""
        raise NotImplementedError

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def logits(self, text_or_ids: str | Sequence[int], *, add_bos: bool = False) -> np.ndarray:
        """Next-token logits after each position: float32 array of shape (number of tokens, vocabulary).

        A string is tokenized with special tokens parsed (``<|im_start|>`` is one token).
        """
        raise NotImplementedError

    def embed(self, inputs: Sequence[str | Sequence[int]], *, normalize: bool = True) -> np.ndarray:
        """Mean-pooled embeddings, one row per input (float32, L2-normalized unless ``normalize=False``)."""
        raise NotImplementedError

    def is_end_of_generation(self, token: int) -> bool:
        """True for the tokens that end a reply (EOS, end-of-turn, ...)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers for the backends -----------------------------------------------------------------
    def _ids_for_logits(self, text_or_ids: str | Sequence[int], add_bos: bool) -> list[int]:
        if isinstance(text_or_ids, str):
            ids = self.tokenize(text_or_ids, special=True, add_bos=add_bos)
        else:
            ids = [int(t) for t in text_or_ids]
        if not ids:
            raise InputError("logits: no tokens to evaluate")
        if len(ids) > self.n_ctx:
            raise InputError(f"logits: {len(ids)} tokens do not fit the context of {self.n_ctx}")
        return ids


def check_messages(messages: Messages) -> None:
    if not messages:
        raise InputError("no messages to answer")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"message {i}: unknown role {m['role']!r}")
