"""Quality of a (quantized) GGUF, from llama.cpp logits: perplexity on assistant turns, KL divergence and
top-1 agreement against a reference GGUF (usually the F16 the quant was made from).

Each test conversation is rendered with the model's own chat template (``tokenizer.chat_template`` in the
GGUF) and tokenized by llama.cpp. The loss is taken on the assistant turns only, exactly the spans training
learns: a turn starts where the conversation before it, rendered with the generation prompt, ends, and it
ends where the conversation through it ends, less trailing whitespace (ChatML's ``<|im_end|>`` is scored,
the newline after it is not). Every scored token is predicted from the logits one position earlier:

* perplexity = exp(mean negative log-likelihood of the scored tokens);
* KL divergence KL(P_ref || P_model) of the full next-token distributions, per scored position: mean,
  99th percentile and maximum;
* top-1 agreement: how often both models rank the same token first.

All models are loaded side by side and fed the same token ids; the reference is evaluated once per
conversation whatever the number of models (what :func:`gguf_factory.ladder.ladder` relies on).

Bits per byte (:func:`bits_per_byte`) is the one quality figure that compares any two chat systems, whatever
their tokenizers: the negative log2-likelihood of the held-out reference replies, teacher-forced, each
system under its own chat template and tokenizer, divided by the UTF-8 bytes of those replies' text.

* Which bytes: every assistant turn of the test conversations whose text is not blank
  (:func:`scored_replies`), ``len(content.encode("utf-8"))`` (:func:`reply_bytes`), the same for every
  system. A reply is conditioned on the conversation before it, reference replies included.
* Which tokens: the reply's own tokens, and the tokens its template puts after it inside the turn (the
  end-of-turn marker, ChatML's ``<|im_end|>``; the LSTM's ``<eos>``). The end of turn is counted in
  :attr:`BitsPerByte.bpb`, because every system must also say where its reply ends;
  :attr:`BitsPerByte.bpb_reply_only` leaves it out.
* A GGUF is scored from llama.cpp logits in the same pass as its perplexity, a Hugging Face folder from
  transformers logits with the tokenizer's own chat template; the Bi-LSTM baseline by
  :func:`gguf_factory.baseline.lstm.lstm_bits_per_byte` (which also charges what a lower-cased word model
  cannot predict: see there). A reply cut by the context is left out (its bytes too) and counted in
  :attr:`BitsPerByte.skipped_replies`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, InputError, ModelError
from .files import atomic_write_json, atomic_write_text, human_size, require_file
from .runtime.templates import ChatTemplate as BoundedChatTemplate
from .scoring import (  # noqa: F401  (re-exported: their home was here)
    LN2,
    BitsPerByte,
    BitsTally,
    EncodedConversation,
    ReplySpan,
    read_eval_conversations,
    reply_bytes,
    scored_replies,
)
from .splitset import set_size
from .turns import assistant_spans

log = logging.getLogger(__name__)

REPLY_TOKENS = 48
"""Length limit of the greedy replies compared by ``replies=``."""
MAX_EVAL_CTX = 4096
"""Default cap on the evaluation context: logits for every position cost n_ctx x n_vocab floats per model."""


# --------------------------------------------------------------------------------------------- results


@dataclass
class ModelScores:
    path: str
    name: str
    size_bytes: int
    n_tokens: int
    """Scored (assistant) tokens."""
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    perplexity: float
    kld_mean: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1: float | None = None
    """Fraction of scored positions where this model's top token is the reference's."""
    delta_ppl: float | None = None
    """(PPL - PPL_ref) / PPL_ref, a fraction."""
    reply_similarity: float | None = None
    """Mean character similarity of greedy replies to the reference model's replies (0..1)."""
    same_reply: float | None = None
    """Fraction of held-out prompts answered exactly as the reference model answers them."""
    answer_similarity: float | None = None
    """Mean character similarity of greedy replies to the data's own answers (0..1)."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """A few greedy replies with the data's answers, for reading."""
    bits_per_byte: BitsPerByte | None = None
    """Bits per byte of the reference replies (the end of turn counted), from the same logits."""


@dataclass
class EvalResult:
    data_path: str
    n_conversations: int
    n_tokens: int
    n_ctx: int
    models: list[ModelScores]
    reference: ModelScores | None = None
    skipped: int = 0
    """Conversations without a scorable assistant turn (or whose template failed)."""
    truncated: int = 0
    seconds: float = 0.0
    n_replies: int = 0
    """Held-out prompts answered greedily by every model (reply similarity)."""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, title: str = "Quality evaluation") -> str:
        lines = [f"# {title}", ""]
        lines.append(
            f"Data: `{self.data_path}`: {self.n_conversations} conversations, {self.n_tokens} scored "
            f"assistant tokens (context {self.n_ctx}; {self.skipped} skipped, {self.truncated} truncated)."
        )
        if self.reference is not None:
            lines.append(f"Reference: `{self.reference.name}` (PPL {self.reference.perplexity:.4f}).")
        replies = self.n_replies > 0
        head = "| model | size | PPL | bits/byte | ΔPPL % | mean KLD | p99 KLD | top-1 % |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
        if replies:
            head += " reply sim % | same reply % | answer sim % |"
            rule += "---:|---:|---:|"
        lines += ["", head, rule]
        for m in ([self.reference] if self.reference else []) + self.models:
            row = (
                f"| {m.name} | {human_size(m.size_bytes)} | {m.perplexity:.4f} | {_fmt_bpb(m)} | "
                f"{_fmt(m.delta_ppl, 100, '+.2f')} | "
                f"{_fmt(m.kld_mean, 1, '.4g')} | {_fmt(m.kld_p99, 1, '.4g')} | {_fmt(m.top1, 100, '.2f')} |"
            )
            if replies:
                row += (
                    f" {_fmt(m.reply_similarity, 100, '.1f')} | {_fmt(m.same_reply, 100, '.1f')} | "
                    f"{_fmt(m.answer_similarity, 100, '.1f')} |"
                )
            lines.append(row)
        if replies:
            lines.append(
                f"\nReplies: greedy answers to {self.n_replies} held-out prompts; similarity is difflib's "
                "character ratio to the reference model's reply (reply sim) and to the data's answer "
                "(answer sim)."
            )
        bpb = next((m.bits_per_byte for m in self.models if m.bits_per_byte), None)
        if bpb is not None:
            lines.append(
                f"\nBits/byte: bits of the {bpb.n_replies} reference replies' tokens, end of turn included, "
                f"per UTF-8 byte of their text ({bpb.bytes} bytes; {bpb.skipped_replies} replies cut by the "
                "context left out)."
            )
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        lines.append(f"\n{self.seconds:.1f} s, llama.cpp logits through llama-cpp-python.")
        return "\n".join(lines) + "\n"


def _fmt(v: float | None, scale: float, spec: str) -> str:
    return "–" if v is None else format(v * scale, spec)


def _fmt_bpb(m: ModelScores) -> str:
    return _fmt(m.bits_per_byte.bpb if m.bits_per_byte else None, 1, ".4f")


def write_report(
    result: EvalResult, path: str | os.PathLike[str], title: str = "Quality evaluation"
) -> tuple[Path, Path]:
    """Write ``<path>.md`` and ``<path>.json`` (a ``.md`` / ``.json`` suffix on ``path`` is dropped)."""
    p = Path(path)
    if p.suffix.lower() in (".md", ".json"):
        p = p.with_suffix("")
    md, js = p.with_name(p.name + ".md"), p.with_name(p.name + ".json")
    atomic_write_json(js, result.to_json())
    atomic_write_text(md, result.to_markdown(title))
    return md, js


# --------------------------------------------------------------------------------------------- data


# The GGUF's chat template, rendered the way transformers' ``apply_chat_template`` does, bounded (a worker
# process with a time, CPU and memory limit; checked on the probe conversations when made).
ChatTemplate = BoundedChatTemplate


def assistant_segments(template: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, scored) pieces; scored pieces are the assistant turns."""
    return [(text, kind != "context") for text, kind, _ in _turn_pieces(template, messages)]


def _turn_pieces(template: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, str, int]]:
    """The rendered conversation as (text, kind, message index) pieces: kind ``context``, ``reply`` (an
    assistant turn up to the end of its text) or ``end`` (what its template puts after the text inside
    the turn: the end-of-turn marker). A turn whose text its template rewrote is all ``reply``."""
    full, spans = assistant_spans(template.render, messages, getattr(template, "eos_token", None))
    pieces: list[tuple[str, str, int]] = []
    pos = 0
    for i, a, b in spans:
        if a > pos:
            pieces.append((full[pos:a], "context", -1))
        span, content = full[a:b], messages[i]["content"]
        k = span.find(content) if content else -1
        cut = k + len(content) if k >= 0 else len(span)
        pieces.append((span[:cut], "reply", i))
        if cut < len(span):
            pieces.append((span[cut:], "end", i))
        pos = b
    if pos < len(full):
        pieces.append((full[pos:], "context", -1))
    return pieces


def encode(
    llm: Any, template: ChatTemplate, messages: Sequence[dict[str, str]]
) -> EncodedConversation | None:
    """Tokenize with llama.cpp, piece by piece (BOS added as the model's vocabulary asks)."""
    return encode_with(
        lambda text, first: list(llm.tokenize(text.encode("utf-8"), add_bos=first, special=True)),
        template,
        messages,
    )


def encode_with(
    tokenize: Callable[[str, bool], list[int]], template: Any, messages: Sequence[dict[str, str]]
) -> EncodedConversation | None:
    """Render ``messages`` with ``template`` and tokenize it piece by piece with ``tokenize(text, first)``
    (special tokens parsed; ``first``: the piece that starts the text, where a BOS goes). None when no
    assistant token can be scored."""
    ids: list[int] = []
    targets: list[int] = []
    spans: dict[int, list[int]] = {}
    for k, (text, kind, i) in enumerate(_turn_pieces(template, messages)):
        seg = tokenize(text, k == 0)
        if kind != "context":
            targets += range(len(ids), len(ids) + len(seg))
        if kind == "reply":
            spans[i] = [len(ids), len(ids) + len(seg), len(ids) + len(seg)]
        elif kind == "end":
            spans[i][2] = len(ids) + len(seg)
        ids += seg
    t = np.array([i for i in targets if i >= 1], dtype=np.int64)
    if not t.size:
        return None
    replies = [
        ReplySpan(i, *spans[i], n_bytes=reply_bytes(messages[i]["content"]))
        for i in scored_replies(messages)
        if i in spans and spans[i][1] > spans[i][0]
    ]
    return EncodedConversation(ids, t, replies)


# --------------------------------------------------------------------------------------------- models


def _load_llama(path: Path, n_ctx: int, threads: int, *, vocab_only: bool = False) -> Any:
    import llama_cpp

    from .runtime import _quiet_stderr
    from .runtime.llamacpp import check_chat_templates

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"not a GGUF file: {path}")
    check_chat_templates(path)  # bounded, before llama-cpp-python compiles the template in this process
    try:
        with _quiet_stderr():
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=min(n_ctx, 512),
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                logits_all=not vocab_only,
                vocab_only=vocab_only,
                verbose=False,
            )
    except ValueError as e:
        raise ModelError(f"llama.cpp could not load {path}: {e}") from e


def _template_of(llm: Any, path: Path) -> ChatTemplate:
    meta = dict(getattr(llm, "metadata", {}) or {})
    source = meta.get("tokenizer.chat_template")
    if not source:
        raise ModelError(
            f"{path} has no chat template (tokenizer.chat_template): cannot find assistant turns"
        )

    def text_of(tok: int) -> str:
        return llm.detokenize([tok], special=True).decode("utf-8", errors="replace") if tok >= 0 else ""

    return ChatTemplate(source, bos_token=text_of(llm.token_bos()), eos_token=text_of(llm.token_eos()))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def _label(path: Path) -> str:
    return path.stem


def evaluate(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    ref: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    replies: int = 0,
) -> EvalResult:
    """Perplexity of ``model`` on the assistant turns of ``data``; with ``ref``, also KLD and top-1."""
    return evaluate_many([model], data, ref=ref, limit=limit, n_ctx=n_ctx, threads=threads, replies=replies)


def evaluate_many(
    models: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str],
    *,
    ref: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    labels: Sequence[str] | None = None,
    replies: int = 0,
    reply_tokens: int = REPLY_TOKENS,
) -> EvalResult:
    """Evaluate several GGUFs of one model family (same vocabulary) on the same tokens.

    ``replies``: also answer the first ``replies`` held-out prompts greedily with every model and compare
    the replies (character similarity) with the reference model's and with the data's own answers.
    """
    if not models:
        raise InputError("no model to evaluate")
    if replies < 0 or reply_tokens <= 0:
        raise InputError("replies must be >= 0 and reply_tokens > 0")
    paths = [require_file(m, "model file") for m in models]
    ref_path = require_file(ref, "reference model") if ref is not None else None
    data_path, convs = read_eval_conversations(data, limit)
    threads = threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    # tokenize once, with the vocabulary of the reference (or of the first model)
    base = ref_path or paths[0]
    tok = _tokenize_conversations(base, data_path, convs, threads, n_ctx, replies, reply_tokens)
    encoded, prompts, ctx = tok.encoded, tok.prompts, tok.n_ctx

    with contextlib.ExitStack() as stack:
        ref_llm = None
        if ref_path is not None:
            ref_llm = _load_llama(ref_path, ctx, threads)
            stack.callback(ref_llm.close)
        llms = []
        for p in paths:
            llm = _load_llama(p, ctx, threads)
            stack.callback(llm.close)
            _check_family(llm, p, base, tok)
            llms.append(llm)
        n_replies = sum(len(scored_replies(c)) for c in convs)
        reference, out, n_tok = _score(paths, ref_path, llms, ref_llm, encoded, labels, n_replies, data_path)
        if prompts:
            _compare_replies(prompts, llms, ref_llm, out, reference, reply_tokens)

    return EvalResult(
        data_path=str(data_path),
        n_conversations=len(encoded),
        n_tokens=n_tok,
        n_ctx=ctx,
        models=out,
        reference=reference,
        skipped=tok.skipped,
        truncated=tok.truncated,
        seconds=time.perf_counter() - t0,
        n_replies=len(prompts),
    )


@dataclass
class _Tokenized:
    encoded: list[EncodedConversation]
    prompts: list[tuple[list[int], str]]
    probe: bytes
    probe_ids: list[int]
    vocab_size: int
    n_ctx: int
    skipped: int
    truncated: int


def _tokenize_conversations(
    base: Path,
    data_path: Path,
    convs: Sequence[Sequence[dict[str, str]]],
    threads: int,
    n_ctx: int | None,
    replies: int = 0,
    reply_tokens: int = REPLY_TOKENS,
) -> _Tokenized:
    """Render and tokenize ``convs`` with ``base``'s template and vocabulary; pick the context to use."""
    vocab = _load_llama(base, 512, threads, vocab_only=True)
    try:
        template = _template_of(vocab, base)
        encoded: list[EncodedConversation] = []
        prompts: list[tuple[list[int], str]] = []
        probe = b""
        skipped = 0
        for msgs in convs:
            try:
                enc = encode(vocab, template, msgs)
                if enc is not None and len(prompts) < replies:
                    prompts.append(_prompt(vocab, template, msgs))
                if enc is not None and not probe:
                    probe = template.render(msgs, False).encode("utf-8")
            except Exception as e:  # one conversation the template cannot render should not stop the run
                log.debug("skipping a conversation: %s", e)
                enc = None
            if enc is None:
                skipped += 1
            else:
                encoded.append(enc)
        if not encoded:
            raise DataError(
                f"{data_path}: no conversation left to score after rendering with the chat template"
            )
        probe_ids = list(vocab.tokenize(probe, add_bos=False, special=True))
        vocab_size = vocab.n_vocab()
    finally:
        vocab.close()

    from .runtime import read_context_lengths

    trained = read_context_lengths(base)[1]
    cap = n_ctx or min(trained or MAX_EVAL_CTX, MAX_EVAL_CTX)
    longest = max([len(e.ids) for e in encoded] + [len(ids) + reply_tokens for ids, _ in prompts])
    ctx = max(8, min(cap, longest))
    truncated = sum(e.truncate(ctx) for e in encoded)
    encoded = [e for e in encoded if e.targets.size]
    prompts = [(ids, answer) for ids, answer in prompts if len(ids) < ctx]
    if truncated:
        log.warning("%d conversations longer than the %d-token context were truncated", truncated, ctx)
    return _Tokenized(encoded, prompts, probe, probe_ids, vocab_size, ctx, skipped, truncated)


def _check_family(llm: Any, path: Path, base: Path, tok: _Tokenized) -> None:
    if llm.n_vocab() != tok.vocab_size:
        raise ModelError(f"{path} has a vocabulary of {llm.n_vocab()} tokens, {base} {tok.vocab_size}")
    if list(llm.tokenize(tok.probe, add_bos=False, special=True)) != tok.probe_ids:
        raise ModelError(f"{path} tokenizes differently from {base}: not the same model family")


@dataclass(frozen=True)
class KLDScore:
    kld_mean: float
    kld_p99: float
    top1: float
    n_tokens: int


class KLDScorer:
    """KL divergence of many variants of one model against a fixed reference, on the same tokens.

    The reference's log-probabilities are computed once and kept in memory (float32; conversations past
    ``max_bytes`` of them are dropped), so scoring a variant costs one pass of that variant alone: what
    auto-quant's per-tensor sensitivity probes need. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        ref: str | os.PathLike[str],
        data: str | os.PathLike[str],
        *,
        limit: int | None = None,
        threads: int | None = None,
        max_bytes: int = 512 * 2**20,
    ):
        self.ref_path = require_file(ref, "reference model")
        data_path, convs = read_eval_conversations(data, limit)
        self.threads = threads or os.cpu_count() or 1
        self._tok = _tokenize_conversations(self.ref_path, data_path, convs, self.threads, None)
        budget = max(1, max_bytes // (4 * self._tok.vocab_size))  # scored positions that fit
        kept: list[EncodedConversation] = []
        n = 0
        for enc in self._tok.encoded:
            if kept and n + enc.targets.size > budget:
                break
            kept.append(enc)
            n += int(enc.targets.size)
        self.encoded = kept
        self.n_tokens = n
        self._ref: list[np.ndarray] = []
        llm = _load_llama(self.ref_path, self._tok.n_ctx, self.threads)
        try:
            for enc in kept:
                llm.reset()
                llm.eval(enc.ids)
                self._ref.append(_log_softmax(llm.scores[enc.targets - 1]).astype(np.float32))
        finally:
            llm.close()

    def score(self, model: str | os.PathLike[str]) -> KLDScore:
        path = require_file(model, "model file")
        llm = _load_llama(path, self._tok.n_ctx, self.threads)
        try:
            _check_family(llm, path, self.ref_path, self._tok)
            klds: list[np.ndarray] = []
            agree = 0
            for enc, ref_lp in zip(self.encoded, self._ref, strict=True):
                llm.reset()
                llm.eval(enc.ids)
                lp = _log_softmax(llm.scores[enc.targets - 1])
                klds.append(np.maximum((np.exp(ref_lp) * (ref_lp - lp)).sum(axis=1), 0.0))
                agree += int((lp.argmax(axis=1) == ref_lp.argmax(axis=1)).sum())
        finally:
            llm.close()
        k = np.concatenate(klds)
        return KLDScore(float(k.mean()), float(np.percentile(k, 99)), agree / k.size, int(k.size))


def _score(
    paths: Sequence[Path],
    ref_path: Path | None,
    llms: Sequence[Any],
    ref_llm: Any,
    encoded: Sequence[EncodedConversation],
    labels: Sequence[str] | None,
    total_replies: int = 0,
    data_path: Path | None = None,
) -> tuple[ModelScores | None, list[ModelScores], int]:
    n_models = len(llms)
    nll = [0.0] * n_models
    ref_nll = 0.0
    tallies = [BitsTally() for _ in range(n_models)]
    ref_tally = BitsTally()
    klds: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    agree = [0] * n_models
    n_tok = 0
    for enc in encoded:
        rows = enc.targets - 1
        tgt = np.array(enc.ids, dtype=np.int64)[enc.targets]
        ref_lp = ref_p = ref_top = None
        if ref_llm is not None:
            ref_llm.reset()
            ref_llm.eval(enc.ids)
            ref_lp = _log_softmax(ref_llm.scores[rows])
            ref_tok = -ref_lp[np.arange(len(rows)), tgt]
            ref_nll += float(ref_tok.sum())
            ref_tally.add_conversation(enc, ref_tok)
            ref_p = np.exp(ref_lp)
            ref_top = ref_lp.argmax(axis=1)
        for j, llm in enumerate(llms):
            llm.reset()
            llm.eval(enc.ids)
            lp = _log_softmax(llm.scores[rows])
            tok = -lp[np.arange(len(rows)), tgt]
            nll[j] += float(tok.sum())
            tallies[j].add_conversation(enc, tok)
            if ref_lp is not None:
                k = np.maximum((ref_p * (ref_lp - lp)).sum(axis=1), 0.0)
                klds[j].append(k)
                agree[j] += int((lp.argmax(axis=1) == ref_top).sum())
        n_tok += len(rows)

    def scores(path: Path, total_nll: float, label: str, tally: BitsTally) -> ModelScores:
        mean = total_nll / n_tok
        s = ModelScores(
            path=str(path),
            name=label,
            size_bytes=set_size(path),  # every part of a split set
            n_tokens=n_tok,
            nll=mean,
            perplexity=math.exp(mean),
        )
        if tally.bytes:
            s.bits_per_byte = tally.result(total_replies, str(path), "gguf", str(data_path or ""))
        return s

    reference = scores(ref_path, ref_nll, _label(ref_path), ref_tally) if ref_path else None
    out: list[ModelScores] = []
    for j, p in enumerate(paths):
        s = scores(p, nll[j], labels[j] if labels else _label(p), tallies[j])
        if reference is not None:
            k = np.concatenate(klds[j])
            s.kld_mean = float(k.mean())
            s.kld_p99 = float(np.percentile(k, 99))
            s.kld_max = float(k.max())
            s.top1 = agree[j] / n_tok
            s.delta_ppl = (s.perplexity - reference.perplexity) / reference.perplexity
        out.append(s)
    return reference, out, n_tok


# --------------------------------------------------------------------------------------------- bits per byte

SYSTEM_KINDS = ("gguf", "hf", "lstm")


def system_kind(path: str | os.PathLike[str]) -> str:
    """``gguf`` for a GGUF file, ``lstm`` for a Bi-LSTM baseline folder, ``hf`` for another folder."""
    p = Path(path)
    if p.is_file():
        return "gguf"
    if p.is_dir():
        from .baseline.lstm import is_lstm_folder

        return "lstm" if is_lstm_folder(p) else "hf"
    raise InputError(f"model not found: {p}")


def bits_per_byte(
    system: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    kind: str | None = None,
    limit: int | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    train_data: str | os.PathLike[str] | None = None,
) -> BitsPerByte:
    """Bits per UTF-8 byte of the reference replies of ``data`` (a chat file, or a ``prepare`` folder's
    ``test.jsonl``), teacher-forced, under ``system``'s own chat template and tokenizer.

    ``system``: a GGUF (llama.cpp), a Hugging Face model folder (transformers) or a Bi-LSTM baseline folder
    (``kind`` defaults from the path: :func:`system_kind`); a named base or Hub id is resolved by
    :func:`gguf_factory.bases.resolve_gguf_or_folder`. ``limit``: the first N conversations;
    ``n_ctx``: context cap (default: trained, at most :data:`MAX_EVAL_CTX`). ``train_data`` (LSTM only):
    the training split its case, spacing and spelling charges are fitted on (default: the ``train.jsonl``
    beside the test split). Lower is better; comparable across tokenizers because bytes are the unit.
    """
    if not Path(system).exists():  # a named base or Hub id: its GGUF if it has one, else its HF folder
        from .bases import resolve_gguf_or_folder

        system = resolve_gguf_or_folder(system)
    kind = kind or system_kind(system)
    if kind not in SYSTEM_KINDS:
        raise InputError(f"unknown system kind {kind!r}: choose one of {', '.join(SYSTEM_KINDS)}")
    if train_data is not None and kind != "lstm":
        raise InputError("train_data is for the LSTM baseline only")
    if kind == "lstm":
        from .baseline.lstm import lstm_bits_per_byte

        return lstm_bits_per_byte(system, data, train_data=train_data, limit=limit, threads=threads)
    if kind == "hf":
        return _hf_bits_per_byte(system, data, limit=limit, n_ctx=n_ctx, threads=threads)
    r = evaluate_many([system], data, limit=limit, n_ctx=n_ctx, threads=threads)
    result = r.models[0].bits_per_byte
    if result is None:
        raise DataError(f"{r.data_path}: no reply left to score for bits per byte")
    return result


class _TokenizerTemplate:
    """A Hugging Face tokenizer's chat template, rendered by transformers (``apply_chat_template``)."""

    def __init__(self, tokenizer: Any, path: Path):
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(f"{path} has no chat template (tokenizer_config.json chat_template)")
        self.tokenizer = tokenizer
        self.eos_token = tokenizer.eos_token or ""

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=False
        )


def _hf_bits_per_byte(
    path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    limit: int | None,
    n_ctx: int | None,
    threads: int | None,
) -> BitsPerByte:
    """:func:`bits_per_byte` of a Hugging Face model folder, from transformers logits (float32, CPU)."""
    import json

    from .files import require_dir
    from .runtime.hf import load_hf

    p = require_dir(path, "Hugging Face model folder")
    data_path, convs = read_eval_conversations(data, limit)
    if n_ctx is None:  # the cap a GGUF of this model gets: its trained context, at most MAX_EVAL_CTX
        try:
            trained = json.loads((p / "config.json").read_text(encoding="utf-8")).get(
                "max_position_embeddings"
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            trained = None  # load_hf says what is wrong with it
        n_ctx = min(trained, MAX_EVAL_CTX) if isinstance(trained, int) and trained > 0 else MAX_EVAL_CTX
    system = load_hf(p, n_ctx=n_ctx, threads=threads)
    try:
        template = _TokenizerTemplate(system.tokenizer, p)
        tally = BitsTally()
        for msgs in convs:
            try:
                enc = encode_with(
                    lambda text, first: system.tokenize(text, special=True, add_bos=first), template, msgs
                )
            except Exception as e:  # as for a GGUF: one conversation the template refuses is skipped
                log.debug("skipping a conversation: %s", e)
                continue
            if enc is None:
                continue
            enc.truncate(system.n_ctx)
            if not enc.targets.size:
                continue
            lp = _log_softmax(system.logits(enc.ids)[enc.targets - 1])
            tgt = np.array(enc.ids, dtype=np.int64)[enc.targets]
            tally.add_conversation(enc, -lp[np.arange(len(tgt)), tgt])
    finally:
        system.close()
    total = sum(len(scored_replies(c)) for c in convs)
    return tally.result(total, str(p), "hf", str(data_path))


# --------------------------------------------------------------------------------------------- replies


def _prompt(llm: Any, template: ChatTemplate, messages: Sequence[dict[str, str]]) -> tuple[list[int], str]:
    """The conversation up to its first assistant turn, as a generation prompt, and that turn's text."""
    k = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = template.render(messages[:k], True)
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)), messages[k]["content"]


def _greedy(llm: Any, prompt: list[int], max_tokens: int) -> str:
    """Greedy continuation from the model's own logits, up to an end-of-generation token."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        out.append(tok)
        if llm.n_tokens >= llm.n_ctx():
            break
        llm.eval([tok])
    return llm.detokenize(out).decode("utf-8", errors="replace").strip()


def similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] (difflib's ratio; 1.0 = identical)."""
    from difflib import SequenceMatcher

    if not a and not b:
        return 1.0
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def _compare_replies(
    prompts: Sequence[tuple[list[int], str]],
    llms: Sequence[Any],
    ref_llm: Any,
    out: Sequence[ModelScores],
    reference: ModelScores | None,
    reply_tokens: int,
) -> None:
    ref_replies = [_greedy(ref_llm, ids, reply_tokens) for ids, _ in prompts] if ref_llm is not None else None
    if reference is not None and ref_replies is not None:
        reference.answer_similarity = float(
            np.mean([similarity(r, a) for r, (_, a) in zip(ref_replies, prompts, strict=True)])
        )
        reference.samples = [
            {"reply": r, "answer": a} for r, (_, a) in zip(ref_replies, prompts, strict=True)
        ][:3]
    for llm, s in zip(llms, out, strict=True):
        replies = [_greedy(llm, ids, reply_tokens) for ids, _ in prompts]
        s.answer_similarity = float(
            np.mean([similarity(r, a) for r, (_, a) in zip(replies, prompts, strict=True)])
        )
        if ref_replies is not None:
            s.reply_similarity = float(
                np.mean([similarity(r, q) for r, q in zip(replies, ref_replies, strict=True)])
            )
            s.same_reply = float(np.mean([r == q for r, q in zip(replies, ref_replies, strict=True)]))
        s.samples = [{"reply": r, "answer": a} for r, (_, a) in zip(replies, prompts, strict=True)][:3]
