"""What every quality scorer shares, below them all: which replies of a held-out conversation are scored,
the bytes each is charged for, where its tokens lie, and the tally of bits into :class:`BitsPerByte`.

:mod:`gguf_factory.evaluate` (GGUFs and Hugging Face folders), :mod:`gguf_factory.bench` and the Bi-LSTM
baseline (:mod:`gguf_factory.baseline.lstm`) import these from here; :mod:`gguf_factory.evaluate`
re-exports them. The definitions are in :mod:`gguf_factory.evaluate`'s docstring.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, InputError, ModelError

LN2 = math.log(2)


@dataclass
class BitsPerByte:
    """Bits per UTF-8 byte of the held-out reference replies, teacher-forced (see the module docstring)."""

    bits: float
    """Negative log2-likelihood of the scored replies' tokens, their end of turn included."""
    bytes: int
    """UTF-8 bytes of the scored replies' text (:func:`reply_bytes`)."""
    bpb: float
    """``bits / bytes``: the figure to compare."""
    n_replies: int
    n_tokens: int
    """Scored tokens (the system's own: subwords, or the LSTM's words), end-of-turn tokens included."""
    end_bits: float = 0.0
    """Of :attr:`bits`, those of the end-of-turn tokens."""
    n_end_tokens: int = 0
    bpb_reply_only: float = 0.0
    """``(bits - end_bits) / bytes``: the reply's own tokens only."""
    skipped_replies: int = 0
    """Replies of the data not scored (cut by the context, or a template that failed): bytes left out."""
    system: str = ""
    kind: str = ""
    """``gguf`` (llama.cpp), ``hf`` (transformers) or ``lstm`` (the seq2seq baseline)."""
    data_path: str = ""
    n_words: int = 0
    """LSTM only: words of the scored replies."""
    n_oov: int = 0
    """LSTM only: of them, out of its vocabulary (each charged p(<unk>) and then its spelling)."""
    oov_bits: float = 0.0
    """LSTM only: bits spent spelling the out-of-vocabulary words (in :attr:`bits`)."""
    case_space_bits: float = 0.0
    """LSTM only: bits spent on letter case and whitespace, which its words leave out (in :attr:`bits`)."""
    fallback_replies: int = 0
    """LSTM only: replies its words cannot represent, charged as raw bytes (log2(257) bits a byte, + 1)."""

    @property
    def oov_rate(self) -> float:
        return self.n_oov / self.n_words if self.n_words else 0.0


def reply_bytes(text: str) -> int:
    """The bytes a reply is charged for: its text's UTF-8 bytes, as written in the data."""
    return len(text.encode("utf-8"))


def scored_replies(messages: Sequence[dict[str, str]]) -> list[int]:
    """Indices of the messages whose bits per byte every system scores: the non-blank assistant turns."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]


class BitsTally:
    """Sums of bits, bytes and tokens over replies, into a :class:`BitsPerByte`."""

    def __init__(self) -> None:
        self.bits = self.end_bits = 0.0
        self.bytes = self.replies = self.tokens = self.end_tokens = 0

    def add(self, bits: float, end_bits: float, n_tokens: int, n_end: int, n_bytes: int) -> None:
        self.bits += bits + end_bits
        self.end_bits += end_bits
        self.tokens += n_tokens + n_end
        self.end_tokens += n_end
        self.bytes += n_bytes
        self.replies += 1

    def add_conversation(self, enc: EncodedConversation, nll: np.ndarray) -> None:
        """Add the replies of ``enc`` that lie whole in its (possibly truncated) ids; ``nll``: nats of
        each of ``enc.targets``."""
        per_position = np.full(len(enc.ids), np.nan)
        per_position[enc.targets] = nll
        for r in enc.replies:
            if r.start < 1 or r.end > len(enc.ids):
                continue
            reply, end = per_position[r.start : r.content_end], per_position[r.content_end : r.end]
            self.add(float(reply.sum()) / LN2, float(end.sum()) / LN2, reply.size, end.size, r.n_bytes)

    def result(
        self, total_replies: int, system: str = "", kind: str = "", data_path: str = ""
    ) -> BitsPerByte:
        if not self.bytes:
            raise DataError(f"{data_path or 'the data'}: no reply left to score for bits per byte")
        if not math.isfinite(self.bits):
            raise ModelError(f"{system}: non-finite log-likelihood on the reference replies")
        return BitsPerByte(
            bits=self.bits, bytes=self.bytes, bpb=self.bits / self.bytes, n_replies=self.replies,
            n_tokens=self.tokens, end_bits=self.end_bits, n_end_tokens=self.end_tokens,
            bpb_reply_only=(self.bits - self.end_bits) / self.bytes,
            skipped_replies=total_replies - self.replies, system=system, kind=kind, data_path=data_path,
        )  # fmt: skip


@dataclass
class ReplySpan:
    """Where one scored reply's tokens lie in :attr:`EncodedConversation.ids`."""

    message: int
    start: int
    content_end: int
    """Tokens ``start:content_end`` are the reply's text, ``content_end:end`` its end of turn."""
    end: int
    n_bytes: int


@dataclass
class EncodedConversation:
    ids: list[int]
    targets: np.ndarray
    """Positions (>= 1) whose token is scored; predicted by the logits at position - 1."""
    replies: list[ReplySpan] = field(default_factory=list)
    """The replies that count for bits per byte (:func:`scored_replies`)."""

    def truncate(self, n_ctx: int) -> bool:
        """Keep the first ``n_ctx`` tokens; True if some were cut."""
        if len(self.ids) <= n_ctx:
            return False
        self.ids = self.ids[:n_ctx]
        self.targets = self.targets[self.targets < n_ctx]
        return True


def read_eval_conversations(
    data: str | os.PathLike[str], limit: int | None = None
) -> tuple[Path, list[list[dict[str, str]]]]:
    """The conversations of a chat file (or of ``test.jsonl`` in a dataset folder written by ``prepare``)."""
    from .data import read_chat_file

    p = Path(data)
    if p.is_dir():
        p = p / "test.jsonl"
        if not p.is_file():
            raise InputError(
                f"no test.jsonl in dataset folder {data} (write one with `gguf-factory prepare`)"
            )
    result = read_chat_file(p)
    convs = [[{"role": m.role, "content": m.content} for m in c.messages] for c in result.conversations]
    convs = [c for c in convs if any(m["role"] == "assistant" for m in c)]
    if not convs:
        raise DataError(f"{p}: no conversation has an assistant turn to score")
    if limit is not None:
        if limit <= 0:
            raise InputError(f"limit must be positive, got {limit}")
        convs = convs[:limit]
    return p, convs
