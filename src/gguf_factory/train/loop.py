"""The training loop shared by from-scratch training and fine-tuning, and the chat-example encoder.

Examples are conversations rendered with the tokenizer's own chat template; the loss is taken on the
assistant turns only (their content and the template's closing token). Batches are padded dynamically and
bucketed by length, which matters on a CPU: a batch costs as much as its longest example.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TrainingError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What :func:`gguf_factory.train.train` produced: a HF model folder and the figures of the run."""

    model_dir: Path
    n_params: int
    epochs_run: int
    train_losses: list[float]
    val_losses: list[float]
    best_val_loss: float
    seconds: float
    stopped_early: bool
    steps: int = 0
    best_epoch: int = 0
    n_train_examples: int = 0
    n_val_examples: int = 0
    skipped_examples: int = 0
    val_accuracies: list[float] = field(default_factory=list)
    best_val_accuracy: float = float("nan")
    monitor: str = "accuracy"
    kept_epoch: int = 0
    """The epoch whose weights were saved: ``best_epoch``, or the last one run with ``keep="last"``."""


# --------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    if n < 1:
        raise TrainingError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodedSplit:
    examples: list[Example] = field(default_factory=list)
    skipped: int = 0  # conversations with no assistant token left (after truncation) or unrenderable
    truncated: int = 0


def as_messages(conversation: Any) -> list[dict[str, str]]:
    """A data.Conversation (or a list of role/content objects or dicts) as chat-template messages."""
    msgs = getattr(conversation, "messages", conversation)
    out = []
    for m in msgs:
        if isinstance(m, dict):
            out.append({"role": str(m["role"]), "content": str(m["content"])})
        else:
            out.append({"role": str(m.role), "content": str(m.content)})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text and the character spans the loss is taken on.

    A span is found by rendering prefixes of the conversation, not by pattern matching on the output: the
    span of assistant turn *i* starts where ``messages[:i]`` rendered *with* the generation prompt ends, and
    ends where ``messages[:i+1]`` rendered ends, less trailing whitespace (so ChatML's ``<|im_end|>`` is in
    and the newline after it is out). Templates for which a prefix does not render as a prefix of the whole
    (some drop reasoning from history) fall back to locating the content itself plus the end token.
    """
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    eos = getattr(tokenizer, "eos_token", None)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = end = -1
        try:
            before = _render(tokenizer, messages[:i], True)
            upto = _render(tokenizer, messages[: i + 1], False)
        except Exception:  # a template that refuses a prefix (e.g. must start with a user turn)
            before = upto = None
        if before is not None and upto is not None and full.startswith(upto) and upto.startswith(before):
            start, end = len(before), len(upto.rstrip())
        else:
            idx = full.find(m["content"], cursor) if m["content"] else -1
            if idx >= 0:
                start, end = idx, idx + len(m["content"])
                if eos and full.startswith(eos, end):
                    end += len(eos)
        if 0 <= start < end:
            spans.append((start, end))
            cursor = end
    return full, spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int) -> Example | None:
    """Tokenize one conversation; labels are IGNORE_INDEX except on the assistant spans.

    Returns None when no assistant token is left (after truncation to ``max_seq_len``).
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    if not spans:
        return None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for k, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and any(a <= s < b for a, b in spans):
                labels[k] = ids[k]
    else:  # slow tokenizer: tokenize segment by segment
        ids, labels = [], []
        pos = 0
        for a, b in spans:
            for seg, target in ((text[pos:a], False), (text[a:b], True)):
                seg_ids = tokenizer(seg, add_special_tokens=False, verbose=False)["input_ids"] if seg else []
                ids += seg_ids
                labels += seg_ids if target else [IGNORE_INDEX] * len(seg_ids)
            pos = b
        rest = text[pos:]
        tail = tokenizer(rest, add_special_tokens=False, verbose=False)["input_ids"] if rest else []
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    ex = Example(ids, labels)
    return ex if ex.n_target > 0 else None


def encode_conversations(tokenizer: Any, conversations: Iterable[Any], max_seq_len: int) -> EncodedSplit:
    out = EncodedSplit()
    for conv in conversations:
        msgs = as_messages(conv)
        try:
            ex = encode_conversation(tokenizer, msgs, max_seq_len)
        except Exception as e:  # a template error on one conversation should not stop the run
            log.debug("could not render a conversation: %s", e)
            ex = None
        if ex is None:
            out.skipped += 1
        else:
            out.examples.append(ex)
    return out


# --------------------------------------------------------------------------------------------- batching


def make_batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random | None, *, bucket_factor: int = 50
) -> list[list[int]]:
    """Index batches: shuffled, then sorted by length inside chunks of ``batch_size * bucket_factor``.

    With ``rng=None`` (validation) the batches are simply sorted by length.
    """
    idx = list(range(len(examples)))
    if rng is None:
        idx.sort(key=lambda i: len(examples[i].input_ids))
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(idx)
    chunk = max(batch_size, batch_size * bucket_factor)
    batches: list[list[int]] = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c : c + chunk], key=lambda i: len(examples[i].input_ids))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], batch: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(examples[i].input_ids) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, i in enumerate(batch):
        ex = examples[i]
        n = len(ex.input_ids)
        ids[r, :n] = torch.tensor(ex.input_ids)
        labels[r, :n] = torch.tensor(ex.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], list[int]], tuple[torch.Tensor, int]]
"""A training objective for :func:`run_loop`: (model, batch, example indices) → (summed loss, count)."""


def _loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens, and their count."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1, :]
    target = batch["labels"][:, 1:]
    n = int((target != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, n


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
) -> tuple[float, float]:
    """Token-weighted mean loss and greedy (top-1) accuracy over the target tokens of ``examples``.

    The accuracy is the share of target tokens that are the model's argmax given the true prefix: what
    greedy decoding depends on. Both are NaN when there is no example.
    """
    if not examples:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for b in make_batches(examples, batch_size, None):
        batch = collate(examples, b, pad_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1, :].float()
        target = batch["labels"][:, 1:]
        mask = target != IGNORE_INDEX
        total += float(
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int(mask.sum())
        correct += int(((logits.argmax(-1) == target) & mask).sum())
    model.train(was_training)
    return total / max(count, 1), correct / max(count, 1)


# --------------------------------------------------------------------------------------------- loop


MONITORS = ("accuracy", "loss")
"""What selects the best epoch and drives early stopping: validation top-1 accuracy or validation loss."""
KEEPS = ("best", "last")
"""Which weights a run keeps: those of its best epoch, or its last (after early stopping, if any)."""


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    lr: float
    patience: int = 3
    seed: int = 1234
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    progress: bool = True
    min_delta: float = 1e-4
    monitor: str = "accuracy"
    keep: str = "best"

    @classmethod
    def with_defaults(cls, defaults: Any, *, keep: str | None = None, **given: Any) -> LoopSettings:
        """Settings from the options a user gave (``None``: not given), the rest from ``defaults`` (a
        preset or a defaults record: ``epochs``, ``batch_size``, ``lr``, ``patience`` and maybe
        ``keep``), checked."""
        for name in ("epochs", "batch_size", "lr", "patience"):
            if given.get(name) is None:
                given[name] = getattr(defaults, name)
        keep = keep if keep is not None else getattr(defaults, "keep", "best")
        settings = cls(keep=keep, **given)
        settings.check()
        return settings

    def check(self) -> None:
        if self.epochs < 1:
            raise TrainingError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise TrainingError(f"batch size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"learning rate must be a positive number, got {self.lr}")
        if self.patience < 1:
            raise TrainingError(f"patience must be at least 1, got {self.patience}")
        if self.monitor not in MONITORS:
            raise TrainingError(f"unknown monitor {self.monitor!r}; choose one of: {', '.join(MONITORS)}")
        if self.keep not in KEEPS:
            raise TrainingError(f"unknown keep {self.keep!r}; choose one of: {', '.join(KEEPS)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass
class LoopOutcome:
    epochs_run: int
    train_losses: list[float]
    val_losses: list[float]
    best_val_loss: float
    best_epoch: int
    stopped_early: bool
    steps: int
    val_accuracies: list[float] = field(default_factory=list)
    best_val_accuracy: float = float("nan")
    kept_epoch: int = 0


def _optimizer(model: torch.nn.Module, s: LoopSettings) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=1e-8)


def _lr_lambda(total: int, warmup: int, floor: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def run_loop(
    model: torch.nn.Module,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    settings: LoopSettings,
    pad_id: int,
    *,
    loss_fn: LossFn | None = None,
) -> LoopOutcome:
    """Train ``model`` in place and leave it holding the weights of its best epoch (``keep="best"``) or of
    its last epoch (``keep="last"``).

    The best epoch is the one with the highest validation top-1 accuracy (``monitor="accuracy"``) or the
    lowest validation loss (``monitor="loss"``); the training loss decides when there is no validation
    example. Training stops after ``patience`` epochs without improvement, or at ``max_steps`` steps.

    Why accuracy by default: on a small chat dataset the validation loss bottoms out early, while the
    model's greedy answers (what a chat shows) keep getting better for many epochs after it; the top-1
    accuracy on the held-out answers follows the greedy behaviour.

    ``loss_fn(model, batch, indices)`` replaces the training objective (distillation): it returns a summed
    loss over the batch's target tokens and their count, like the default cross-entropy; ``indices`` are
    the positions in ``train_examples`` of the batch's rows. Validation stays cross-entropy.
    """
    s = settings
    s.check()
    if not train_examples:
        raise TrainingError("no usable training example")
    rng = random.Random(s.seed)
    steps_per_epoch = math.ceil(len(train_examples) / s.batch_size)
    total = s.epochs * steps_per_epoch
    if s.max_steps is not None:
        total = min(total, s.max_steps)
    warmup = max(1, round(s.warmup_ratio * total))
    opt = _optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup, s.min_lr_ratio))
    val_bs = max(1, s.batch_size * 2)

    train_losses: list[float] = []
    val_losses: list[float] = []
    val_accs: list[float] = []
    best, best_epoch, best_state = float("inf"), 0, None
    bad_epochs, step, stopped_early = 0, 0, False
    epochs_run = 0
    log.info(
        "training on %d examples (%d validation), %d steps/epoch, up to %d steps",
        len(train_examples), len(val_examples), steps_per_epoch, total,
    )
    progress = _progress(s.progress)
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task(f"epoch 1/{s.epochs}", total=total, info="")
    try:
        model.train()
        for epoch in range(1, s.epochs + 1):
            epochs_run = epoch
            ep_loss, ep_tokens = 0.0, 0
            for b in make_batches(train_examples, s.batch_size, rng):
                batch = collate(train_examples, b, pad_id)
                loss_sum, n = _loss_sum(model, batch) if loss_fn is None else loss_fn(model, batch, b)
                if n == 0:
                    continue
                loss = loss_sum / n
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                opt.step()
                sched.step()
                step += 1
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise TrainingError(
                        f"the loss became {lv} at step {step}; try a lower learning rate (now {s.lr})"
                    )
                ep_loss += lv * n
                ep_tokens += n
                if progress is not None:
                    progress.update(
                        task, advance=1, description=f"epoch {epoch}/{s.epochs}",
                        info=f"step {step} loss {lv:.3f}",
                    )
                if s.max_steps is not None and step >= s.max_steps:
                    break
            tl = ep_loss / max(ep_tokens, 1)
            vl, va = evaluate(model, val_examples, val_bs, pad_id)
            train_losses.append(tl)
            if val_examples:
                val_losses.append(vl)
                val_accs.append(va)
            score = (-va if s.monitor == "accuracy" else vl) if val_examples else tl
            improved = score < best - s.min_delta
            if improved:
                best, best_epoch, bad_epochs = score, epoch, 0
                if s.keep == "best":
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            msg = f"epoch {epoch}: train loss {tl:.4f}" + (
                f", val loss {vl:.4f}, val accuracy {va:.2%}" if val_examples else ""
            )
            log.info("%s%s", msg, " (best)" if improved else "")
            if progress is not None:
                progress.update(task, info=msg)
            if s.max_steps is not None and step >= s.max_steps:
                break
            if bad_epochs >= s.patience and epoch < s.epochs:
                stopped_early = True
                log.info(
                    "early stop: no improvement for %d epochs; keeping epoch %d",
                    s.patience, best_epoch if s.keep == "best" else epoch,
                )
                break
    finally:
        if progress is not None:
            progress.stop()
    kept = epochs_run
    if best_state is not None:
        model.load_state_dict(best_state)
        kept = best_epoch
    model.eval()
    return LoopOutcome(
        epochs_run=epochs_run,
        train_losses=train_losses,
        val_losses=val_losses,
        best_val_loss=val_losses[best_epoch - 1] if val_examples and best_epoch else float("nan"),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        steps=step,
        val_accuracies=val_accs,
        best_val_accuracy=val_accs[best_epoch - 1] if val_examples and best_epoch else float("nan"),
        kept_epoch=kept,
    )


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Validate the model output folder before any work: an existing folder (replaced at the end) or a new
    name in an existing folder."""
    from .. import files
    from ..errors import InputError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    if not out.exists():
        files.check_output_path(out)
    return out


def load_splits(data_dir: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """The prepared dataset's splits (``train``, ``val``, ``test``); an empty training split is an error."""
    from ..data import load_dataset

    splits = load_dataset(data_dir)
    if not splits.get("train"):
        raise TrainingError(f"{data_dir}: the training split is empty")
    return splits


def encode_splits(
    tokenizer: Any, splits: dict[str, list[Any]], max_seq_len: int
) -> tuple[EncodedSplit, EncodedSplit]:
    """Encode the train and val splits; no usable training example is a :class:`TrainingError`."""
    if max_seq_len < 8:
        raise TrainingError(f"max_seq_len must be at least 8, got {max_seq_len}")
    tr = encode_conversations(tokenizer, splits["train"], max_seq_len)
    va = encode_conversations(tokenizer, splits.get("val", []), max_seq_len)
    if not tr.examples:
        raise TrainingError(
            f"no usable training example: all {tr.skipped} conversations have no assistant token "
            f"within max_seq_len={max_seq_len}"
        )
    if tr.skipped or va.skipped:
        log.warning(
            "skipped %d training and %d validation conversations with no assistant token within %d tokens",
            tr.skipped, va.skipped, max_seq_len,
        )
    if not va.examples:
        log.warning("no validation example: the best epoch is chosen on the training loss")
    return tr, va


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_result(
    out: Path, n_params: int, settings: LoopSettings, outcome: LoopOutcome, train: EncodedSplit,
    val: EncodedSplit, *, seconds: float,
) -> TrainResult:
    """The :class:`TrainResult` of a finished run (scratch and fine-tuning alike)."""
    return TrainResult(
        model_dir=out,
        n_params=n_params,
        epochs_run=outcome.epochs_run,
        train_losses=outcome.train_losses,
        val_losses=outcome.val_losses,
        best_val_loss=outcome.best_val_loss,
        val_accuracies=outcome.val_accuracies,
        best_val_accuracy=outcome.best_val_accuracy,
        monitor=settings.monitor,
        kept_epoch=outcome.kept_epoch,
        seconds=seconds,
        stopped_early=outcome.stopped_early,
        steps=outcome.steps,
        best_epoch=outcome.best_epoch,
        n_train_examples=len(train.examples),
        n_val_examples=len(val.examples),
        skipped_examples=train.skipped + val.skipped,
    )


def training_record(
    *, kind: str, settings: LoopSettings, outcome: LoopOutcome, n_params: int, max_seq_len: int,
    threads: int, train: EncodedSplit, val: EncodedSplit, seconds: float, extra: dict[str, Any],
) -> dict[str, Any]:
    """The content of ``training.json``."""
    import transformers

    from .. import __version__

    return {
        "kind": kind,
        **extra,
        "n_params": n_params,
        "settings": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "max_seq_len": max_seq_len,
            "patience": settings.patience,
            "monitor": settings.monitor,
            "keep": settings.keep,
            "seed": settings.seed,
            "threads": threads,
            "max_steps": settings.max_steps,
            "warmup_ratio": settings.warmup_ratio,
            "min_lr_ratio": settings.min_lr_ratio,
            "weight_decay": settings.weight_decay,
            "grad_clip": settings.grad_clip,
        },
        "examples": {
            "train": len(train.examples),
            "val": len(val.examples),
            "skipped": train.skipped + val.skipped,
            "train_target_tokens": sum(e.n_target for e in train.examples),
            "train_tokens": sum(len(e.input_ids) for e in train.examples),
        },
        "epochs_run": outcome.epochs_run,
        "steps": outcome.steps,
        "best_epoch": outcome.best_epoch,
        "kept_epoch": outcome.kept_epoch,
        "stopped_early": outcome.stopped_early,
        "train_losses": [round(x, 6) for x in outcome.train_losses],
        "val_losses": [round(x, 6) for x in outcome.val_losses],
        "val_accuracies": [round(x, 6) for x in outcome.val_accuracies],
        "best_val_loss": _finite_or_none(outcome.best_val_loss),
        "best_val_accuracy": _finite_or_none(outcome.best_val_accuracy),
        "seconds": round(seconds, 2),
        "versions": {
            "gguf_factory": __version__, "torch": torch.__version__, "transformers": transformers.__version__
        },
    }


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' own progress bars (e.g. "Writing model shards") for the duration."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def time_now() -> float:
    return time.perf_counter()
