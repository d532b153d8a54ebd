"""Devices, precision and processes for a training run, all through Hugging Face Accelerate.

One :class:`Runtime` per run wraps an ``accelerate.Accelerator``: it picks the device (``--device``), the
mixed precision (``--precision``: autocast, float32 master weights), and, when the command was started by
``torchrun`` or ``accelerate launch``, joins the process group (NCCL on GPUs, gloo on CPUs) so that the
model is wrapped in PyTorch's DistributedDataParallel. Nothing here moves tensors by hand.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingError
from .options import RunOptions

log = logging.getLogger(__name__)

_ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _cuda() -> bool:
    return torch.cuda.is_available()


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``mps``; a device that is not there is a :class:`TrainingError`."""
    if device == "auto":
        return "cuda" if _cuda() else "mps" if _mps() else "cpu"
    if device == "cuda" and not _cuda():
        raise TrainingError(
            f"--device cuda: PyTorch sees no CUDA device (torch {torch.__version__}); install a CUDA build "
            "of torch on a machine with an NVIDIA GPU (see the README's GPU section), or use --device cpu"
        )
    if device == "mps" and not _mps():
        raise TrainingError("--device mps: PyTorch sees no Apple MPS device; use --device cpu")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``; ``auto`` is bf16 on a CUDA GPU that supports it."""
    if precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise TrainingError(
            "--precision fp16 needs a GPU (Accelerate has no float16 autocast on a CPU); use bf16 or fp32"
        )
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return precision


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_options(options: RunOptions, *, lora: bool) -> tuple[str, str]:
    """Check ``options`` against this machine before any work (and before anything is logged): the
    device and precision (returned), and what ``load_in_4bit`` needs (LoRA, CUDA, bitsandbytes)."""
    options.check()
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    if options.load_in_4bit:
        if not lora:
            raise TrainingError(
                "--load-in-4bit loads the base in 4 bits for a LoRA adapter (QLoRA): add --lora"
            )
        if device != "cuda":
            raise TrainingError(
                f"--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); this run is on {device}"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    return device, precision


def _busy_cores() -> float:
    """How many cores other programs keep busy now: the runnable tasks in ``/proc/loadavg`` less this one
    (the median of five looks over 0.2 s), else the 1-minute load average. Not the load average where the
    snapshot exists: it lags by minutes and counts this very process's own earlier work (a demo that just
    converted a model would train on one thread)."""
    try:
        looks = []
        for i in range(5):
            if i:
                time.sleep(0.05)
            with open("/proc/loadavg", encoding="ascii") as f:
                looks.append(int(f.read().split()[3].split("/")[0]))
        return float(max(0, sorted(looks)[2] - 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def default_threads(threads: int | None) -> int:
    """``threads``, else this process's share of the idle cores.

    The cores are shared among the processes of this machine (``LOCAL_WORLD_SIZE``), and cores other
    programs keep busy now (:func:`_busy_cores`) are left to them: an intra-op thread that waits for a
    busy core stalls every matrix product at its barrier. On a 2-core machine that others load, one thread
    trains ~2x faster than two (measured: benchmarks/results/train_throughput.md)."""
    if threads is not None:
        if isinstance(threads, bool) or threads < 1:
            raise TrainingError(f"threads must be at least 1, got {threads}")
        return threads
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = _cores()
    share = max(1, cores // local)
    busy = _busy_cores()
    idle = max(1, round((cores - busy) / local))
    n = min(share, idle)
    if n < share:
        log.info(
            "using %d of %d threads: the machine is busy (%.0f other tasks running on %d cores); "
            "--threads to choose",
            n, share, busy, cores,
        )  # fmt: skip
    return n


@dataclass
class Runtime:
    """The Accelerator of a run and what the loop asks of it."""

    accelerator: Any
    options: RunOptions
    device_type: str
    precision: str
    threads: int
    threads_chosen: bool = False
    """``threads`` was given (else chosen from the idle cores, and a resumed run takes its checkpoint's)."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str | None:
        return getattr(self.accelerator.state, "backend", None) if self.distributed else None

    def use_threads(self, n: int) -> None:
        torch.set_num_threads(n)
        self.threads = n

    def wait(self) -> None:
        """A barrier across the processes (nothing with one process)."""
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.device_type,
            "precision": self.precision,
            "world_size": self.world_size,
            "backend": self.backend,
            "threads_per_process": self.threads,
        }


def start_runtime(options: RunOptions, threads: int | None) -> Runtime:
    """The :class:`Runtime` for ``options``: checked device and precision, an Accelerator, CPU threads."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    device, precision = check_options(options, lora=True)
    n_threads = default_threads(threads)
    # Accelerate keeps one AcceleratorState per process; a run may need another precision than the last
    # one in this process (tests, the factory). The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(
            cpu=device == "cpu",
            mixed_precision=_ACCELERATE_PRECISION[precision],
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
            step_scheduler_with_optimizer=False,
        )
    except (ValueError, RuntimeError) as e:
        raise TrainingError(f"cannot set up {device} training with {precision}: {e}") from None
    torch.set_num_threads(n_threads)
    rt = Runtime(accelerator, options, device, precision, n_threads, threads_chosen=threads is not None)
    if not rt.is_main:  # one voice: the other processes only warn
        logging.getLogger("gguf_factory").setLevel(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    if rt.distributed:
        log.info(
            "distributed training: %d processes (%s), %s, %d threads each",
            rt.world_size, rt.backend, device, n_threads,
        )  # fmt: skip
    else:
        log.info("training on %s, %s, %d threads", device, precision, n_threads)
    return rt
