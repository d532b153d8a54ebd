"""Full fine-tuning of a local Hugging Face causal-LM folder on chat data.

Any ``AutoModelForCausalLM`` architecture transformers knows (Llama-like, GPT-2-class...). Remote code
is never run; weights are read from safetensors, or from ``pytorch_model*.bin`` with transformers'
``weights_only`` torch loading. A tokenizer without a chat template gets ChatML: ``<|im_start|>`` and
``<|im_end|>`` become special tokens, the embeddings grow to fit, and ``<|im_end|>`` becomes the EOS.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError, TrainingError
from .devices import Runtime, start_runtime
from .loop import (
    TrainResult,
    check_out_dir,
    checkpoint_plan,
    count_params,
    encode_splits,
    load_splits,
    loop_settings,
    quiet_hf_progress,
    run_loop,
    save_run,
    seed_everything,
    time_now,
)
from .options import TrainSettings
from .tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneDefaults:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 8
    max_seq_len: int = 512
    patience: int = 5


FINETUNE_DEFAULTS = FinetuneDefaults()

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_base_folder(base: str | os.PathLike[str]) -> Path:
    """Check ``base`` looks like a HF causal-LM folder, else :class:`ModelError` naming what is missing."""
    folder = Path(base)
    if not folder.exists():
        raise ModelError(f"base model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelError(f"base model is not a folder: {folder} (expected a Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    if not has_weights:
        raise ModelError(
            f"{folder} has no weights: expected model.safetensors (or model-*.safetensors, pytorch_model.bin)"
        )
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}")
    return folder


def quantization_4bit(rt: Runtime) -> dict[str, Any]:
    """``from_pretrained`` arguments loading a base in 4 bits (NF4, bitsandbytes) on this process's GPU:
    QLoRA (:func:`.devices.check_options` refuses it without CUDA or bitsandbytes)."""
    import torch
    from transformers import BitsAndBytesConfig

    from .devices import check_options

    check_options(rt.options, lora=True)

    compute = torch.bfloat16 if rt.precision == "bf16" else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip
    return {"quantization_config": config, "device_map": {"": rt.accelerator.local_process_index}}


def load_base(base: str | os.PathLike[str], *, quantization: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Load model (float32 master weights; ``quantization``: e.g. :func:`quantization_4bit`) and tokenizer
    from a local folder, without remote code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = check_base_folder(base)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{folder}/config.json cannot be used: {e}") from None
    use_st = any(folder.glob("*.safetensors"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=use_st,
            dtype=torch.float32,
            **(quantization or {}),
        )
    except ValueError as e:
        raise ModelError(
            f"{folder}: model type {getattr(config, 'model_type', '?')!r} is not a causal language model "
            f"transformers can load without remote code ({e})"
        ) from None
    except OSError as e:
        raise ModelError(f"{folder}: cannot load the weights ({e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{folder}: cannot load the tokenizer ({e})") from None
    return model, tokenizer


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = tokenizer.unk_token_id
    if tid is None or (unk is not None and tid == unk and token != tokenizer.unk_token):
        raise ModelError(f"token {token!r} is not in the tokenizer vocabulary")
    return int(tid)


def prepare_chat(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Make ``tokenizer`` chat-ready (ChatML if it has no template) and ``model`` consistent with it.

    Returns what was done, for ``training.json``.
    """
    from tokenizers import AddedToken

    info: dict[str, Any] = {"chat_template": "base", "added_tokens": []}
    old_eos = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        vocab = tokenizer.get_vocab()
        new = [t for t in (IM_START, IM_END) if t not in vocab]
        if new:
            tokens = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in new]
            # positional False: keep the base's extra special tokens (the keyword's name differs in 4.x / 5.x)
            tokenizer.add_special_tokens({"additional_special_tokens": tokens}, False)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.eos_token = IM_END
        info.update(chat_template="chatml", added_tokens=new)
    if tokenizer.pad_token is None:
        if old_eos is not None:
            tokenizer.pad_token = old_eos
        elif ENDOFTEXT in tokenizer.get_vocab():
            tokenizer.pad_token = ENDOFTEXT
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ModelError(
            "the base tokenizer has a chat template but no EOS token; cannot tell where a reply ends"
        )

    n_vocab = len(tokenizer)
    emb = model.get_input_embeddings().weight.shape[0]
    if n_vocab > emb:
        model.resize_token_embeddings(n_vocab)
        info["resized_embeddings"] = [emb, n_vocab]

    eos_id = _token_id(tokenizer, tokenizer.eos_token)
    pad_id = _token_id(tokenizer, tokenizer.pad_token)
    eos_ids = [eos_id]
    if old_eos is not None and old_eos != tokenizer.eos_token:
        eos_ids.append(_token_id(tokenizer, old_eos))
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    gc = model.generation_config
    gc.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_id
    gc.pad_token_id = pad_id
    info.update(eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    return info


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def fit_seq_len(config: Any, given: int | None, default: int) -> int:
    """``given`` (or ``default``), capped at the model's positions (a warning when ``given`` is over)."""
    limit = _max_positions(config)
    seq = given if given is not None else default
    if limit is not None and seq > limit:
        if given is not None:
            log.warning("max_seq_len %d is over the model's %d positions; using %d", seq, limit, limit)
        seq = limit
    return seq


def finetune(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    settings: TrainSettings,
    base: str | os.PathLike[str],
) -> TrainResult:
    """Fine-tune all the weights of the HF model folder ``base`` (unset: :data:`FINETUNE_DEFAULTS`)."""
    t0 = time_now()
    d = FINETUNE_DEFAULTS
    loop = loop_settings(d, settings)
    check_base_folder(base)
    out = check_out_dir(out_dir)
    if out.resolve() == Path(base).resolve():
        raise TrainingError(f"the output folder is the base model folder: {out}")
    splits = load_splits(data_dir)
    rt = start_runtime(settings.run, settings.threads)
    ckpt_dir, resume = checkpoint_plan(rt, out)
    seed_everything(settings.seed)

    model, tokenizer = load_base(base)
    chat_info = prepare_chat(model, tokenizer)
    seq = fit_seq_len(model.config, settings.max_seq_len, d.max_seq_len)
    tr, va = encode_splits(tokenizer, splits, seq)
    n_params = count_params(model)
    log.info("fine-tuning %s (%.2f M parameters)", base, n_params / 1e6)
    pad_id = _token_id(tokenizer, tokenizer.pad_token)

    base_path = str(Path(base).resolve())
    outcome = run_loop(
        model, tr.examples, va.examples, loop, pad_id=pad_id, runtime=rt, checkpoint_dir=ckpt_dir,
        resume_from=resume, identity={"kind": "finetune", "base": base_path, "max_seq_len": seq},
    )  # fmt: skip

    def save(folder: Path) -> None:
        with quiet_hf_progress():
            model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_run(
        out, rt, save, kind="finetune", settings=loop, outcome=outcome, n_params=n_params, max_seq_len=seq,
        train=tr, val=va, started=t0, extra={"preset": None, "base": base_path, "chat": chat_info},
    )  # fmt: skip
