"""The ``prune`` verb: structured pruning of a Llama-architecture model, guided by the user's own chat data.

Whole FFN channels and whole attention heads are removed, so the model really shrinks: fewer parameters,
smaller safetensors, a smaller GGUF. (Magnitude sparsity, which zeroes weights but keeps every matrix
its size, is deliberately not offered: it does not make a GGUF any smaller or faster.)

Importance is measured with forward hooks on the real transformers model, over calibration
conversations from a ``prepare`` folder's ``train.jsonl`` rendered with the model's own chat template:

* FFN channel ``j`` of a layer: mean over tokens of ``|act_j|`` (the input of ``down_proj``, i.e.
  ``act(gate) * up``) times the L2 norm of ``down_proj``'s column ``j`` (Wanda-style activation x weight).
  This is exactly the mean norm of the channel's contribution to the residual stream.
* Attention head ``h``: the mean over tokens of the norm of the head's contribution to the residual
  stream, ``|| o_proj[:, h] @ attn_out_h ||`` (the per-token product that "output norm x o_proj slice
  norm" bounds). With grouped-query attention a key/value head and the query heads sharing it are
  one unit (the group's score is the sum of its heads'), so the config stays valid.

Every layer keeps the same number of channels and groups (a HF config has one ``intermediate_size`` and
one ``num_attention_heads``); each layer drops its own least important ones. ``intermediate_size`` is
rounded to a multiple of 256 when the original is one (K-quants' super-block, so ``ffn_down`` can
still take Q4_K & co.), else of 32 (the legacy quants' block). ``head_dim`` is written to the config
explicitly once heads go.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .errors import DataError, InputError, ModelError

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""HF architectures whose layers are pruned here (LLaMA layout: q/k/v/o + gate/up/down)."""

_NO_HEAD_PRUNING = {
    "Qwen2ForCausalLM": "llama.cpp's qwen2 graph needs head_dim == hidden_size / num_attention_heads",
}

REPORT_NAME = "prune_report.json"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

DEFAULT_SAMPLES = 256
DEFAULT_MAX_TOKENS = 32_768
MAX_SEQ_LEN = 1024
_BATCH_TOKENS = 4096


# --------------------------------------------------------------------------------------------- results


@dataclass
class GgufComparison:
    """The pruned GGUF against the original's, scored by :func:`gguf_factory.evaluate.evaluate`."""

    path: Path
    size_bytes: int
    ref_path: Path | None
    """The reference GGUF given, or None for the original converted here to F16 (deleted afterwards)."""
    ref_size_bytes: int
    ref_converted: bool
    data_path: str
    n_tokens: int
    ppl: float
    ref_ppl: float
    delta_ppl: float | None
    kld_mean: float | None
    top1: float | None

    @property
    def size_reduction(self) -> float:
        return 1.0 - self.size_bytes / self.ref_size_bytes if self.ref_size_bytes else 0.0


@dataclass
class PruneResult:
    output_dir: Path
    arch: str
    params_before: int
    params_after: int
    intermediate_before: int
    intermediate_after: int
    heads_before: int
    heads_after: int
    kv_heads_before: int
    kv_heads_after: int
    layers_before: int
    layers_after: int
    head_dim: int
    multiple_of: int
    """The granularity ``intermediate_size`` was rounded to (1 when FFN channels were not pruned)."""
    layers: list[dict[str, Any]]
    """Per layer (numbered as in the input model): its block influence, whether it was kept, kept KV
    groups and the share of FFN / head importance removed."""
    calibration_conversations: int
    calibration_tokens: int
    heldout: dict[str, Any] | None
    """Transformers-side check on held-out text: mean KL(original || pruned), top-1 agreement."""
    seconds: float
    report_path: Path
    gguf: GgufComparison | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0


# --------------------------------------------------------------------------------------------- checks


def _check_fraction(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not math.isfinite(v) or not 0.0 <= v < 1.0:
        raise InputError(f"{name} must be in [0, 1) (the fraction to remove), got {value!r}")
    return v


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def ffn_keep_count(total: int, fraction: float, multiple_of: int | None = None) -> tuple[int, int]:
    """(channels kept per layer, granularity) for removing ``fraction`` of ``total`` FFN channels.

    Auto granularity: 256 when ``total`` is a multiple of 256 (so K-quants still fit ``ffn_down``), else
    32; when 256 cannot honour the fraction (it would remove nothing or everything) 32 is used instead.
    """
    fraction = _check_fraction("ffn", fraction)
    if fraction == 0.0:
        return total, 1
    if multiple_of is not None and multiple_of < 1:
        raise InputError(f"multiple_of must be at least 1, got {multiple_of}")
    grains = [multiple_of] if multiple_of else ([256] if total % 256 == 0 else []) + [32]
    target = total * (1.0 - fraction)
    results = []
    for g in grains:
        kept = min(total, _round_half_up(target / g) * g)
        if 0 < kept < total:
            if g != grains[0]:
                log.warning(
                    "intermediate_size %d rounded to a multiple of %d, not %d: %s can no longer use "
                    "K-quants (llama.cpp falls back to a legacy type for it)",
                    kept,
                    g,
                    grains[0],
                    "ffn_down",
                )
            return kept, g
        results.append((g, kept))
    g, kept = results[-1]
    if kept == 0:
        raise InputError(
            f"ffn={fraction:g} would remove every FFN channel: {total} x {1 - fraction:.3g} rounds to fewer "
            f"than one block of {g} channels"
        )
    raise InputError(
        f"ffn={fraction:g} removes less than one block of {g} of the {total} FFN channels per layer; ask for "
        f"more than {g / (2 * total):.3g}"
        + ("" if multiple_of else " (or set multiple_of / --multiple-of to 1)")
    )


def group_keep_count(n_kv: int, n_heads: int, fraction: float) -> int:
    """KV groups kept per layer for removing ``fraction`` of the attention heads (whole groups)."""
    fraction = _check_fraction("heads", fraction)
    if fraction == 0.0:
        return n_kv
    kept = min(n_kv, _round_half_up(n_kv * (1.0 - fraction)))
    unit = "head" if n_kv == n_heads else f"key/value group ({n_heads // n_kv} query heads + 1 KV head)"
    if kept == 0:
        raise InputError(
            f"heads={fraction:g} would remove every attention head: {n_kv} {unit}s x {1 - fraction:.3g} "
            "rounds to 0"
        )
    if kept == n_kv:
        raise InputError(
            f"heads={fraction:g} removes less than one {unit} of the {n_kv} per layer; ask for more than "
            f"{1 / (2 * n_kv):.3g}"
        )
    return kept


def layer_keep_count(n_layers: int, fraction: float) -> int:
    """Decoder layers kept for removing ``fraction`` of ``n_layers`` (the first and last always stay)."""
    fraction = _check_fraction("layers", fraction)
    if fraction == 0.0:
        return n_layers
    drop = _round_half_up(n_layers * fraction)
    if drop == 0:
        raise InputError(
            f"layers={fraction:g} removes less than one of the {n_layers} layers; ask for more than "
            f"{1 / (2 * n_layers):.3g}"
        )
    if drop > n_layers - 2:
        raise InputError(
            f"layers={fraction:g} would remove {drop} of {n_layers} layers; the first and the last always "
            f"stay, so at most {max(n_layers - 2, 0)} can go"
        )
    return n_layers - drop


def layers_to_keep(scores: Sequence[float], keep: int) -> list[int]:
    """The ``keep`` layers to keep: the first, the last, and those of highest score (what removing each
    costs: :func:`layer_removal_loss`)."""
    n = len(scores)
    if keep >= n:
        return list(range(n))
    middle = sorted(range(1, n - 1), key=lambda i: (-scores[i], i))[: keep - 2]
    return sorted([0, n - 1, *middle])


def _read_config(model_dir: Path) -> dict[str, Any]:
    from .train.finetune import check_base_folder

    check_base_folder(model_dir)
    cfg_path = model_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path} is not a JSON object")
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ModelError(
            f"{cfg_path}: architecture {', '.join(map(str, archs)) or '(none)'} cannot be pruned; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    config["_arch"] = arch
    return config


def _hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model_dir}/config.json cannot be used: {e}") from None


def _check_output(model_dir: Path, output_dir: Path) -> Path:
    out = files.check_output_dir(output_dir)
    src, dst = model_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise InputError(f"output folder {out} would overwrite the input model {model_dir}; choose another")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise InputError(
            f"output folder {out} exists and is not a model folder; refusing to replace it (choose a new one)"
        )
    return out


# --------------------------------------------------------------------------------------------- data


def load_model(model_dir: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(model in float32, tokenizer) from a local HF folder of a supported architecture."""
    from .train.finetune import load_base

    _read_config(Path(model_dir))
    model, tokenizer = load_base(model_dir)
    model.eval()
    return model, tokenizer


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return text if isinstance(text, str) else text[0]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n"


def encode_texts(
    tokenizer: Any, conversations: Sequence[Any], *, max_tokens: int, max_seq_len: int
) -> list[list[int]]:
    """Token ids of conversations rendered with the model's chat template, ``max_tokens`` in all."""
    from .train.loop import as_messages

    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template: using plain 'role: content' lines")
    out: list[list[int]] = []
    total = 0
    for conv in conversations:
        if total >= max_tokens:
            break
        try:
            text = _render(tokenizer, as_messages(conv))
        except Exception as e:  # one conversation the template refuses should not stop the run
            log.debug("skipping a conversation: %s", e)
            continue
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])[:max_seq_len]
        ids = ids[: max_tokens - total]
        if len(ids) >= 2:
            out.append(ids)
            total += len(ids)
    return out


def make_batches(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> list[dict[str, Any]]:
    """Right-padded batches (sorted by length, ~``_BATCH_TOKENS`` padded tokens each) with masks."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches: list[dict[str, Any]] = []
    cur: list[int] = []
    for i in order:
        if cur and len(seqs[i]) * (len(cur) + 1) > _BATCH_TOKENS:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out = []
    for b in batches:
        width = max(len(seqs[i]) for i in b)
        ids = torch.full((len(b), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _load_conversations(data_dir: Path, split: str) -> list[Any]:
    from .data import load_split

    p = data_dir / f"{split}.jsonl"
    if not p.is_file():
        raise DataError(
            f"no {split}.jsonl in dataset folder {data_dir} (write one with `gguf-factory prepare`)"
        )
    return load_split(p)


# --------------------------------------------------------------------------------------------- importance


def _layers(model: Any) -> Any:
    return model.model.layers


def _shape(config: Any) -> tuple[int, int, int, int]:
    """(intermediate_size, num_heads, num_kv_heads, head_dim)."""
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    return int(config.intermediate_size), n_heads, n_kv, head_dim


@dataclass
class Importance:
    """Per-layer scores: ``ffn[l]`` (intermediate_size,), ``heads[l]`` (num_attention_heads,)."""

    ffn: list[Any]
    heads: list[Any]
    tokens: int
    blocks: list[float] = field(default_factory=list)
    """Per layer, its block influence: the mean over tokens of ``1 - cos(input, output)`` of the whole
    decoder layer (how much it turns the residual stream; the layers that turn it least go first)."""

    def groups(self, n_kv: int) -> list[Any]:
        """Per-layer KV-group scores (n_kv,): the sum of the scores of the query heads sharing a KV head."""
        return [h.view(n_kv, -1).sum(dim=1) for h in self.heads]


def measure_importance(model: Any, batches: Sequence[dict[str, Any]]) -> Importance:
    """Run ``batches`` through ``model`` and score every FFN channel and attention head (see module doc)."""
    import torch

    _, n_heads, _, head_dim = _shape(model.config)
    layers = _layers(model)
    n = len(layers)
    ffn_sum: list[Any] = [None] * n
    head_sum: list[Any] = [None] * n
    state: dict[str, Any] = {"mask": None}

    def ffn_hook(i: int):
        def hook(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()[state["mask"]]  # (tokens, intermediate)
            s = x.abs().sum(dim=0, dtype=torch.float64)
            ffn_sum[i] = s if ffn_sum[i] is None else ffn_sum[i] + s

        return hook

    def head_hook(i: int):
        def hook(mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()[state["mask"]]  # (tokens, heads * head_dim)
            w = mod.weight.detach()  # (hidden, heads * head_dim)
            s = torch.empty(n_heads, dtype=torch.float64)
            for h in range(n_heads):
                sl = slice(h * head_dim, (h + 1) * head_dim)
                s[h] = (x[:, sl] @ w[:, sl].T).norm(dim=1).sum(dtype=torch.float64)
            head_sum[i] = s if head_sum[i] is None else head_sum[i] + s

        return hook

    block_sum = [0.0] * n

    def block_hook(i: int):
        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output if isinstance(output, torch.Tensor) else output[0]
            m = state["mask"]
            cos = torch.nn.functional.cosine_similarity(
                x.detach()[m].double(), y.detach()[m].double(), dim=-1
            )
            block_sum[i] += float((1.0 - cos).sum())

        return hook

    hooks = []
    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
            hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        tokens = 0
        with torch.inference_mode():
            for b in batches:
                state["mask"] = b["attention_mask"].bool()
                tokens += int(state["mask"].sum())
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise DataError("no calibration token to measure importance on")
    ffn, heads = [], []
    for i, layer in enumerate(layers):
        col_norm = layer.mlp.down_proj.weight.detach().to(torch.float64).norm(dim=0)
        ffn.append(ffn_sum[i] / tokens * col_norm)
        heads.append(head_sum[i] / tokens)
    return Importance(ffn=ffn, heads=heads, tokens=tokens, blocks=[b / tokens for b in block_sum])


LAYER_SCORE_TOKENS = 2048
"""Calibration tokens :func:`layer_removal_loss` needs at least: one forward pass per layer, so few (a
layer's cost is a mean over tokens and settles fast). It takes whole calibration batches (about 4096
padded tokens each) until it has this many: on the demo's data, one batch of 3798 tokens, ~10 s per layer
of SmolLM2-135M on 2 cores."""


def layer_removal_loss(
    model: Any, batches: Sequence[dict[str, Any]], max_tokens: int = LAYER_SCORE_TOKENS
) -> list[float]:
    """Per layer, the mean next-token loss (nats) on the first of ``batches`` that hold ``max_tokens``
    tokens or more, with that one layer skipped (its output replaced by its input), minus the full
    model's: what removing it alone costs. The first and last layers, which always stay, score ``inf``."""
    import torch

    layers = _layers(model)
    n = len(layers)
    use: list[dict[str, Any]] = []
    total = 0
    for b in batches:
        if total >= max_tokens:
            break
        use.append(b)
        total += int(b["attention_mask"].sum())

    def loss() -> float:
        nll, count = 0.0, 0
        with torch.inference_mode():
            for b in use:
                ids, mask = b["input_ids"], b["attention_mask"]
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                    )
                )
                count += int((target != -100).sum())
                del logits
        return nll / max(count, 1)

    def skip(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return x if isinstance(output, torch.Tensor) else (x, *output[1:])

    full = loss()
    out = [math.inf] * n
    for i in range(1, n - 1):
        log.info("prune: scoring layer %d of %d (%d tokens without it)", i + 1, n, total)
        hook = layers[i].register_forward_hook(skip, with_kwargs=True)
        try:
            out[i] = loss() - full
        finally:
            hook.remove()
    return out


def top_indices(scores: Sequence[Any], keep: int) -> list[Any]:
    """Per layer, the sorted indices of the ``keep`` highest scores (the rest is removed)."""
    import torch

    return [torch.topk(s, keep).indices.sort().values for s in scores]


# --------------------------------------------------------------------------------------------- surgery


def prune_model(
    model: Any,
    ffn_keep: Sequence[Any] | None,
    group_keep: Sequence[Any] | None,
    layer_keep: Sequence[int] | None = None,
) -> Any:
    """A new model with, per layer, only the FFN channels ``ffn_keep[l]`` and KV groups ``group_keep[l]``,
    and only the decoder layers ``layer_keep`` (renumbered in order).

    Every layer must keep the same number of each. ``None`` keeps all of that kind. The input model is
    not modified.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    inter, n_heads, n_kv, head_dim = _shape(cfg)
    rep = n_heads // n_kv
    n_layers = len(_layers(model))
    sd = dict(model.state_dict())
    new_inter, new_kv = inter, n_kv
    for i in range(n_layers):
        p = f"model.layers.{i}."
        if ffn_keep is not None:
            k = torch.as_tensor(ffn_keep[i], dtype=torch.long)
            if i and len(k) != new_inter:
                raise ValueError("every layer must keep the same number of FFN channels")
            new_inter = len(k)
            for name in ("gate_proj", "up_proj"):
                sd[p + f"mlp.{name}.weight"] = sd[p + f"mlp.{name}.weight"][k].clone()
                if p + f"mlp.{name}.bias" in sd:
                    sd[p + f"mlp.{name}.bias"] = sd[p + f"mlp.{name}.bias"][k].clone()
            sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, k].clone()
        if group_keep is not None:
            g = torch.as_tensor(group_keep[i], dtype=torch.long)
            if i and len(g) != new_kv:
                raise ValueError("every layer must keep the same number of KV groups")
            new_kv = len(g)
            q_heads = (g[:, None] * rep + torch.arange(rep)[None, :]).reshape(-1)
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
            kv_rows = (g[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                for kind in ("weight", "bias"):
                    key = p + f"self_attn.{name}.{kind}"
                    if key in sd:
                        sd[key] = sd[key][rows].clone()
            key = p + "self_attn.o_proj.weight"
            sd[key] = sd[key][:, q_rows].clone()
    if layer_keep is not None:
        sd = _renumber_layers(sd, list(layer_keep))
        cfg.num_hidden_layers = len(layer_keep)
        for name in ("layer_types", "sliding_window_pattern_layers"):  # per-layer lists some configs have
            per_layer = getattr(cfg, name, None)
            if isinstance(per_layer, list) and len(per_layer) == n_layers:
                setattr(cfg, name, [per_layer[i] for i in layer_keep])
    cfg.intermediate_size = new_inter
    cfg.num_key_value_heads = new_kv
    cfg.num_attention_heads = new_kv * rep
    cfg.head_dim = head_dim
    dtype = next(model.parameters()).dtype
    new = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    new.load_state_dict(sd, strict=True)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.eval()
    return new


def _renumber_layers(sd: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The state dict with only the layers ``keep``, renumbered 0, 1, ... in their order."""
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key.startswith("model.layers."):
            old, rest = key[len("model.layers.") :].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"model.layers.{new_index[int(old)]}.{rest}"
        out[key] = value
    return out


def count_params(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def heldout_kl(ref: Any, model: Any, batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean KL(ref || model) per token and top-1 agreement over every real token of ``batches``."""
    import torch
    import torch.nn.functional as F

    kl_sum, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for b in batches:
            m = b["attention_mask"].bool()
            lp = F.log_softmax(ref(**b, use_cache=False).logits[m].double(), dim=-1)
            lq = F.log_softmax(model(**b, use_cache=False).logits[m].double(), dim=-1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += int(m.sum())
    return {"tokens": n, "kld_mean": kl_sum / n if n else None, "top1": agree / n if n else None}


# --------------------------------------------------------------------------------------------- the verb


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _share_removed(scores: Any, keep: Any) -> float:
    total = float(scores.sum())
    return 1.0 - float(scores[keep].sum()) / total if total > 0 else 0.0


@dataclass
class _Sizes:
    """What the model has and what is kept, decided before any work (a fraction that rounds to nothing
    or everything fails first)."""

    inter: int
    n_heads: int
    n_kv: int
    head_dim: int
    n_layers: int
    keep_ffn: int
    grain: int
    keep_groups: int
    keep_layers: int

    @classmethod
    def of(cls, model_dir: Path, ffn: float, heads: float, layers: float, multiple_of: int | None) -> _Sizes:
        hf_config = _hf_config(model_dir)
        inter, n_heads, n_kv, head_dim = _shape(hf_config)
        keep_ffn, grain = ffn_keep_count(inter, ffn, multiple_of)
        n_layers = int(hf_config.num_hidden_layers)
        return cls(
            inter, n_heads, n_kv, head_dim, n_layers, keep_ffn, grain,
            group_keep_count(n_kv, n_heads, heads), layer_keep_count(n_layers, layers),
        )  # fmt: skip


@dataclass
class _Choice:
    """What the calibration data says to keep."""

    imp: Importance
    ffn_keep: list[Any] | None
    group_scores: list[Any]
    group_keep: list[Any] | None
    removal: list[float] | None
    layer_keep: list[int] | None

    @classmethod
    def measure(cls, model: Any, batches: Sequence[dict[str, Any]], z: _Sizes) -> _Choice:
        imp = measure_importance(model, batches)
        group_scores = imp.groups(z.n_kv)
        removal = layer_removal_loss(model, batches) if z.keep_layers < z.n_layers else None
        return cls(
            imp=imp,
            ffn_keep=top_indices(imp.ffn, z.keep_ffn) if z.keep_ffn < z.inter else None,
            group_scores=group_scores,
            group_keep=top_indices(group_scores, z.keep_groups) if z.keep_groups < z.n_kv else None,
            removal=removal,
            layer_keep=layers_to_keep(removal, z.keep_layers) if removal is not None else None,
        )

    def rows(self) -> list[dict[str, Any]]:
        """Per layer of the input model: its scores and what was kept of it."""
        out = []
        for i in range(len(self.imp.ffn)):
            row: dict[str, Any] = {"layer": i, "block_influence": round(self.imp.blocks[i], 6)}
            if self.layer_keep is not None and self.removal is not None:
                row["kept"] = i in self.layer_keep
                row["removal_loss"] = round(self.removal[i], 6) if math.isfinite(self.removal[i]) else None
            if self.ffn_keep is not None:
                row["ffn_importance_removed"] = round(_share_removed(self.imp.ffn[i], self.ffn_keep[i]), 6)
            if self.group_keep is not None:
                row["kv_groups_kept"] = self.group_keep[i].tolist()
                share = _share_removed(self.group_scores[i], self.group_keep[i])
                row["head_importance_removed"] = round(share, 6)
            out.append(row)
        return out


def prune(
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    ffn: float = 0.25,
    heads: float = 0.0,
    layers: float = 0.0,
    samples: int = DEFAULT_SAMPLES,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    multiple_of: int | None = None,
    seed: int = 1234,
    threads: int | None = None,
    to_gguf: bool = False,
    ref: str | os.PathLike[str] | None = None,
) -> PruneResult:
    """Remove the least important FFN channels (fraction ``ffn``), attention heads (``heads``) and whole
    decoder layers (``layers``: those whose removal alone raises the next-token loss on the calibration
    data least, :func:`layer_removal_loss`; the first and last always stay).

    Importance is measured on up to ``samples`` conversations (``max_tokens`` tokens) of ``data_dir``'s
    ``train.jsonl``; the quality cost is measured on its ``test.jsonl`` (transformers, KL and top-1 vs the
    original). The pruned model is written as a HF folder at ``output_dir`` with ``prune_report.json``.
    ``to_gguf`` (implied by ``ref``): also convert it to ``<output_dir>-F16.gguf`` and score it with
    :func:`gguf_factory.evaluate.evaluate` against ``ref`` (a GGUF of the original) or, without ``ref``,
    against the original converted to F16 in a temporary folder.
    """
    t0 = time.perf_counter()
    from .bases import resolve_path

    model_dir, data_dir = resolve_path(model_dir), Path(data_dir)
    fractions = {k: _check_fraction(k, v) for k, v in (("ffn", ffn), ("heads", heads), ("layers", layers))}
    if not any(fractions.values()):
        log.warning("ffn=0, heads=0 and layers=0: the model is written unchanged")
    if samples < 1:
        raise InputError(f"samples must be at least 1, got {samples}")
    if max_tokens < 16:
        raise InputError(f"max_tokens must be at least 16, got {max_tokens}")
    config = _read_config(model_dir)
    arch = config["_arch"]
    if fractions["heads"] > 0 and arch in _NO_HEAD_PRUNING:
        raise ModelError(
            f"{model_dir}: attention heads of {arch} cannot be pruned ({_NO_HEAD_PRUNING[arch]})"
        )
    out = _check_output(model_dir, Path(output_dir))
    train_convs, test_convs = _calibration_data(data_dir)
    to_gguf = to_gguf or ref is not None
    ref_path = files.require_file(ref, "reference GGUF") if ref is not None else None
    gguf_path = out.parent / f"{out.name}-F16.gguf"
    if to_gguf:
        if not test_convs:
            raise DataError(f"no test conversations in {data_dir / 'test.jsonl'} to evaluate the GGUF on")
        files.check_output_path(gguf_path)
    z = _Sizes.of(model_dir, fractions["ffn"], fractions["heads"], fractions["layers"], multiple_of)

    from .train.loop import quiet_hf_progress

    with _torch_threads(threads), quiet_hf_progress():
        model, tokenizer = load_model(model_dir)
        max_seq = min(int(getattr(model.config, "max_position_embeddings", MAX_SEQ_LEN)), MAX_SEQ_LEN)
        picked = random.Random(seed).sample(train_convs, min(samples, len(train_convs)))
        calib = encode_texts(tokenizer, picked, max_tokens=max_tokens, max_seq_len=max_seq)
        if not calib:
            raise DataError(f"{data_dir / 'train.jsonl'}: no conversation to calibrate on")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        choice = _Choice.measure(model, make_batches(calib, pad), z)
        pruned = prune_model(model, choice.ffn_keep, choice.group_keep, choice.layer_keep)
        heldout = None
        if test_convs:
            held = encode_texts(tokenizer, test_convs[:samples], max_tokens=max_tokens, max_seq_len=max_seq)
            if held:
                heldout = heldout_kl(model, pruned, make_batches(held, pad))
                heldout["data"] = str(data_dir / "test.jsonl")
        rows = choice.rows()
        params_before, params_after = count_params(model), count_params(pruned)
        report = {
            "source_model": str(model_dir.resolve()),
            "arch": arch,
            "ffn_fraction": fractions["ffn"],
            "heads_fraction": fractions["heads"],
            "layers_fraction": fractions["layers"],
            "multiple_of": z.grain,
            "params": {"before": params_before, "after": params_after},
            "intermediate_size": {"before": z.inter, "after": z.keep_ffn},
            "num_attention_heads": {"before": z.n_heads, "after": z.keep_groups * (z.n_heads // z.n_kv)},
            "num_key_value_heads": {"before": z.n_kv, "after": z.keep_groups},
            "num_hidden_layers": {"before": z.n_layers, "after": z.keep_layers},
            "head_dim": z.head_dim,
            "calibration": _calibration_note(data_dir, len(calib), choice.imp.tokens, seed),
            "heldout_transformers": heldout,
            "layers": [
                {**row, "ffn_removed": _removed(z.inter, choice.ffn_keep[i]) if choice.ffn_keep else []}
                for i, row in enumerate(rows)
            ],
        }
        _write_pruned(out, model_dir, pruned.to(_saved_dtype(config)), report)
        del model, pruned

    result = PruneResult(
        output_dir=out, arch=arch, params_before=params_before, params_after=params_after,
        intermediate_before=z.inter, intermediate_after=z.keep_ffn,
        heads_before=z.n_heads, heads_after=z.keep_groups * (z.n_heads // z.n_kv),
        kv_heads_before=z.n_kv, kv_heads_after=z.keep_groups,
        layers_before=z.n_layers, layers_after=z.keep_layers, head_dim=z.head_dim, multiple_of=z.grain,
        layers=rows, calibration_conversations=len(calib), calibration_tokens=choice.imp.tokens,
        heldout=heldout, seconds=0.0, report_path=out / REPORT_NAME,
    )  # fmt: skip
    if to_gguf:
        result.gguf = _gguf_compare(model_dir, out, gguf_path, ref_path, data_dir, threads)
        report["gguf"] = _jsonable(asdict(result.gguf))
        files.atomic_write_json(out / REPORT_NAME, report)
    result.seconds = time.perf_counter() - t0
    return result


def _calibration_data(data_dir: Path) -> tuple[list[Any], list[Any]]:
    """The conversations of ``data_dir``'s train split (calibration) and test split (may be empty)."""
    files.require_dir(data_dir, "dataset folder")
    train = _load_conversations(data_dir, "train")
    test = _load_conversations(data_dir, "test") if (data_dir / "test.jsonl").is_file() else []
    return train, test


def _calibration_note(data_dir: Path, conversations: int, tokens: int, seed: int) -> dict[str, Any]:
    return {
        "data": str(data_dir / "train.jsonl"),
        "conversations": conversations,
        "tokens": tokens,
        "seed": seed,
        "ffn_score": "mean |act(gate)*up| x L2 norm of the down_proj column",
        "head_score": "mean L2 norm of the head's o_proj output (KV group: sum over its heads)",
        "layer_score": "the rise of the next-token loss with that one layer skipped "
        "(first and last always kept); block influence (mean 1 - cos(input, output)) reported",
    }


def _write_pruned(out: Path, model_dir: Path, pruned: Any, report: dict[str, Any]) -> None:
    """The pruned model, the input's tokenizer files and the report, as one atomically renamed folder."""
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        pruned.save_pretrained(tmp, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _removed(total: int, keep: Any) -> list[int]:
    kept = set(keep.tolist())
    return [j for j in range(total) if j not in kept]


def _saved_dtype(config: dict[str, Any]) -> Any:
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _gguf_compare(
    model_dir: Path, out: Path, gguf_path: Path, ref_path: Path | None, data_dir: Path, threads: int | None
) -> GgufComparison:
    from .convert import convert
    from .evaluate import evaluate

    conv = convert(out, gguf_path, outtype="f16", name=out.name)
    with tempfile.TemporaryDirectory(prefix=".prune-ref-", dir=out.parent) as tmpdir:
        converted = ref_path is None
        if ref_path is None:
            ref_path = Path(tmpdir) / f"{model_dir.resolve().name}-F16.gguf"
            convert(model_dir, ref_path, outtype="f16")
        ref_size = ref_path.stat().st_size
        ev = evaluate(gguf_path, data_dir, ref=ref_path, threads=threads)
        m, r = ev.models[0], ev.reference
        assert r is not None
        return GgufComparison(
            path=conv.path,
            size_bytes=conv.size_bytes,
            ref_path=None if converted else ref_path,
            ref_size_bytes=ref_size,
            ref_converted=converted,
            data_path=ev.data_path,
            n_tokens=ev.n_tokens,
            ppl=m.perplexity,
            ref_ppl=r.perplexity,
            delta_ppl=m.delta_ppl,
            kld_mean=m.kld_mean,
            top1=m.top1,
        )
