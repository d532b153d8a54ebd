"""The kind of Keras chatbot this project replaces: a word-level seq2seq with a Bi-LSTM encoder and an LSTM
decoder with (Luong, "general") attention, in PyTorch.

Trained on the user turn → assistant turn pairs of a ``prepare`` folder's ``train.jsonl``, with early
stopping on ``val.jsonl``'s loss; replies are decoded greedily. Words, not subwords: the vocabulary is the
training split's lower-cased words and punctuation marks, so an unknown word in a prompt reads as ``<unk>``.

Saved as a folder: ``model.safetensors`` (the state dict) and ``config.json`` (sizes, vocabulary, training
figures). Loading reads only those two with safetensors and json: nothing is unpickled.
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
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import DataError, ModelError, TrainingError
from ..files import atomic_path, check_output_dir, require_dir

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


def join_words(tokens: Sequence[str]) -> str:
    out = ""
    for t in tokens:
        if out and t not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
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
