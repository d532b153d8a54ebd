"""The ``train`` verb: a chat model from scratch (Llama architecture, own tokenizer) or by fine-tuning.

>>> result = train("data/", "models/nano")                     # doctest: +SKIP
>>> result = train("data/", "models/ft", base="models/smollm")  # doctest: +SKIP
>>> result = train("data/", "adapters/food", base="models/smollm", lora=True)  # doctest: +SKIP
>>> result = train("data/", "models/mini", preset="nano", distill_from="teacher.gguf")  # doctest: +SKIP

The output is an ordinary Hugging Face model folder (safetensors, tokenizer with a chat template,
generation config) plus ``training.json``; it is written beside ``out_dir`` and renamed into place at the
end, so an interrupted run never leaves a half model at ``out_dir``.

Every kind of training runs the same loop (:mod:`.loop`) through Hugging Face Accelerate: ``device`` and
``precision``, gradient accumulation and checkpointing, packing, checkpoints and resume, and several
processes when launched by ``torchrun`` / ``accelerate launch`` (see :class:`.options.RunOptions`). The
options the four kinds share are one :class:`.options.TrainSettings` (holding the ``RunOptions``), which
:func:`train` builds once and hands to ``train_scratch``, ``finetune``, ``train_lora`` or ``distill`` with
only that kind's own arguments.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .options import RunOptions, TrainSettings

if TYPE_CHECKING:  # the implementations import torch: loaded on first use, not with the package
    from .distill import DistillResult
    from .loop import TrainResult
    from .lora import LoraSettings
    from .scratch import ModelPreset

__all__ = [
    "DistillResult",
    "FINETUNE_DEFAULTS",
    "LORA_DEFAULTS",
    "PRESETS",
    "LoraSettings",
    "ModelPreset",
    "RunOptions",
    "TrainResult",
    "TrainSettings",
    "train",
]

_LAZY = {
    "DistillResult": "distill",
    "FINETUNE_DEFAULTS": "finetune",
    "LORA_DEFAULTS": "lora",
    "LoraSettings": "lora",
    "PRESETS": "scratch",
    "ModelPreset": "scratch",
    "TrainResult": "loop",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def train(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    preset: str | ModelPreset = "nano",
    base: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_seq_len: int | None = None,
    patience: int | None = None,
    monitor: str = "accuracy",
    keep: str | None = None,
    seed: int = 1234,
    threads: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    lora: bool | LoraSettings = False,
    distill_from: str | os.PathLike[str] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    device: str = "auto",
    precision: str = "auto",
    grad_accum: int = 1,
    gradient_checkpointing: bool = False,
    pack: bool = False,
    group_by_length: bool = True,
    save_every: int | None = None,
    keep_checkpoints: int = 2,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool | str | os.PathLike[str] | None = None,
    load_in_4bit: bool = False,
) -> TrainResult:
    """Train on the prepared dataset in ``data_dir`` and write a HF model folder at ``out_dir``.

    ``base=None`` trains ``preset`` (a name in :data:`PRESETS` or a :class:`ModelPreset`) from scratch,
    with a byte-level BPE tokenizer learnt from the training split. ``base`` = a model source (a local HF
    causal-LM folder, a GGUF, a named base such as ``smollm2-135m-instruct`` or a Hub id; see
    :mod:`gguf_factory.bases`) fine-tunes all of its weights; ``preset`` is then ignored and unset settings
    take :data:`FINETUNE_DEFAULTS`. The loss is on assistant turns only; the weights kept are those of the
    epoch with the best validation score (``monitor``: top-1 ``"accuracy"`` on the held-out assistant
    tokens, or ``"loss"``); training stops after ``patience`` epochs without improvement or after
    ``max_steps`` optimizer steps. ``keep="last"`` saves the last epoch's weights instead of the best's.
    ``patience`` and ``keep`` default to the preset's (fine-tuning: 5 and ``"best"``).

    ``lora=True`` (default :class:`LoraSettings`) or a :class:`LoraSettings` trains a PEFT LoRA adapter
    for ``base`` instead of all its weights: ``out_dir`` is then an adapter folder (unset settings take
    :data:`LORA_DEFAULTS`).

    ``distill_from`` = a teacher (local HF folder or GGUF with the same vocabulary) distils it into the
    student (``preset`` from scratch, then with the teacher's tokenizer, or ``base``): the loss is
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` with ``T = temperature``; the result
    is a :class:`~.distill.DistillResult` whose ``distill`` report compares student and teacher on the
    validation split (see :mod:`.distill`).

    How the run executes (any kind of training): ``device`` ``auto|cpu|cuda|mps``; ``precision``
    ``auto|fp32|bf16|fp16`` (Accelerate's mixed precision; auto: bf16 on a CUDA GPU that has it, else
    fp32); ``grad_accum`` micro-batches of ``batch_size`` per optimizer step; ``gradient_checkpointing``;
    ``pack`` each batch's conversations into one row without padding (attention kept within each);
    ``group_by_length`` batches. ``save_every`` N steps writes a checkpoint (weights or adapter, optimizer,
    scheduler, generators, data position) into ``checkpoint_dir`` (default ``<out_dir>.checkpoints``),
    keeping the last ``keep_checkpoints``; ``resume=True`` continues from the latest, ``resume=PATH`` from
    that one, and ends with the weights an uninterrupted run would have. ``load_in_4bit`` (with ``lora``,
    CUDA and bitsandbytes): QLoRA. Started by ``torchrun`` or ``accelerate launch``, each process trains
    on its shard of every batch round with DDP and only the first writes.
    """
    from ..bases import resolve_gguf_or_folder, resolve_path
    from .finetune import finetune
    from .scratch import train_scratch

    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, lr=lr, max_seq_len=max_seq_len, patience=patience,
        monitor=monitor, keep=keep, seed=seed, threads=threads, progress=progress, max_steps=max_steps,
        run=RunOptions(
            device=device, precision=precision, grad_accum=grad_accum,
            gradient_checkpointing=gradient_checkpointing, pack=pack, group_by_length=group_by_length,
            save_every=save_every, keep_checkpoints=keep_checkpoints, checkpoint_dir=checkpoint_dir,
            resume=resume, load_in_4bit=load_in_4bit,
        ),
    )  # fmt: skip
    _check_before_work(settings.run, lora, distill_from, temperature, alpha)
    if base is not None:  # a folder, a GGUF, a named base or a Hub id -> a HF folder
        base = resolve_path(base, what="base model")
    if distill_from is not None:  # GGUF teachers run in llama.cpp as they are
        teacher = resolve_gguf_or_folder(distill_from, what="teacher")
        from .distill import distill

        return distill(
            data_dir, out_dir, settings=settings, teacher=teacher, preset=preset, base=base,
            temperature=temperature, alpha=alpha,
        )  # fmt: skip
    if _wants_lora(lora):
        return _train_lora(data_dir, out_dir, settings, base, lora)
    if base is None:
        return train_scratch(data_dir, out_dir, settings=settings, preset=preset)
    return finetune(data_dir, out_dir, settings=settings, base=base)


def _wants_lora(lora: bool | LoraSettings | None) -> bool:
    return lora is not False and lora is not None


def _check_before_work(
    run: RunOptions,
    lora: bool | LoraSettings | None,
    distill_from: str | os.PathLike[str] | None,
    temperature: float,
    alpha: float,
) -> None:
    """The checks that need no model: before any work or log line, and before the sources are resolved
    (that may convert a GGUF)."""
    from ..errors import TrainingError
    from .devices import check_options

    check_options(run, lora=_wants_lora(lora))
    if distill_from is not None:
        from .distill import DistillSettings

        if _wants_lora(lora):
            raise TrainingError("--distill-from cannot be combined with --lora")
        DistillSettings(temperature=temperature, alpha=alpha).check()


def _train_lora(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: TrainSettings,
    base: str | os.PathLike[str] | None,
    lora: bool | LoraSettings,
) -> TrainResult:
    """A LoRA adapter for ``base`` (which it needs); ``lora``: ``True`` (the default
    :class:`LoraSettings`) or a :class:`LoraSettings`."""
    from ..errors import TrainingError
    from .lora import LoraSettings, train_lora

    if base is None:
        raise TrainingError("LoRA training (--lora) needs a base model folder (--base)")
    if lora is True:
        lora = LoraSettings()
    if not isinstance(lora, LoraSettings):
        raise TrainingError(f"lora must be True or a LoraSettings, got {lora!r}")
    return train_lora(data_dir, out_dir, settings=settings, base=base, lora=lora)
