"""The training loop shared by from-scratch training, fine-tuning, LoRA and distillation, and the
chat-example encoder.

Examples are conversations rendered with the tokenizer's own chat template; the loss is taken on the
assistant turns only (their content and the template's closing token), and the vocabulary logits are
computed only at those positions. Batches are bucketed by length and padded dynamically (a batch costs as
much as its longest example) or packed into one row without padding (``pack``). Devices, precision and
processes go through Hugging Face Accelerate (:mod:`.devices`); checkpoints through :mod:`.checkpoints`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TrainingError
from ..turns import assistant_spans
from .devices import Runtime
from .options import TrainSettings

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
    tokens_per_second: float | None = None
    """Training tokens (all processes, no padding) per second of training steps."""
    world_size: int = 1


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
    The rule is :func:`gguf_factory.turns.assistant_spans`, the one evaluation scores with.
    """

    def render(msgs: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        return _render(tokenizer, list(msgs), add_generation_prompt)

    full, spans = assistant_spans(render, messages, getattr(tokenizer, "eos_token", None))
    return full, [(start, end) for _, start, end in spans]


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
    examples: Sequence[Example],
    batch_size: int,
    rng: random.Random | None,
    *,
    bucket_factor: int = 50,
    group_by_length: bool = True,
) -> list[list[int]]:
    """Index batches: shuffled, then sorted by length inside chunks of ``batch_size * bucket_factor``
    (``group_by_length=False``: only shuffled).

    With ``rng=None`` (validation) the batches are simply sorted by length.
    """
    idx = list(range(len(examples)))
    if rng is None:
        idx.sort(key=lambda i: len(examples[i].input_ids))
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(idx)
    if not group_by_length:
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    chunk = max(batch_size, batch_size * bucket_factor)
    batches: list[list[int]] = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c : c + chunk], key=lambda i: len(examples[i].input_ids))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def next_labels(ex: Example) -> list[int]:
    """What each position of ``ex`` predicts: the next token's label, ``IGNORE_INDEX`` at the end (per
    conversation, so that packed conversations never predict each other's tokens)."""
    return [*ex.labels[1:], IGNORE_INDEX]


def n_next_targets(ex: Example) -> int:
    """The positions of ``ex`` the loss is taken on (its targets after the first token)."""
    return sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)


def collate(
    examples: Sequence[Example], batch: Sequence[int], pad_id: int, *, pack: bool = False
) -> dict[str, torch.Tensor]:
    """Model inputs for the examples ``batch`` and where the loss is taken.

    Padded (default): ``input_ids``, ``attention_mask`` and ``labels`` of shape (rows, longest). Packed: one
    row holding every example back to back, no padding, with ``position_ids`` restarting at 0 for each
    conversation and no attention mask, from which transformers builds a block-diagonal causal mask:
    attention stays within each conversation. Both: ``keep``, the positions whose next token is a
    target, and ``targets``, those tokens in row-major order (the rows :func:`target_logits` returns).
    """
    if pack:
        ids: list[int] = []
        pos: list[int] = []
        lab: list[int] = []
        nxt: list[int] = []
        for i in batch:
            ex = examples[i]
            ids += ex.input_ids
            pos += range(len(ex.input_ids))
            lab += ex.labels
            nxt += next_labels(ex)
        following = torch.tensor([nxt], dtype=torch.long)
        keep = following != IGNORE_INDEX
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "labels": torch.tensor([lab], dtype=torch.long),
            "keep": keep,
            "targets": following[keep],
        }
    width = max(len(examples[i].input_ids) for i in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    following = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, i in enumerate(batch):
        ex = examples[i]
        n = len(ex.input_ids)
        ids_t[r, :n] = torch.tensor(ex.input_ids)
        labels[r, :n] = torch.tensor(ex.labels)
        following[r, :n] = torch.tensor(next_labels(ex))
        mask[r, :n] = 1
    keep = following != IGNORE_INDEX
    return {
        "input_ids": ids_t, "attention_mask": mask, "labels": labels, "keep": keep, "targets": following[keep]
    }  # fmt: skip


def batch_slots(examples: Sequence[Example], batch: Sequence[int], pack: bool) -> int:
    """Token positions the model computes for ``batch``: its tokens packed, rows x longest padded."""
    lens = [len(examples[i].input_ids) for i in batch]
    return sum(lens) if pack else len(lens) * max(lens)


# --------------------------------------------------------------------------------------------- forward


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and PEFT wrappers."""
    m = model
    while True:
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m = m.module
            continue
        get_base = getattr(m, "get_base_model", None)
        if callable(get_base) and get_base() is not m:
            m = get_base()
            continue
        return m


_TAKES_KEEP_MASK: dict[type, bool] = {}


def _takes_keep_mask(model: torch.nn.Module) -> bool:
    cls = type(inner_model(model))
    if cls not in _TAKES_KEEP_MASK:
        try:
            _TAKES_KEEP_MASK[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            _TAKES_KEEP_MASK[cls] = False
    return _TAKES_KEEP_MASK[cls]


def target_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (N, vocab) logits at the batch's target positions (``batch["keep"]``), row-major.

    They are computed only there when the model takes a boolean ``logits_to_keep`` (transformers' causal
    LMs): on a small model the vocabulary projection and its softmax are a large share of the work, and
    most tokens of a chat (the user's turns, the template) are not targets."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"]
    else:
        kw["attention_mask"] = batch["attention_mask"]
    keep = batch["keep"]
    if _takes_keep_mask(model):
        try:
            logits = model(**kw, logits_to_keep=keep).logits
        except IndexError:  # transformers < 5.2x index a 3-D tensor with it: an int-only logits_to_keep
            logits = None
        if logits is not None and logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        _TAKES_KEEP_MASK[type(inner_model(model))] = False  # an int-only logits_to_keep
    return model(**kw).logits[keep]


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], list[int]], tuple[torch.Tensor, int]]
"""A training objective for :func:`run_loop`: (model, batch, example indices) → (summed loss, count)."""


def _loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens, and their count."""
    rows = target_logits(model, batch)
    targets = batch["targets"]
    return F.cross_entropy(rows.float(), targets, reduction="sum"), int(targets.numel())


def _to(batch: dict[str, torch.Tensor], runtime: Runtime | None) -> dict[str, torch.Tensor]:
    if runtime is None:
        return batch
    from accelerate.utils import send_to_device

    return send_to_device(batch, runtime.device)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    *,
    pack: bool = False,
    runtime: Runtime | None = None,
) -> tuple[float, float]:
    """Token-weighted mean loss and greedy (top-1) accuracy over the target tokens of ``examples``.

    The accuracy is the share of target tokens that are the model's argmax given the true prefix: what
    greedy decoding depends on. Both are NaN when there is no example. With several processes each
    scores its share of the batches and the sums are added up.
    """
    if not examples:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    batches = make_batches(examples, batch_size, None)
    if runtime is not None and runtime.distributed:
        batches = batches[runtime.rank :: runtime.world_size]
    total, count, correct = 0.0, 0, 0
    for b in batches:
        batch = _to(collate(examples, b, pad_id, pack=pack), runtime)
        rows = target_logits(model, batch).float()
        targets = batch["targets"]
        total += float(F.cross_entropy(rows, targets, reduction="sum"))
        count += int(targets.numel())
        correct += int((rows.argmax(-1) == targets).sum())
    model.train(was_training)
    if runtime is not None and runtime.distributed:
        sums = torch.tensor([total, count, correct], dtype=torch.float64, device=runtime.device)
        total, count, correct = runtime.accelerator.reduce(sums, "sum").tolist()
    return total / max(count, 1), correct / max(count, 1)


def check_packing(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, runtime: Runtime | None = None
) -> float:
    """Score a few examples packed and padded; a model that lets packed conversations see each other
    (its attention ignores per-conversation ``position_ids``) is a :class:`TrainingError`.

    Returns the largest difference between the two losses per token."""
    batch = list(range(min(4, len(examples))))
    if len(batch) < 2:
        return 0.0
    was = model.training
    model.eval()
    with torch.no_grad():
        rows = [
            target_logits(model, _to(collate(examples, batch, pad_id, pack=p), runtime)).float()
            for p in (False, True)
        ]
        targets = _to(collate(examples, batch, pad_id), runtime)["targets"]
        losses = [F.cross_entropy(r, targets, reduction="none") for r in rows]
    model.train(was)
    diff = float((losses[0] - losses[1]).abs().max())
    if not diff < 1e-2:
        raise TrainingError(
            f"--pack: {type(inner_model(model)).__name__} does not keep attention within each packed "
            f"conversation (the packed loss differs from the padded one by {diff:.3g}); train without --pack"
        )
    return diff


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


def loop_settings(defaults: Any, settings: TrainSettings) -> LoopSettings:
    """The loop's settings for a run: those ``settings`` gives, the rest from ``defaults`` (a preset or a
    defaults record), checked."""
    return LoopSettings.with_defaults(
        defaults, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        patience=settings.patience, keep=settings.keep, monitor=settings.monitor, seed=settings.seed,
        max_steps=settings.max_steps, progress=settings.progress,
    )  # fmt: skip


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
    run: dict[str, Any] = field(default_factory=dict)
    """Device, precision, processes, batching: how the run executed."""
    throughput: dict[str, Any] = field(default_factory=dict)
    distributed: dict[str, Any] = field(default_factory=dict)
    """World size, backend and, per process, the tokens it trained on and (several processes) a digest of
    its final weights."""
    epoch_log: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    schedule: dict[str, Any] = field(default_factory=dict)
    """The learning-rate schedule the run was planned with: ``total_steps`` (``max_steps`` included: the
    cosine decay ends there, not at the epochs' end), ``warmup_steps``, ``steps_per_epoch`` and the
    ``final_lr`` it reached."""


@dataclass
class _Local:
    """One process's running counters (each process keeps its own; checkpoints keep every process's)."""

    ep_loss: float = 0.0
    ep_targets: int = 0
    tokens: int = 0
    targets: int = 0
    examples: int = 0

    def as_list(self) -> list[float]:
        return [self.ep_loss, self.ep_targets, self.tokens, self.targets, self.examples]

    @classmethod
    def from_list(cls, v: Sequence[float]) -> _Local:
        return cls(float(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]))


@dataclass
class _State:
    """Where the loop is: what a checkpoint stores (with each process's :class:`_Local`)."""

    epoch: int = 1
    round: int = 0
    """Rounds (one micro-batch per process) of ``epoch`` done."""
    step: int = 0
    epoch_rng: Any = None
    """The data-order generator's state when ``epoch``'s batches were drawn (JSON form)."""
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)
    best: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    epoch_log: list[dict[str, Any]] = field(default_factory=list)


def _optimizer(model: torch.nn.Module, s: LoopSettings, device_type: str = "cpu") -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one pass over all parameters) on CPUs and CUDA: the optimizer step of a 135 M model
    # is otherwise a large share of a CPU step
    fused = device_type in ("cpu", "cuda") and all(p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=1e-8, fused=fused or None)


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
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing (non-reentrant: works with frozen embeddings, LoRA, DDP)."""
    inner = inner_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise TrainingError(f"--gradient-checkpointing: {type(inner).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inner.config.use_cache = False


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the trainable weights' bytes, in name order (equal digests: equal weights)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _seconds(x: float) -> str:
    x = max(0, int(round(x)))
    return f"{x // 3600}:{x % 3600 // 60:02d}:{x % 60:02d}" if x >= 3600 else f"{x // 60}:{x % 60:02d}"


@dataclass
class _Plan:
    """How an epoch's batches are dealt to the processes, and how many optimizer steps the run takes."""

    rounds_per_epoch: int
    """Rounds (one micro-batch per process) in an epoch."""
    steps_per_epoch: int
    total: int
    """Optimizer steps of the whole run (``max_steps`` included)."""
    warmup: int


def _plan(n_examples: int, s: LoopSettings, world: int, accum: int) -> _Plan:
    """The run's rounds and steps; fewer batches than processes is a :class:`TrainingError`."""
    n_batches = math.ceil(n_examples / s.batch_size)
    rounds_per_epoch = n_batches // world
    if rounds_per_epoch < 1:
        raise TrainingError(
            f"{n_examples} training examples make {n_batches} batches of {s.batch_size}, fewer than "
            f"the {world} processes: lower the batch size"
        )
    if n_batches % world:
        log.info(
            "each epoch leaves out %d of its %d batches so that the %d processes take as many (drawn anew "
            "every epoch)", n_batches % world, n_batches, world,
        )  # fmt: skip
    steps_per_epoch = math.ceil(rounds_per_epoch / accum)
    total = s.epochs * steps_per_epoch
    if s.max_steps is not None:
        total = min(total, s.max_steps)
    warmup = max(1, round(s.warmup_ratio * total))
    return _Plan(rounds_per_epoch, steps_per_epoch, total, warmup)


@dataclass
class _Throughput:
    """What this run (not the one it resumed) trained on, and the time its steps took."""

    tokens: int = 0
    targets: int = 0
    slots: int = 0
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    steps: int = 0

    def rate(self) -> float:
        """Training tokens per second of training steps."""
        return self.tokens / max(self.train_seconds, 1e-9)

    def eta(self, steps_left: int) -> float:
        return steps_left * self.train_seconds / max(self.steps, 1)

    def record(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "target_tokens": self.targets,
            "computed_positions": self.slots,
            "padding_fraction": round(1 - self.tokens / self.slots, 4) if self.slots else 0.0,
            "train_seconds": round(self.train_seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "tokens_per_second": round(self.tokens / self.train_seconds, 1) if self.train_seconds else None,
            "steps": self.steps,
        }


class _Loop:
    """One run of :func:`run_loop`: the prepared model, optimizer and schedule, where the loop is
    (:class:`_State`, what a checkpoint keeps) and its counters."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_examples: Sequence[Example],
        val_examples: Sequence[Example],
        settings: LoopSettings,
        pad_id: int,
        *,
        loss_fn: LossFn | None,
        runtime: Runtime | None,
        checkpoint_dir: Path | None,
        identity: dict[str, Any] | None,
    ) -> None:
        from .devices import start_runtime
        from .options import RunOptions

        s = settings
        s.check()
        if not train_examples:
            raise TrainingError("no usable training example")
        self.model, self.train_examples, self.val_examples = model, train_examples, val_examples
        self.s, self.pad_id, self.loss_fn, self.checkpoint_dir = s, pad_id, loss_fn, checkpoint_dir
        self.rt = rt = runtime if runtime is not None else start_runtime(RunOptions(), None)
        self.opts = opts = rt.options
        self.acc = rt.accelerator
        self.world, self.rank, self.accum = rt.world_size, rt.rank, opts.grad_accum
        self.plan = _plan(len(train_examples), s, self.world, self.accum)
        self.lens = [len(e.input_ids) for e in train_examples]
        self.n_next = [n_next_targets(e) for e in train_examples]
        self.ident = {
            **(identity or {}),
            "epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr, "patience": s.patience,
            "seed": s.seed, "max_steps": s.max_steps, "monitor": s.monitor, "keep": s.keep,
            "grad_accum": self.accum, "pack": opts.pack, "group_by_length": opts.group_by_length,
            "world_size": self.world, "train_examples": len(train_examples),
            "train_data": data_digest(train_examples),
        }  # fmt: skip
        self._prepare_model()
        self.val_bs = max(1, s.batch_size * 2)
        self.st = _State()
        self.local = _Local()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.resumed: str | None = None
        self.done = _Throughput()
        self.stopped_early = False
        self.progress: Any = None
        self.task: Any = None

    def _prepare_model(self) -> None:
        """Gradient checkpointing, the optimizer and its schedule, Accelerate's wrapping; check packing."""
        s, rt = self.s, self.rt
        if self.opts.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        raw_opt = _optimizer(self.model, s, rt.device_type)
        lr_lambda = _lr_lambda(self.plan.total, self.plan.warmup, s.min_lr_ratio)
        self.sched = torch.optim.lr_scheduler.LambdaLR(raw_opt, lr_lambda)
        self.prepared, self.opt = self.acc.prepare(self.model, raw_opt)
        # the model itself (with the precision's autocast), no DDP hooks
        self.scored = self.acc.unwrap_model(self.prepared)
        if self.opts.pack:
            check_packing(self.scored, self.train_examples, self.pad_id, rt)

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path`` (its identity must match this run's)."""
        from . import checkpoints as ck

        saved = ck.read_state(path)
        ck.check_identity(path, saved.get("identity", {}), self.ident)
        loop, self.best_state = ck.load_checkpoint(
            path, model=self.scored, optimizer=self.opt, scheduler=self.sched, rank=self.rank
        )
        loop = loop["loop"]
        self.local = _Local.from_list(loop.pop("local")[self.rank])
        self.st = _State(**loop)
        self.resumed = str(path)
        log.info("resumed from %s: step %d, epoch %d", path, self.st.step, self.st.epoch)

    def save_checkpoint(self, eta: float) -> None:
        """Write a checkpoint of the current step (the main process; every process's generators and
        counters)."""
        from accelerate.utils import gather_object

        from . import checkpoints as ck

        rt, local = self.rt, self.local
        rngs = gather_object([ck.rng_state()]) if rt.distributed else [ck.rng_state()]
        locals_ = gather_object([local.as_list()]) if rt.distributed else [local.as_list()]
        if rt.is_main:
            assert self.checkpoint_dir is not None
            state = {
                "identity": self.ident,
                "threads": rt.threads,
                "loop": {**asdict(self.st), "local": locals_},
                "eta_seconds": round(eta, 1),
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            path = ck.save_checkpoint(
                self.checkpoint_dir, self.st.step, model=self.scored, optimizer=self.opt,
                scheduler=self.sched, state=state, rng_states=rngs, best=self.best_state,
                keep=self.opts.keep_checkpoints,
            )  # fmt: skip
            log.info("checkpoint %s", path)
        rt.wait()

    def train(self) -> None:
        """Epochs until ``epochs``, ``max_steps`` or early stopping, with a progress bar on the main
        process."""
        s, st, accum, world = self.s, self.st, self.accum, self.world
        rng = random.Random(s.seed)
        log.info(
            "training on %d examples (%d validation), %d steps/epoch, up to %d steps%s",
            len(self.train_examples), len(self.val_examples), self.plan.steps_per_epoch, self.plan.total,
            f" (batch {s.batch_size} x {accum} accumulated x {world} processes)" if accum * world > 1 else "",
        )  # fmt: skip
        self.progress = _progress(s.progress and self.rt.is_main)
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(
                f"epoch {st.epoch}/{s.epochs}", total=self.plan.total, completed=st.step, info=""
            )
        try:
            self.prepared.train()
            for epoch in range(st.epoch, s.epochs + 1):
                hit_max = self._train_epoch(epoch, rng)
                if self._end_epoch(epoch, hit_max):
                    break
        finally:
            if self.progress is not None:
                self.progress.stop()

    def _train_epoch(self, epoch: int, rng: random.Random) -> bool:
        """The optimizer steps of ``epoch`` (those after the round resumed from); True when ``max_steps``
        stopped it."""
        from . import checkpoints as ck

        s, st, world, accum = self.s, self.st, self.world, self.accum
        resuming_here = st.epoch == epoch and st.epoch_rng is not None
        st.epoch = epoch
        if resuming_here:
            rng.setstate(ck.unflatten(st.epoch_rng, {}))
        else:
            st.epoch_rng = ck.flatten(rng.getstate(), {})
            st.round = 0
        batches = make_batches(
            self.train_examples, s.batch_size, rng, group_by_length=self.opts.group_by_length
        )
        rounds = [batches[k * world : (k + 1) * world] for k in range(self.plan.rounds_per_epoch)]
        for w0 in range(0, self.plan.rounds_per_epoch, accum):
            window = rounds[w0 : w0 + accum]
            if w0 + len(window) <= st.round:  # done before the checkpoint this run resumed from
                continue
            if s.max_steps is not None and st.step >= s.max_steps:
                return True
            self._step(epoch, window, w0)
        return False

    def _step(self, epoch: int, window: list[list[list[int]]], w0: int) -> None:
        """One optimizer step over the rounds ``window`` (starting at round ``w0`` of the epoch)."""
        s, st, acc = self.s, self.st, self.acc
        t_win, c_win = time.perf_counter(), time.process_time()
        n_global = sum(self.n_next[i] for rnd in window for b in rnd for i in b)
        if n_global == 0:
            st.round = w0 + len(window)
            return
        win_loss = self._accumulate(window, n_global)
        if s.grad_clip:
            acc.clip_grad_norm_(self.prepared.parameters(), s.grad_clip)
        self.opt.step()
        if not acc.optimizer_step_was_skipped:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        self.done.steps += 1
        st.round = w0 + len(window)
        if self.rt.distributed:
            summed = acc.reduce(torch.tensor([win_loss], dtype=torch.float64, device=self.rt.device))
            win_loss = float(summed)
        step_loss = win_loss / n_global
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"the loss became {step_loss} at step {st.step}; try a lower learning rate (now {s.lr})"
            )
        done = self.done
        done.tokens += sum(self.lens[i] for rnd in window for b in rnd for i in b)
        done.targets += n_global
        done.slots += sum(batch_slots(self.train_examples, b, self.opts.pack) for rnd in window for b in rnd)
        done.train_seconds += time.perf_counter() - t_win
        done.cpu_seconds += time.process_time() - c_win
        eta = done.eta(self.plan.total - st.step)
        if self.progress is not None:
            self.progress.update(
                self.task, advance=1, description=f"epoch {epoch}/{s.epochs}",
                info=f"step {st.step} loss {step_loss:.3f} {done.rate():,.0f} tok/s",
            )  # fmt: skip
        save_every = self.opts.save_every
        if save_every and self.checkpoint_dir is not None and st.step % save_every == 0:
            self.save_checkpoint(eta)

    def _accumulate(self, window: list[list[list[int]]], n_global: int) -> float:
        """Forward and backward this process's micro-batch of each round (gradients synchronised on the
        last); the summed loss of its micro-batches."""
        acc, local = self.acc, self.local
        win_loss = 0.0
        for j, rnd in enumerate(window):
            b = rnd[self.rank]
            batch = _to(collate(self.train_examples, b, self.pad_id, pack=self.opts.pack), self.rt)
            sync = j == len(window) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.prepared):
                if self.loss_fn is None:
                    loss_sum, n = _loss_sum(self.prepared, batch)
                else:
                    loss_sum, n = self.loss_fn(self.prepared, batch, b)
                acc.backward(loss_sum * (self.world / n_global))
            lv = float(loss_sum.detach())
            win_loss += lv
            local.ep_loss += lv
            local.ep_targets += n
            local.tokens += sum(self.lens[i] for i in b)
            local.targets += n
            local.examples += len(b)
        return win_loss

    def _end_epoch(self, epoch: int, hit_max: bool) -> bool:
        """The epoch's end (or max_steps): its training loss over every process, validation, the best
        epoch; True when the run stops here."""
        s, st, local = self.s, self.st, self.local
        tl, vl, va = self._epoch_scores()
        improved = self._keep_if_best(epoch, tl, vl, va)
        eta = self.done.eta(self.plan.total - st.step)
        rate = self.done.rate()
        st.epoch_log.append({
            "epoch": epoch, "step": st.step, "tokens_per_second": round(rate, 1),
            "eta_seconds": round(eta, 1),
        })  # fmt: skip
        msg = f"epoch {epoch}: train loss {tl:.4f}" + (
            f", val loss {vl:.4f}, val accuracy {va:.2%}" if self.val_examples else ""
        )
        log.info("%s%s; %.0f tokens/s, ETA %s", msg, " (best)" if improved else "", rate, _seconds(eta))
        if self.progress is not None:
            self.progress.update(self.task, info=msg)
        local.ep_loss, local.ep_targets = 0.0, 0
        st.epoch_rng = None
        st.round = 0
        if hit_max or (s.max_steps is not None and st.step >= s.max_steps):
            return True
        if st.bad_epochs >= s.patience and epoch < s.epochs:
            self.stopped_early = True
            log.info(
                "early stop: no improvement for %d epochs; keeping epoch %d",
                s.patience, st.best_epoch if s.keep == "best" else epoch,
            )  # fmt: skip
            return True
        return False

    def _epoch_scores(self) -> tuple[float, float, float]:
        """The epoch's training loss (every process's targets) and its validation loss and accuracy."""
        rt, local = self.rt, self.local
        sums = torch.tensor([local.ep_loss, local.ep_targets], dtype=torch.float64, device=rt.device)
        if rt.distributed:
            sums = self.acc.reduce(sums, "sum")
        ep_loss, ep_targets = sums.tolist()
        tl = ep_loss / max(ep_targets, 1)
        vl, va = evaluate(
            self.scored, self.val_examples, self.val_bs, self.pad_id, pack=self.opts.pack, runtime=rt
        )
        return tl, vl, va

    def _keep_if_best(self, epoch: int, tl: float, vl: float, va: float) -> bool:
        """Record the epoch's scores; keep its weights when it is the best so far (``keep="best"``)."""
        from . import checkpoints as ck

        s, st = self.s, self.st
        st.train_losses.append(tl)
        if self.val_examples:
            st.val_losses.append(vl)
            st.val_accs.append(va)
        score = (-va if s.monitor == "accuracy" else vl) if self.val_examples else tl
        improved = score < st.best - s.min_delta
        if improved:
            st.best, st.best_epoch, st.bad_epochs = score, epoch, 0
            if s.keep == "best":
                self.best_state = {n: t.clone() for n, t in ck.trainable_tensors(self.scored).items()}
        else:
            st.bad_epochs += 1
        return improved

    def finish(self) -> LoopOutcome:
        """Leave the caller's model holding the kept weights, unwrapped, and sum up the run."""
        from . import checkpoints as ck

        s, st, rt = self.s, self.st, self.rt
        epochs_run = len(st.train_losses)
        kept = epochs_run
        if self.best_state is not None and s.keep == "best":
            ck.load_trainable(self.scored, self.best_state, Path("(best epoch)"))
            kept = st.best_epoch
        # the caller's model, without the autocast wrapper
        self.acc.unwrap_model(self.prepared, keep_fp32_wrapper=False)
        self.model.eval()
        ranks = self._ranks()
        rt.wait()
        self.acc.free_memory()
        best_epoch = st.best_epoch
        scored_epoch = bool(self.val_examples and best_epoch)
        opts = self.opts
        return LoopOutcome(
            epochs_run=epochs_run,
            train_losses=st.train_losses,
            val_losses=st.val_losses,
            best_val_loss=st.val_losses[best_epoch - 1] if scored_epoch else float("nan"),
            best_epoch=best_epoch,
            stopped_early=self.stopped_early,
            steps=st.step,
            val_accuracies=st.val_accs,
            best_val_accuracy=st.val_accs[best_epoch - 1] if scored_epoch else float("nan"),
            kept_epoch=kept,
            run={
                **rt.describe(),
                "grad_accum": self.accum,
                "effective_batch": s.batch_size * self.accum * self.world,
                "pack": opts.pack,
                "group_by_length": opts.group_by_length,
                "gradient_checkpointing": opts.gradient_checkpointing,
            },
            throughput=self.done.record(),
            distributed={"world_size": self.world, "backend": rt.backend, "ranks": ranks},
            epoch_log=st.epoch_log,
            resumed_from=self.resumed,
            schedule={
                "total_steps": self.plan.total,
                "warmup_steps": self.plan.warmup,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "final_lr": self.sched.get_last_lr()[0],
            },
        )

    def _ranks(self) -> list[dict[str, Any]]:
        """Per process: the tokens, target tokens and examples it trained on and (several processes) a
        digest of its final weights."""
        local, rank = self.local, self.rank
        mine = [local.tokens, local.targets, local.examples]
        digest = weights_digest(self.scored) if self.rt.distributed else None
        if self.rt.distributed:
            from accelerate.utils import gather_object

            everyone = gather_object([[rank, *mine, digest]])
        else:
            everyone = [[rank, *mine, digest]]
        return [
            {
                "rank": r,
                "tokens": t,
                "target_tokens": n,
                "examples": e,
                **({"weights_sha256": d} if d else {}),
            }
            for r, t, n, e, d in sorted(everyone)
        ]


def run_loop(
    model: torch.nn.Module,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    settings: LoopSettings,
    pad_id: int,
    *,
    loss_fn: LossFn | None = None,
    runtime: Runtime | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    identity: dict[str, Any] | None = None,
) -> LoopOutcome:
    """Train ``model`` in place and leave it holding the weights of its best epoch (``keep="best"``) or of
    its last epoch (``keep="last"``).

    The best epoch is the one with the highest validation top-1 accuracy (``monitor="accuracy"``) or the
    lowest validation loss (``monitor="loss"``); the training loss decides when there is no validation
    example. Training stops after ``patience`` epochs without improvement, or at ``max_steps`` steps.

    Why accuracy by default: on a small chat dataset the validation loss bottoms out early, while the
    model's greedy answers (what a chat shows) keep getting better for many epochs after it; the top-1
    accuracy on the held-out answers follows the greedy behaviour.

    Execution (``runtime``, default: one CPU process): every epoch's batches are drawn from the seed by
    every process alike; with ``W`` processes, round ``k`` gives batch ``k*W + r`` to process ``r`` (its
    shard), and ``grad_accum`` rounds make one optimizer step. The loss of a step is the sum over all its
    target tokens (every process, every micro-batch) divided by their number, known in advance from the
    batches: so 2 processes x batch 4, or batch 4 x 2 accumulated, take the same step as batch 8.
    ``checkpoint_dir`` + ``runtime.options.save_every`` write checkpoints; ``resume_from`` continues one
    (its ``identity`` must match).

    ``loss_fn(model, batch, indices)`` replaces the training objective (distillation): it returns a summed
    loss over the batch's target tokens and their count, like the default cross-entropy; ``indices`` are
    the positions in ``train_examples`` of the batch's rows. Validation stays cross-entropy.
    """
    loop = _Loop(
        model, train_examples, val_examples, settings, pad_id, loss_fn=loss_fn, runtime=runtime,
        checkpoint_dir=checkpoint_dir, identity=identity,
    )  # fmt: skip
    if resume_from is not None:
        loop.resume(resume_from)
    loop.train()
    return loop.finish()


# --------------------------------------------------------------------------------------------- outputs


@contextlib.contextmanager
def output_folder(out: Path, runtime: Runtime) -> Iterator[Path | None]:
    """The main process gets a new temporary folder beside ``out``, renamed over it when the block ends
    without error (never a half-written model at ``out``); the other processes get ``None``. Everyone
    waits for the write."""
    from .. import files

    if runtime.is_main:
        with files.atomic_path(out) as tmp:
            tmp.mkdir()
            yield tmp
    else:
        yield None
    runtime.wait()


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


def checkpoint_plan(runtime: Runtime, out: Path) -> tuple[Path | None, Path | None]:
    """(checkpoints folder or None, checkpoint to resume from or None) for the run's options."""
    from .checkpoints import find_resume

    opts = runtime.options
    folder = opts.checkpoints_folder(out)
    resume = find_resume(opts.resume, folder)
    if opts.save_every is None and resume is None:
        return None, None
    if resume is not None and opts.checkpoint_dir is None and opts.resume is not True:
        folder = resume.parent  # keep writing beside the checkpoint resumed from
    if not folder.parent.is_dir():
        from ..errors import InputError

        raise InputError(f"checkpoint folder's parent does not exist: {folder.parent}")
    if resume is not None and not runtime.threads_chosen:
        from .checkpoints import read_state

        saved = read_state(resume).get("threads")
        if isinstance(saved, int) and saved != runtime.threads:  # the same sums, the same weights
            log.info("resuming with the checkpoint's %d threads (--threads to choose)", saved)
            runtime.use_threads(saved)
    return folder, resume


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
            tr.skipped,
            va.skipped,
            max_seq_len,
        )
    if not va.examples:
        log.warning("no validation example: the best epoch is chosen on the training loss")
    return tr, va


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_result(
    out: Path,
    n_params: int,
    settings: LoopSettings,
    outcome: LoopOutcome,
    train: EncodedSplit,
    val: EncodedSplit,
    *,
    seconds: float,
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
        tokens_per_second=outcome.throughput.get("tokens_per_second"),
        world_size=int(outcome.distributed.get("world_size", 1)),
    )


def save_run(
    out: Path,
    runtime: Runtime,
    save: Callable[[Path], None],
    *,
    kind: str,
    settings: LoopSettings,
    outcome: LoopOutcome,
    n_params: int,
    max_seq_len: int,
    train: EncodedSplit,
    val: EncodedSplit,
    started: float,
    extra: dict[str, Any],
) -> TrainResult:
    """The end of every kind of training: the main process writes the model at ``out`` (``save(folder)``
    writes its files, then ``training.json`` goes beside them; see :func:`output_folder`); every process
    returns the run's :class:`TrainResult` (``started``: :func:`time_now` at the start)."""
    with output_folder(out, runtime) as tmp:
        if tmp is not None:
            save(tmp)
            record = training_record(
                kind=kind,
                settings=settings,
                outcome=outcome,
                n_params=n_params,
                max_seq_len=max_seq_len,
                threads=runtime.threads,
                train=train,
                val=val,
                seconds=time_now() - started,
                extra=extra,
            )
            write_json(tmp / "training.json", record)
    return train_result(out, n_params, settings, outcome, train, val, seconds=time_now() - started)


def training_record(
    *,
    kind: str,
    settings: LoopSettings,
    outcome: LoopOutcome,
    n_params: int,
    max_seq_len: int,
    threads: int,
    train: EncodedSplit,
    val: EncodedSplit,
    seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The content of ``training.json``."""
    import transformers

    from .._version import __version__

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
        "run": outcome.run,
        "examples": {
            "train": len(train.examples),
            "val": len(val.examples),
            "skipped": train.skipped + val.skipped,
            "train_target_tokens": sum(e.n_target for e in train.examples),
            "train_tokens": sum(len(e.input_ids) for e in train.examples),
        },
        "epochs_run": outcome.epochs_run,
        "steps": outcome.steps,
        "schedule": outcome.schedule,
        "best_epoch": outcome.best_epoch,
        "kept_epoch": outcome.kept_epoch,
        "stopped_early": outcome.stopped_early,
        "train_losses": [round(x, 6) for x in outcome.train_losses],
        "val_losses": [round(x, 6) for x in outcome.val_losses],
        "val_accuracies": [round(x, 6) for x in outcome.val_accuracies],
        "best_val_loss": _finite_or_none(outcome.best_val_loss),
        "best_val_accuracy": _finite_or_none(outcome.best_val_accuracy),
        "throughput": outcome.throughput,
        "epoch_log": outcome.epoch_log,
        "world_size": outcome.distributed.get("world_size", 1),
        "distributed": outcome.distributed,
        "resumed_from": outcome.resumed_from,
        "seconds": round(seconds, 2),
        "versions": {
            "gguf_factory": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")


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
