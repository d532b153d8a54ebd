"""The kind of Keras chatbot this project replaces: a word-level seq2seq with a Bi-LSTM encoder and an LSTM
decoder with (Luong, "general") attention, in PyTorch.

Trained on the user turn → assistant turn pairs of a ``prepare`` folder's ``train.jsonl``, with early
stopping on ``val.jsonl``'s loss; replies are decoded greedily. Words, not subwords: the vocabulary is the
training split's lower-cased words and punctuation marks, so an unknown word in a prompt reads as ``<unk>``.

Saved as a folder: ``model.safetensors`` (the state dict) and ``config.json`` (sizes, vocabulary, training
figures). Loading reads only those two with safetensors and json: nothing is unpickled.

Its bits per byte (:func:`lstm_bits_per_byte`, the figure :func:`gguf_factory.evaluate.bits_per_byte`
compares with the transformers) charge the exact reply text, not only what the words keep, so the figure
stays an upper bound on a code for the reply's bytes and nothing the model cannot say comes free:

* the words: teacher-forced decoder probabilities given the previous user turn, the reply's words then
  ``<eos>`` (the end of turn), over everything a reply can hold (never ``<pad>`` or ``<bos>``);
* an out-of-vocabulary word: p(``<unk>``) from the decoder, times its spelling under a character bigram
  model of the vocabulary's own words (end-of-word symbol; a character never seen costs an escape and
  8 bits per UTF-8 byte). The ``<unk>`` rate and the spelling bits are reported;
* what lower-casing drops: each word's letter case (lower, Capitalised, UPPER, or any mix at 1 bit a
  letter; at a sentence start or inside), and the whitespace before, between and after the words (none,
  one space, or other whitespace as raw bytes; where ``join_words`` would put a space or not), both
  estimated with add-one counts on the training replies (``train.jsonl``);
* a reply lower-casing cannot represent (a letter with more than two case forms): its raw bytes,
  log2(257) bits each and one more for its end.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import DataError, InputError, ModelError, TrainingError
from ..files import atomic_path, check_output_dir, require_dir

if TYPE_CHECKING:
    from ..scoring import BitsPerByte

log = logging.getLogger(__name__)

FORMAT = "gguf-factory-lstm-seq2seq"
VERSION = 1
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
WEIGHTS, CONFIG = "model.safetensors", "config.json"

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[^\sa-z0-9]")
_NO_SPACE_BEFORE = set(".,!?;:)]}%'\"")
_NO_SPACE_AFTER = set("([{$")


def word_tokens(text: str) -> list[str]:
    """Lower-cased words (with their apostrophes) and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def _spaced(prev: str, token: str) -> bool:
    """Whether :func:`join_words` puts a space between ``prev`` and ``token``."""
    return token not in _NO_SPACE_BEFORE and prev[-1:] not in _NO_SPACE_AFTER


def join_words(tokens: Sequence[str]) -> str:
    out = ""
    for t in tokens:
        if out and _spaced(out, t):
            out += " "
        out += t
    return out


@dataclass
class LSTMConfig:
    embed_dim: int = 128
    hidden_dim: int = 256
    layers: int = 1
    dropout: float = 0.2
    max_vocab: int = 8000
    min_count: int = 1
    max_len: int = 32
    """Words kept of a prompt, and the longest reply trained on."""
    batch_size: int = 32
    lr: float = 3e-3
    max_epochs: int = 40
    patience: int = 3
    """Epochs without a better validation loss before training stops (the best epoch is kept)."""
    seed: int = 1234

    def check(self) -> LSTMConfig:
        limits = {
            "embed_dim": (1, 4096), "hidden_dim": (1, 4096), "layers": (1, 8), "max_vocab": (8, 1_000_000),
            "min_count": (1, 1_000_000), "max_len": (1, 4096), "batch_size": (1, 65536),
            "max_epochs": (1, 100_000), "patience": (1, 100_000),
        }  # fmt: skip
        for name, (lo, hi) in limits.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ModelError(f"LSTM config {name} must be an integer in [{lo}, {hi}], got {v!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ModelError(f"LSTM config dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.lr) > 0:
            raise ModelError(f"LSTM config lr must be positive, got {self.lr!r}")
        return self


class Seq2Seq(nn.Module):
    """Bi-LSTM encoder → (bridge) → LSTM decoder; attention over the encoder outputs after each step."""

    def __init__(self, vocab_size: int, cfg: LSTMConfig):
        super().__init__()
        e, h, n = cfg.embed_dim, cfg.hidden_dim, cfg.layers
        drop = cfg.dropout if n > 1 else 0.0
        self.layers, self.hidden = n, h
        self.embed = nn.Embedding(vocab_size, e, padding_idx=PAD)
        self.encoder = nn.LSTM(e, h, num_layers=n, batch_first=True, bidirectional=True, dropout=drop)
        self.bridge_h = nn.Linear(2 * h, h)
        self.bridge_c = nn.Linear(2 * h, h)
        self.decoder = nn.LSTM(e, h, num_layers=n, batch_first=True, dropout=drop)
        self.attn = nn.Linear(2 * h, h, bias=False)
        self.combine = nn.Linear(3 * h, h)
        self.out = nn.Linear(h, vocab_size)
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[Any, ...]:
        b, s = src.shape
        packed = pack_padded_sequence(
            self.drop(self.embed(src)), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, (h, c) = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=s)

        def both_directions(x: torch.Tensor) -> torch.Tensor:  # (layers*2, B, H) -> (layers, B, 2H)
            return x.view(self.layers, 2, b, self.hidden).permute(0, 2, 1, 3).reshape(self.layers, b, -1)

        state = (torch.tanh(self.bridge_h(both_directions(h))), torch.tanh(self.bridge_c(both_directions(c))))
        return out, self.attn(out), src != PAD, state

    def decode(
        self, tgt: torch.Tensor, enc: tuple[Any, ...], state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, keys, mask, _ = enc
        dec, state = self.decoder(self.drop(self.embed(tgt)), state)
        scores = (dec @ keys.transpose(1, 2)).masked_fill(~mask[:, None, :], float("-inf"))
        context = torch.softmax(scores, dim=-1) @ out
        hidden = torch.tanh(self.combine(torch.cat([dec, context], dim=-1)))
        return self.out(self.drop(hidden)), state

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        enc = self.encode(src, lengths)
        return self.decode(tgt_in, enc, enc[3])[0]


# --------------------------------------------------------------------------------------------- data


def chat_pairs(conversations: Sequence[Any]) -> list[tuple[str, str]]:
    """(user turn, the assistant turn that answers it) for every answered user turn."""
    pairs = []
    for c in conversations:
        msgs = c.messages
        for a, b in zip(msgs, msgs[1:], strict=False):
            if a.role == "user" and b.role == "assistant" and a.content.strip() and b.content.strip():
                pairs.append((a.content, b.content))
    return pairs


def build_vocab(pairs: Sequence[tuple[str, str]], cfg: LSTMConfig) -> list[str]:
    counts = Counter(w for q, a in pairs for text in (q, a) for w in word_tokens(text))
    words = sorted((w for w, n in counts.items() if n >= cfg.min_count), key=lambda w: (-counts[w], w))
    return [*SPECIALS, *words[: cfg.max_vocab - len(SPECIALS)]]


def _batches(
    pairs: list[tuple[list[int], list[int]]], size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(pairs), generator=generator).tolist() if generator else range(len(pairs))
    order = list(order)
    for i in range(0, len(order), size):
        chunk = [pairs[j] for j in order[i : i + size]]
        s_len = max(len(s) for s, _ in chunk)
        t_len = max(len(t) for _, t in chunk) + 1
        src = torch.full((len(chunk), s_len), PAD, dtype=torch.long)
        tgt_in = torch.full((len(chunk), t_len), PAD, dtype=torch.long)
        tgt_out = torch.full((len(chunk), t_len), PAD, dtype=torch.long)
        for k, (s, t) in enumerate(chunk):
            src[k, : len(s)] = torch.tensor(s)
            tgt_in[k, : len(t) + 1] = torch.tensor([BOS, *t])
            tgt_out[k, : len(t) + 1] = torch.tensor([*t, EOS])
        yield src, torch.tensor([len(s) for s, _ in chunk]), tgt_in, tgt_out


# --------------------------------------------------------------------------------------------- model


class LSTMChatbot:
    """A trained seq2seq chatbot: text in, greedy reply out."""

    backend = "lstm"

    def __init__(
        self, model: Seq2Seq, vocab: list[str], cfg: LSTMConfig, path: Path | None = None, **meta: Any
    ):
        self.model = model.eval()
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.config = cfg
        self.path = path
        self.training: dict[str, Any] = dict(meta)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, UNK) for w in word_tokens(text)][: self.config.max_len]
        return ids or [UNK]

    def detokenize(self, ids: Sequence[int]) -> str:
        return join_words([self.vocab[i] for i in ids if i >= len(SPECIALS)])

    def generate_tokens(self, text: str, *, max_tokens: int = 48) -> Iterator[int]:
        """Greedy reply word ids, one at a time, up to ``<eos>`` or ``max_tokens``."""
        src = torch.tensor([self.encode(text)])
        with torch.inference_mode():
            enc = self.model.encode(src, torch.tensor([src.shape[1]]))
            state = enc[3]
            prev = torch.tensor([[BOS]])
            for _ in range(max_tokens):
                logits, state = self.model.decode(prev, enc, state)
                logits = logits[0, -1]
                logits[[PAD, UNK, BOS]] = float("-inf")  # never targets, or unreadable in a reply
                tok = int(logits.argmax())
                if tok == EOS:
                    return
                yield tok
                prev = torch.tensor([[tok]])

    def reply(self, text: str, *, max_tokens: int = 48) -> str:
        return self.detokenize(list(self.generate_tokens(text, max_tokens=max_tokens)))

    def target_bits(self, prompt: str, ids: Sequence[int]) -> list[float]:
        """Teacher-forced -log2 p of each word id of a reply to ``prompt`` and then of ``<eos>``; p is over
        what a reply can hold (every word, ``<unk>``, ``<eos>``; never ``<pad>`` or ``<bos>``)."""
        src = torch.tensor([self.encode(prompt)])
        target = torch.tensor([*ids, EOS])
        with torch.inference_mode():
            logits = self.model(src, torch.tensor([src.shape[1]]), torch.tensor([[BOS, *ids]]))[0].double()
            logits[:, [PAD, BOS]] = float("-inf")
            lp = torch.log_softmax(logits, dim=-1)[torch.arange(len(target)), target]
        return (-lp / math.log(2)).tolist()

    def close(self) -> None:
        pass

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into a new folder, atomically."""
        from safetensors.torch import save_file

        out = check_output_dir(out_dir)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": "words",
            "config": asdict(self.config),
            "vocab": self.vocab,
            "training": self.training,
        }
        with atomic_path(out) as tmp:
            tmp.mkdir()
            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
            (tmp / CONFIG).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.path = out
        return out


@dataclass
class LSTMTrainResult:
    path: Path
    epochs: int
    best_epoch: int
    best_val_loss: float
    train_pairs: int
    val_pairs: int
    vocab_size: int
    parameters: int
    seconds: float


def train_lstm(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: LSTMConfig | None = None,
    threads: int | None = None,
) -> LSTMTrainResult:
    """Train the baseline on ``data_dir``'s train split, stop early on its val split, save to ``out_dir``."""
    from ..data import load_dataset

    cfg = (config or LSTMConfig()).check()
    out = check_output_dir(out_dir)
    splits = load_dataset(data_dir)
    train_pairs_text = chat_pairs(splits["train"])
    if not train_pairs_text:
        raise DataError(f"{Path(data_dir) / 'train.jsonl'}: no user → assistant pairs to train the LSTM on")
    val_pairs_text = chat_pairs(splits["val"])
    if not val_pairs_text:  # no validation split: hold out a tenth of the training pairs
        k = max(1, len(train_pairs_text) // 10)
        if len(train_pairs_text) <= k:
            raise DataError(f"{data_dir}: too few pairs to train and validate the LSTM")
        val_pairs_text, train_pairs_text = train_pairs_text[-k:], train_pairs_text[:-k]
        log.warning("no validation pairs in %s: validating on %d held-back training pairs", data_dir, k)

    t0 = time.perf_counter()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    vocab = build_vocab(train_pairs_text, cfg)
    index = {w: i for i, w in enumerate(vocab)}

    def encode(pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        out_pairs = []
        for q, a in pairs:
            src = [index.get(w, UNK) for w in word_tokens(q)][: cfg.max_len] or [UNK]
            tgt = [index.get(w, UNK) for w in word_tokens(a)][: cfg.max_len]
            out_pairs.append((src, tgt))
        return out_pairs

    train_pairs, val_pairs = encode(train_pairs_text), encode(val_pairs_text)
    model = Seq2Seq(len(vocab), cfg)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    gen = torch.Generator().manual_seed(cfg.seed)

    def val_loss() -> float:
        model.eval()
        total, n = 0.0, 0
        with torch.inference_mode():
            for src, lengths, tgt_in, tgt_out in _batches(val_pairs, 256, None):
                logits = model(src, lengths, tgt_in)
                k = int((tgt_out != PAD).sum())
                total += float(loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))) * k
                n += k
        return total / max(n, 1)

    best, best_epoch, best_state, epoch = math.inf, 0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        for src, lengths, tgt_in, tgt_out in _batches(train_pairs, cfg.batch_size, gen):
            logits = model(src, lengths, tgt_in)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
            if not torch.isfinite(loss):
                raise TrainingError(f"LSTM training diverged at epoch {epoch} (loss {float(loss)}): lower lr")
            optim.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
        v = val_loss()
        log.info("LSTM epoch %d: validation loss %.3f", epoch, v)
        if v < best - 1e-4:
            best, best_epoch, best_state = v, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    training = {
        "epochs": epoch, "best_epoch": best_epoch, "best_val_loss": best, "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs), "parameters": n_params, "seconds": seconds, "data": str(data_dir),
    }  # fmt: skip
    bot = LSTMChatbot(model, vocab, cfg, **training)
    path = bot.save(out)
    return LSTMTrainResult(
        path=path, epochs=epoch, best_epoch=best_epoch, best_val_loss=best, train_pairs=len(train_pairs),
        val_pairs=len(val_pairs), vocab_size=len(vocab), parameters=n_params, seconds=seconds,
    )  # fmt: skip


def load_lstm(path: str | os.PathLike[str], *, threads: int | None = None) -> LSTMChatbot:
    """Load a folder written by :func:`train_lstm` (safetensors + JSON only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = require_dir(path, "LSTM baseline folder")
    cfg_path, weights = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise ModelError(f"{d} is not an LSTM baseline folder: it needs {CONFIG} and {WEIGHTS}")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{cfg_path}: not an LSTM baseline config (format must be {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ModelError(f"{cfg_path}: unsupported version {doc.get('version')!r} (expected {VERSION})")
    raw = doc.get("config")
    known = {f.name for f in fields(LSTMConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ModelError(f"{cfg_path}: 'config' must be an object with the fields {sorted(known)}")
    try:
        cfg = LSTMConfig(**raw).check()
    except TypeError as e:
        raise ModelError(f"{cfg_path}: bad 'config' ({e})") from None
    vocab = doc.get("vocab")
    if (
        not isinstance(vocab, list)
        or not all(isinstance(w, str) for w in vocab)
        or tuple(vocab[: len(SPECIALS)]) != SPECIALS
        or len(vocab) > cfg.max_vocab
        or len(set(vocab)) != len(vocab)
    ):
        raise ModelError(
            f"{cfg_path}: 'vocab' must be a list of distinct words starting with {list(SPECIALS)}"
        )
    torch.set_num_threads(threads or os.cpu_count() or 1)
    model = Seq2Seq(len(vocab), cfg)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise ModelError(f"{weights}: weights do not fit {cfg_path} ({str(e).splitlines()[0]})") from None
    training = doc.get("training") if isinstance(doc.get("training"), dict) else {}
    return LSTMChatbot(model, vocab, cfg, path=d, **training)


def is_lstm_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a folder written by :func:`train_lstm` (its config names the format)."""
    cfg = Path(path) / CONFIG
    try:
        return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------- bits per byte

BYTE_BITS = math.log2(257)
"""A uniform code over the 256 byte values and an end symbol: the charge for text no model predicts."""
_END, _ESC = "</w>", "<esc>"  # symbols of the spelling model (never a single character)
_CASES = ("lower", "title", "upper", "mixed")
_GAPS = ("", " ", None)  # None: any other whitespace, as raw bytes


def raw_bits(text: str) -> float:
    """``text`` in the uniform byte code: log2(257) bits for each UTF-8 byte and for the end."""
    return (len(text.encode("utf-8")) + 1) * BYTE_BITS


def split_reply(text: str) -> tuple[list[str], list[str], list[str]] | None:
    """``text`` as (its words as the LSTM reads them, the same words as written, the whitespace before,
    between and after them); None when the lower-cased words cannot spell it again (a letter with more
    than two case forms)."""
    low = text.lower()
    if len(low) != len(text):
        return None
    words, written, gaps, pos = [], [], [], 0
    for m in _TOKEN.finditer(low):
        gaps.append(text[pos : m.start()])
        words.append(m.group())
        written.append(text[m.start() : m.end()])
        pos = m.end()
    gaps.append(text[pos:])
    if not all(_case_options(w, o) for w, o in zip(words, written, strict=True)):
        return None
    return words, written, gaps


def _two_cased(ch: str) -> bool:
    up = ch.upper()
    return len(up) == 1 and up != ch


def _case_options(word: str, written: str) -> list[tuple[str, int]]:
    """The case classes that turn ``word`` into ``written``, each with the bits it needs beyond its class
    (``mixed``: one a letter)."""
    out = []
    if written == word:
        out.append(("lower", 0))
    if written == word[:1].upper() + word[1:]:
        out.append(("title", 0))
    if written == word.upper():
        out.append(("upper", 0))
    if all(a == b or (_two_cased(b) and a == b.upper()) for a, b in zip(written, word, strict=True)):
        out.append(("mixed", sum(map(_two_cased, word))))
    return out


def _case_context(words: Sequence[str], i: int) -> str:
    return "start" if i == 0 or words[i - 1] in (".", "!", "?") else "inner"


def _gap_context(words: Sequence[str], i: int) -> str:
    """Context of the gap before word ``i`` (``i == len(words)``: after the last)."""
    if i == 0 or i == len(words):
        return "edge"
    return "spaced" if _spaced(words[i - 1], words[i]) else "tight"


class ReplySpelling:
    """What a word-level LSTM leaves out of a reply's text, as a probability model: letter case and
    whitespace (add-one counts on ``replies``, the training replies) and the spelling of words outside
    ``vocab`` (a character bigram model of ``vocab``'s own words). See the module docstring."""

    def __init__(self, replies: Sequence[str], vocab: Sequence[str]):
        self.case: dict[str, Counter[str]] = {c: Counter() for c in ("start", "inner")}
        self.gap: dict[str, Counter[str | None]] = {c: Counter() for c in ("edge", "spaced", "tight")}
        for text in replies:
            parsed = split_reply(text)
            if parsed is None:
                continue
            words, written, gaps = parsed
            for i, (w, o) in enumerate(zip(words, written, strict=True)):
                if any(map(_two_cased, w)):
                    self.case[_case_context(words, i)][_case_options(w, o)[0][0]] += 1
            for i, g in enumerate(gaps):
                self.gap[_gap_context(words, i)][g if g in ("", " ") else None] += 1
        self.chars: dict[str, Counter[str]] = {}
        for w in vocab[len(SPECIALS) :]:
            prev = ""
            for ch in [*w, _END]:
                self.chars.setdefault(prev, Counter())[ch] += 1
                prev = ch
        self.alphabet = {ch for ch in self.chars if ch}
        self._n_symbols = len(self.alphabet) + 2  # + end of word, + escape

    @staticmethod
    def _p(counts: Counter[Any], key: Any, n_classes: int) -> float:
        return (counts[key] + 1) / (counts.total() + n_classes)

    def case_bits(self, words: Sequence[str], written: Sequence[str]) -> float:
        bits = 0.0
        for i, (w, o) in enumerate(zip(words, written, strict=True)):
            if any(map(_two_cased, w)):
                counts = self.case[_case_context(words, i)]
                p = sum(self._p(counts, c, len(_CASES)) * 2.0**-extra for c, extra in _case_options(w, o))
                bits -= math.log2(p)
        return bits

    def space_bits(self, words: Sequence[str], gaps: Sequence[str]) -> float:
        bits = 0.0
        for i, g in enumerate(gaps):
            counts = self.gap[_gap_context(words, i)]
            p = self._p(counts, None, len(_GAPS)) * 2.0 ** -raw_bits(g)
            if g in ("", " "):
                p += self._p(counts, g, len(_GAPS))
            bits -= math.log2(p)
        return bits

    def spelling_bits(self, word: str) -> float:
        """Bits of ``word``'s characters and end under the character bigram model."""
        bits, prev = 0.0, ""
        for ch in word:
            counts = self.chars.get(prev, Counter())
            if ch in self.alphabet:
                bits -= math.log2(self._p(counts, ch, self._n_symbols))
                prev = ch
            else:
                bits -= math.log2(self._p(counts, _ESC, self._n_symbols))
                bits += 8 * len(ch.encode("utf-8"))
                prev = ""
        return bits - math.log2(self._p(self.chars.get(prev, Counter()), _END, self._n_symbols))


def lstm_bits_per_byte(
    model: str | os.PathLike[str] | LSTMChatbot,
    data: str | os.PathLike[str],
    *,
    train_data: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    threads: int | None = None,
) -> BitsPerByte:
    """:func:`gguf_factory.evaluate.bits_per_byte` of the baseline: each reference reply of ``data`` scored
    by the decoder given the user turn before it, and charged in full as the module docstring says.

    ``train_data``: the training split the case, spacing and spelling charges are fitted on (a
    ``train.jsonl`` or its folder); default: the one beside ``data``'s test split, else the one the model
    was trained on. Returns a :class:`gguf_factory.evaluate.BitsPerByte`.
    """
    from ..data import load_split
    from ..scoring import BitsTally, read_eval_conversations, reply_bytes, scored_replies

    bot = model if isinstance(model, LSTMChatbot) else load_lstm(model, threads=threads)
    data_path, convs = read_eval_conversations(data, limit)
    train_path = _training_split(train_data, data_path, bot)
    spelling = ReplySpelling([a for _, a in chat_pairs(load_split(train_path))], bot.vocab)
    tally = BitsTally()
    n_words = n_oov = fallback = 0
    oov_bits = case_space_bits = 0.0
    for msgs in convs:
        for i in scored_replies(msgs):
            prompt = next((m["content"] for m in reversed(msgs[:i]) if m["role"] == "user"), "")
            text = msgs[i]["content"]
            parsed = split_reply(text)
            if parsed is None:
                n = len(text.encode("utf-8"))
                tally.add(n * BYTE_BITS, BYTE_BITS, n, 1, reply_bytes(text))
                fallback += 1
                continue
            words, written, gaps = parsed
            bits = bot.target_bits(prompt, [bot.index.get(w, UNK) for w in words])
            oov = [w for w in words if w not in bot.index]
            spelled = sum(map(spelling.spelling_bits, oov))
            cased = spelling.case_bits(words, written) + spelling.space_bits(words, gaps)
            tally.add(sum(bits[:-1]) + spelled + cased, bits[-1], len(words), 1, reply_bytes(text))
            n_words, n_oov = n_words + len(words), n_oov + len(oov)
            oov_bits, case_space_bits = oov_bits + spelled, case_space_bits + cased
    name = str(bot.path) if bot.path is not None else "lstm"
    result = tally.result(sum(len(scored_replies(c)) for c in convs), name, "lstm", str(data_path))
    result.n_words, result.n_oov, result.oov_bits = n_words, n_oov, oov_bits
    result.case_space_bits, result.fallback_replies = case_space_bits, fallback
    if n_oov:
        log.info(
            "LSTM: %d of %d reply words out of its vocabulary (%.1f%%)", n_oov, n_words, 100 * n_oov / n_words
        )
    return result


def _training_split(train_data: str | os.PathLike[str] | None, data_path: Path, bot: LSTMChatbot) -> Path:
    if train_data is not None:
        p = Path(train_data)
        p = p / "train.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise InputError(f"training split not found: {p}")
        return p
    for folder in (data_path.parent, bot.training.get("data")):
        if folder and (Path(folder) / "train.jsonl").is_file():
            return Path(folder) / "train.jsonl"
    raise InputError(
        f"no train.jsonl beside {data_path}: give the training split the LSTM was trained on (train_data=)"
    )
