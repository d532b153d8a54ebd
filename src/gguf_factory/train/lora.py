"""LoRA fine-tuning (PEFT) of a local Hugging Face causal-LM folder on one prepared chat dataset.

The base is loaded and made chat-ready exactly as for full fine-tuning (:mod:`.finetune`), its weights are
frozen, and PEFT LoRA pairs are trained on the chosen linear layers with the shared loop (:mod:`.loop`).
The output folder is a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) with the
tokenizer files (carrying the chat template) and ``training.json``; it is written beside ``out_dir`` and
renamed into place at the end. ``gguf-factory convert-lora`` turns it into a GGUF LoRA llama.cpp applies at
load time; ``gguf-factory merge`` folds it into the base.

A LoRA adapter cannot add tokens: a base without a chat template whose vocabulary lacks ChatML's
``<|im_start|>`` / ``<|im_end|>`` is refused (fine-tune it fully first, or pick a chat base).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from .devices import Runtime, start_runtime
from .finetune import _token_id, check_base_folder, fit_seq_len, load_base, prepare_chat, quantization_4bit
from .loop import (
    EncodedSplit,
    LoopSettings,
    TrainResult,
    check_out_dir,
    checkpoint_plan,
    count_params,
    encode_splits,
    evaluate,
    load_splits,
    loop_settings,
    quiet_hf_progress,
    run_loop,
    save_run,
    seed_everything,
    time_now,
)
from .options import TrainSettings

log = logging.getLogger(__name__)

__all__ = ["LORA_DEFAULTS", "LoraSettings", "default_targets", "linear_modules", "train_lora"]


@dataclass(frozen=True)
class LoraDefaults:
    """Loop settings a LoRA run takes when unset (LoRA wants a higher learning rate than full tuning)."""

    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 8
    max_seq_len: int = 512
    patience: int = 5


LORA_DEFAULTS = LoraDefaults()

# Leaf names of MoE routers: linear layers inside the blocks that are not projections worth adapting.
_ROUTERS = frozenset({"gate", "router"})


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape. ``targets=None``: every attention and MLP projection of the architecture
    (:func:`default_targets`). ``alpha / rank`` scales the update, as in PEFT."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    dropout: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)
    """More ``peft.LoraConfig`` keyword arguments (e.g. ``use_rslora=True``), passed as they are."""

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise TrainingError(f"LoRA rank (--lora-rank) must be a whole number >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise TrainingError(f"LoRA alpha (--lora-alpha) must be a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise TrainingError(f"LoRA alpha (--lora-alpha) must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise TrainingError(f"LoRA dropout (--lora-dropout) must be a number, got {self.dropout!r}")
        if not (0 <= self.dropout < 1):
            raise TrainingError(f"LoRA dropout (--lora-dropout) must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None:
            if isinstance(self.targets, str) or not self.targets:
                raise TrainingError(
                    f"LoRA targets (--lora-targets) must be a non-empty list of names, got {self.targets!r}"
                )
            for t in self.targets:
                if not isinstance(t, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", t):
                    raise TrainingError(f"LoRA targets (--lora-targets): {t!r} is not a module name")


def _is_linear(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


def linear_modules(model: Any) -> list[str]:
    """Full names of the linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) inside repeated blocks:
    the attention and MLP projections (not the embeddings, not ``lm_head``)."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if _is_linear(module) and any(p.isdigit() for p in parts[:-1]):
            names.append(name)
    return names


def default_targets(model: Any) -> list[str]:
    """The leaf names of :func:`linear_modules` (e.g. ``q_proj ... down_proj`` for Llama, ``c_attn c_proj
    c_fc`` for GPT-2, ``qkv_proj o_proj gate_up_proj down_proj`` for Phi-3), MoE routers left out."""
    leaves = {n.rsplit(".", 1)[-1] for n in linear_modules(model)}
    return sorted(leaves - _ROUTERS)


def _check_targets(model: Any, targets: list[str]) -> None:
    """Each target must name (as PEFT matches it: the whole name or a dotted suffix) a linear layer."""
    linear = linear_modules(model)
    available = ", ".join(default_targets(model)) or "none"
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linear):
            other = any(n == t or n.endswith("." + t) for n, _ in model.named_modules())
            why = "is not a linear layer inside the model's blocks" if other else "matches no module"
            raise TrainingError(
                f"LoRA targets (--lora-targets): {t!r} {why} of {type(model).__name__}; "
                f"choose from: {available}"
            )


def _load_chat_base(base_dir: Path, quantization: dict[str, Any] | None) -> tuple[Any, Any, dict[str, Any]]:
    """The base model and its tokenizer made chat-ready (:func:`.finetune.prepare_chat`), and what that
    did; a base that would need new tokens (an adapter cannot add them) is a :class:`TrainingError`."""
    model, tokenizer = load_base(base_dir, quantization=quantization)
    n_emb = model.get_input_embeddings().weight.shape[0]
    chat_info = prepare_chat(model, tokenizer)
    if "resized_embeddings" in chat_info:
        raise TrainingError(
            f"{base_dir}: the base has no chat template and its vocabulary lacks "
            f"{', '.join(chat_info['added_tokens'])}; "
            f"a LoRA adapter cannot add tokens ({n_emb} embeddings): fine-tune the base fully first "
            "(train --base without --lora) or use a base with a chat template"
        )
    return model, tokenizer, chat_info


def _add_adapter(
    model: Any, lora: LoraSettings, base_dir: Path, *, quantized: bool
) -> tuple[Any, Any, list[str]]:
    """(the base, prepared for k-bit training when ``quantized``; the PEFT model with the LoRA pairs on
    its targets; those targets)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = list(lora.targets) if lora.targets is not None else default_targets(model)
    if not targets:
        raise TrainingError(f"{base_dir}: no linear layer to adapt was found; name them with --lora-targets")
    _check_targets(model, targets)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing, if asked, is enabled by the loop (non-reentrant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.name_or_path = str(base_dir)  # PEFT records it as base_model_name_or_path
    conv1d = any(not isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if _is_linear(m))
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
        **lora.extra,
    )
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError) as e:
        raise TrainingError(f"cannot add LoRA to {base_dir} with targets {targets}: {e}") from None
    return model, peft_model, targets


def _base_scores(
    peft_model: Any, val: EncodedSplit, loop: LoopSettings, pad_id: int, rt: Runtime
) -> tuple[float | None, float | None]:
    """The base's validation loss and accuracy (the adapter disabled, on the run's device(s)); None where
    there is none."""
    with peft_model.disable_adapter():
        loss, acc = evaluate(
            peft_model, val.examples, max(1, loop.batch_size * 2), pad_id, pack=rt.options.pack, runtime=rt
        )
    return (loss if math.isfinite(loss) else None), (acc if math.isfinite(acc) else None)


def train_lora(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    settings: TrainSettings,
    base: str | os.PathLike[str],
    lora: LoraSettings | None = None,
) -> TrainResult:
    """Train a LoRA adapter for the HF model folder ``base`` on the dataset in ``data_dir``.

    ``TrainResult.model_dir`` is the adapter folder and ``n_params`` the adapter's (trainable) parameters.
    ``training.json`` also records the base's validation loss and accuracy (the adapter disabled).
    ``settings.run.load_in_4bit`` loads the base in 4 bits (QLoRA, CUDA and bitsandbytes only).
    """
    t0 = time_now()
    lora = lora or LoraSettings()
    lora.check()
    d = LORA_DEFAULTS
    loop = loop_settings(d, settings)
    base_dir = check_base_folder(base).resolve()
    out = check_out_dir(out_dir)
    if out.resolve() == base_dir:
        raise TrainingError(f"the output folder is the base model folder: {out}")
    splits = load_splits(data_dir)
    rt = start_runtime(settings.run, settings.threads)
    quantization = quantization_4bit(rt) if rt.options.load_in_4bit else None
    ckpt_dir, resume = checkpoint_plan(rt, out)
    seed_everything(settings.seed)

    model, tokenizer, chat_info = _load_chat_base(base_dir, quantization)
    seq = fit_seq_len(model.config, settings.max_seq_len, d.max_seq_len)
    tr, va = encode_splits(tokenizer, splits, seq)
    pad_id = _token_id(tokenizer, tokenizer.pad_token)
    base_params = count_params(model)
    model, peft_model, targets = _add_adapter(model, lora, base_dir, quantized=quantization is not None)
    n_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info(
        "LoRA on %s: rank %d, alpha %g, targets %s: %.3f M trainable of %.2f M parameters%s",
        base_dir,
        lora.rank,
        lora.alpha,
        ",".join(targets),
        n_params / 1e6,
        base_params / 1e6,
        " (base in 4 bits)" if quantization is not None else "",
    )
    lora_record = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": targets,
        **({"extra": lora.extra} if lora.extra else {}),
    }

    outcome = run_loop(
        peft_model, tr.examples, va.examples, loop, pad_id=pad_id, runtime=rt, checkpoint_dir=ckpt_dir,
        resume_from=resume,
        identity={"kind": "lora", "base": str(base_dir), "max_seq_len": seq, "lora": lora_record},
    )  # fmt: skip
    base_loss, base_acc = _base_scores(peft_model, va, loop, pad_id, rt)

    def save(folder: Path) -> None:
        with quiet_hf_progress():
            peft_model.save_pretrained(folder, save_embedding_layers=False)
        tokenizer.save_pretrained(folder)
        readme = folder / "README.md"  # PEFT's model-card stub: not ours to ship half-filled
        if readme.is_file():
            readme.unlink()

    extra = {
        "preset": None,
        "base": str(base_dir),
        "base_architecture": list(getattr(model.config, "architectures", None) or []),
        "base_n_params": base_params,
        "lora": lora_record,
        "load_in_4bit": quantization is not None,
        "base_val_loss": base_loss,
        "base_val_accuracy": base_acc,
        "chat": chat_info,
    }
    return save_run(
        out, rt, save, kind="lora", settings=loop, outcome=outcome, n_params=n_params, max_seq_len=seq,
        train=tr, val=va, started=t0, extra=extra,
    )  # fmt: skip
