"""The options every kind of training shares (scratch, fine-tune, LoRA and distillation): the loop's
(epochs, batch size, learning rate, early stopping... :class:`TrainSettings`) and how a run executes
(device, precision, gradient accumulation and checkpointing, packing, checkpoints and resume:
:class:`RunOptions`); and the ``train -c train.yaml`` file that holds every option of the ``train``
command (:class:`TrainConfig`).

Torch-free: the CLI reads and checks a config file before anything heavy is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import TrainingError

DEVICES = ("auto", "cpu", "cuda", "mps")
"""``auto``: CUDA if present, else Apple's MPS, else the CPU (Accelerate's own choice)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Mixed precision through Accelerate (autocast; the weights stay float32). ``auto``: bf16 on a CUDA
device that supports it, else fp32 (on a CPU fp32 keeps resumed runs bit-exact)."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 in Linux's CPU flags), where
    bf16 autocast trains faster than float32; elsewhere it may be slower, so callers keep fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class RunOptions:
    """The execution options of one run (none of them changes what a model is, only how it is trained)."""

    device: str = "auto"
    precision: str = "auto"
    grad_accum: int = 1
    """Micro-batches per optimizer step (each of ``batch_size`` conversations, per process)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (transformers' gradient checkpointing): less memory."""
    pack: bool = False
    """Concatenate each batch's conversations into one row without padding; attention stays within each
    conversation (per-conversation ``position_ids``; transformers builds the block-diagonal mask)."""
    group_by_length: bool = True
    """Batches of similar lengths (shuffled, then sorted by length within chunks): little padding."""
    save_every: int | None = None
    """Write a checkpoint every this many optimizer steps (``None``: never)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    checkpoint_dir: str | os.PathLike[str] | None = None
    """Where checkpoints go (default: ``<output>.checkpoints`` beside the output folder)."""
    resume: bool | str | os.PathLike[str] | None = None
    """``True``: resume from the latest checkpoint in ``checkpoint_dir``; a path: from that checkpoint."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4 bits through bitsandbytes (CUDA only; with ``lora``)."""

    def check(self) -> None:
        if self.device not in DEVICES:
            raise TrainingError(
                f"unknown device {self.device!r} (--device); choose one of: {', '.join(DEVICES)}"
            )
        if self.precision not in PRECISIONS:
            raise TrainingError(
                f"unknown precision {self.precision!r} (--precision); choose one of: {', '.join(PRECISIONS)}"
            )
        for name in ("grad_accum", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                flag = name.replace("_", "-")
                raise TrainingError(f"{name} (--{flag}) must be a whole number >= 1, got {v!r}")
        if self.save_every is not None and (
            isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 1
        ):
            raise TrainingError(
                f"save_every (--save-every) must be a whole number >= 1, got {self.save_every!r}"
            )

    def checkpoints_folder(self, out_dir: str | os.PathLike[str]) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        out = Path(out_dir)
        return out.parent / f"{out.name}.checkpoints"


@dataclass(frozen=True)
class TrainSettings:
    """The options of :func:`gguf_factory.train.train` that every kind of training takes alike. ``None``:
    the kind's default (a preset's from scratch, :data:`~.finetune.FINETUNE_DEFAULTS` or
    :data:`~.lora.LORA_DEFAULTS` with a base)."""

    epochs: int | None = None
    batch_size: int | None = None
    """Conversations per micro-batch (per process)."""
    lr: float | None = None
    max_seq_len: int | None = None
    """Examples are truncated to this many tokens (capped at the model's positions)."""
    patience: int | None = None
    """Early stopping: epochs without improvement of the ``monitor``-ed score."""
    monitor: str = "accuracy"
    """What picks the best epoch: validation top-1 ``"accuracy"`` or validation ``"loss"``."""
    keep: str | None = None
    """Save the ``"best"`` epoch's weights or the ``"last"``'s."""
    seed: int = 1234
    threads: int | None = None
    """CPU threads per process (``None``: the cores / processes per machine)."""
    progress: bool = True
    """Show a progress bar."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    run: RunOptions = field(default_factory=RunOptions)
    """How the run executes."""


# --------------------------------------------------------------------------------------------- train.yaml


class TrainConfig(BaseModel):
    """``train -c train.yaml``: every option of the ``train`` command, under its long name with ``_`` for
    ``-`` (``batch_size: 8``, ``lora_rank: 16``, ``save_every: 50``). Paths are relative to the file's
    folder. Options given on the command line win over the file."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = None
    output: str | None = None
    preset: str | None = None
    base: str | None = None
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    max_seq_len: int | None = Field(default=None, ge=8)
    max_steps: int | None = Field(default=None, ge=1)
    patience: int | None = Field(default=None, ge=1)
    monitor: Literal["accuracy", "loss"] | None = None
    keep: Literal["best", "last"] | None = None
    seed: int | None = None
    threads: int | None = Field(default=None, ge=1)
    lora: bool | None = None
    lora_rank: int | None = Field(default=None, ge=1)
    lora_alpha: float | None = Field(default=None, gt=0)
    lora_targets: list[str] | str | None = None
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    distill_from: str | None = None
    distill_temperature: float | None = Field(default=None, gt=0)
    distill_alpha: float | None = Field(default=None, ge=0, le=1)
    device: Literal["auto", "cpu", "cuda", "mps"] | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    grad_accum: int | None = Field(default=None, ge=1)
    gradient_checkpointing: bool | None = None
    pack: bool | None = None
    group_by_length: bool | None = None
    save_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int | None = Field(default=None, ge=1)
    checkpoint_dir: str | None = None
    resume: bool | str | None = None
    """``true`` or ``latest``: the latest checkpoint; else a checkpoint folder."""
    load_in_4bit: bool | None = None

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, v: list[str] | str | None) -> str | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list")
            return ",".join(v)
        return v

    def given(self, root: Path) -> dict[str, Any]:
        """The options the file sets, paths made relative to ``root`` (the file's folder)."""
        out = self.model_dump(exclude_unset=True)
        for key in ("data", "output", "checkpoint_dir"):
            if out.get(key) is not None:
                out[key] = str(root / out[key])
        for key in ("base", "distill_from"):  # a model source: a path there when one exists, else a name
            if out.get(key) is not None and (root / out[key]).exists():
                out[key] = str(root / out[key])
        if isinstance(out.get("resume"), str) and out["resume"] != "latest":
            out["resume"] = str(root / out["resume"])
        return out


def read_train_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options set in a ``train.yaml`` (pydantic-checked: an unknown or bad field is an
    :class:`~gguf_factory.errors.InputError` naming the file and the field)."""
    from ..schema import read_yaml_model

    p = Path(path)
    cfg = read_yaml_model(p, TrainConfig, "training config", "train options (e.g. data, base, epochs)")
    return cfg.given(p.parent)
