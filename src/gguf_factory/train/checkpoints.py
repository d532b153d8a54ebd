"""Training checkpoints: written atomically, read without unpickling anything.

A checkpoint is a folder ``checkpoint-<step>`` (8 digits) holding

* ``trainable.safetensors``: the trainable weights (the whole model, or the LoRA adapter's);
* ``best.safetensors``: the best epoch's trainable weights so far (``keep="best"`` runs);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state tensors and the rest of its state;
* ``scheduler.json``: the learning-rate scheduler's state;
* ``rng.safetensors`` + ``rng.json``: every process's torch (CPU and CUDA) generator states, Python's and
  NumPy's;
* ``state.json``, written last: step, epoch, the position in the epoch's data, the epoch's data-order
  generator state, the loop's history, each process's counters, and the run's identity (settings, data,
  number of processes) that a resumed run must match.

Tensors go through safetensors and everything else through JSON (``nan``/``inf`` included): a checkpoint
from elsewhere cannot run code when loaded. Only the main process writes; every process reads.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import files
from ..errors import TrainingError

log = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint-(\d{8})")
STATE_FILE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


# --------------------------------------------------------------------------------------------- (de)flatten


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """A JSON-able skeleton of ``obj`` whose tensors are moved into ``tensors`` (by generated keys).

    Tuples, dicts with non-string keys and NumPy arrays are tagged so that :func:`unflatten` gives back
    the same types (an optimizer's state is keyed by int, its betas are a tuple)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(x, tensors, prefix) for x in obj]}
    if isinstance(obj, list):
        return [flatten(x, tensors, prefix) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, prefix) for k, v in obj.items()}
        items = [[flatten(k, tensors, prefix), flatten(v, tensors, prefix)] for k, v in obj.items()]
        return {"__items__": items}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unflatten(x, tensors) for x in obj["__tuple__"])
        if "__items__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    return obj


def _save_tree(folder: Path, name: str, obj: Any) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(obj, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton) + "\n")


def _load_tree(folder: Path, name: str) -> Any:
    from safetensors.torch import load_file

    st = folder / f"{name}.safetensors"
    tensors = load_file(str(st)) if st.is_file() else {}
    return unflatten(json.loads((folder / f"{name}.json").read_text()), tensors)


# --------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch CPU (and CUDA), Python's ``random``, NumPy's."""
    import random

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- weights


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied parameters once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = dict(model.named_parameters())
    names = {n for n, p in params.items() if p.requires_grad}
    if names != set(tensors):
        missing = sorted(names - set(tensors))[:3]
        extra = sorted(set(tensors) - names)[:3]
        raise TrainingError(
            f"{where}: its weights do not fit this model (missing {missing}, unexpected {extra}); resume "
            "with the same model and options"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            p = params[n]
            if p.shape != t.shape:
                raise TrainingError(
                    f"{where}: {n} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}"
                )
            p.copy_(t.to(p.device, p.dtype))


# --------------------------------------------------------------------------------------------- folders


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (a half-written one is a hidden ``.partial``)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume(resume: bool | str | Path | None, folder: Path) -> Path | None:
    """The checkpoint to resume from: ``True`` = the latest in ``folder``; a path = that checkpoint (or the
    latest inside it, when it is a checkpoints folder)."""
    if resume is None or resume is False:
        return None
    if resume is True:
        found = list_checkpoints(folder)
        if not found:
            raise TrainingError(f"--resume: no checkpoint in {folder} (write some with --save-every)")
        return found[-1]
    p = Path(resume)
    if not p.exists():
        raise TrainingError(f"--resume: checkpoint not found: {p}")
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise TrainingError(f"--resume: {p} is not a checkpoint (no {STATE_FILE}) and holds none")
    return found[-1]


def save_checkpoint(
    folder: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    best: dict[str, torch.Tensor] | None,
    keep: int,
) -> Path:
    """Write ``checkpoint-<step>`` into ``folder`` atomically, then delete all but the ``keep`` latest.

    Called on the main process only; ``rng_states`` holds every process's (index = rank)."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    final = folder / checkpoint_name(step)
    with files.atomic_path(final) as tmp:
        tmp.mkdir()
        weights = {n: t.cpu().contiguous() for n, t in trainable_tensors(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file({n: t.cpu().contiguous() for n, t in best.items()}, str(tmp / "best.safetensors"))
        _save_tree(tmp, "optimizer", optimizer.state_dict())
        _save_tree(tmp, "scheduler", scheduler.state_dict())
        _save_tree(tmp, "rng", rng_states)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{ckpt}: unreadable checkpoint state ({e})") from None


def check_identity(ckpt: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must be the same run: same settings, data and number of processes."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise TrainingError(
                f"--resume {ckpt}: it was written with {key}={saved[key]!r}, this run has {key}={value!r}; "
                "resume with the same options and data"
            )


def load_checkpoint(
    ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore weights, optimizer, scheduler and this process's generators; return the loop state and the
    best weights (if saved)."""
    from safetensors.torch import load_file

    state = read_state(ckpt)
    try:
        load_trainable(model, load_file(str(ckpt / "trainable.safetensors")), ckpt)
        optimizer.load_state_dict(_load_tree(ckpt, "optimizer"))
        scheduler.load_state_dict(_load_tree(ckpt, "scheduler"))
        rngs = _load_tree(ckpt, "rng")
        best_file = ckpt / "best.safetensors"
        best = load_file(str(best_file)) if best_file.is_file() else None
    except (OSError, KeyError, ValueError) as e:
        raise TrainingError(f"{ckpt}: damaged or incomplete checkpoint ({e})") from None
    if rank >= len(rngs):
        raise TrainingError(f"{ckpt}: no generator state for process {rank}")
    set_rng_state(rngs[rank])
    return state, best
