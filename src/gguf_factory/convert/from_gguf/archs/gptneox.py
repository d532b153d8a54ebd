"""llama.cpp ``gptneox`` -> ``GPTNeoXForCausalLM`` (GPT-NeoX-20B, Pythia, RedPajama-INCITE, Dolly v2).

transformers keeps the fused ``query_key_value`` rows (and bias) per head: head 0's query, key, value, then
head 1's...; llama.cpp's graph slices ``attn_qkv`` as all queries, then all keys, then all values, so the
forward converter regrouped the rows and :func:`ungroup_qkv` puts them back. Partial NEOX rope
(``gptneox.rope.dimension_count`` -> ``partial_rotary_factor``), LayerNorms with biases, parallel or
sequential residual (``gptneox.use_parallel_residual``, which llama.cpp requires), a GELU MLP with biases.
The output matrix is written as ``embed_out``, the name GPT-NeoX checkpoints keep (see
:meth:`GPTNeoXReverse.plan`); llama.cpp's graph always has one, so a GGUF made from a checkpoint with tied
embeddings (which holds a copy) comes back with an untied, equal output matrix.

llama.cpp runs GELU with its tanh approximation whatever the checkpoint said; the rebuild writes the exact
``gelu`` every GPT-NeoX checkpoint uses (the forward converter accepts it with a warning), so the rebuilt
model is the trained one. Grouped key/value heads and a head size other than ``embedding_length /
head_count`` are refused: transformers' GPT-NeoX has neither.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ..base import KA, KL, PlannedWeight, ReverseArch
from .phi2 import checked_head_dim, partial_rope_parameters
from .registry import register


def ungroup_qkv(data: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the forward converter's regrouping: ``[q|k|v][head][head_dim]`` rows back to
    ``[head][q|k|v][head_dim]`` (a weight or its bias)."""
    grouped = data.reshape(3, n_head, data.shape[0] // (3 * n_head), *data.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(0, 1)).reshape(data.shape)


@register
class GPTNeoXReverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.GPTNEOX
    hf_architecture = "GPTNeoXForCausalLM"
    model_type = "gpt_neox"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_embd = self.integer(KL.EMBEDDING_LENGTH)
        self.n_head = self.uniform(KA.HEAD_COUNT)
        self.head_dim = checked_head_dim(self, self.n_embd, self.n_head)
        if self.uniform(KA.HEAD_COUNT_KV, self.n_head) != self.n_head:
            raise self.refuse("grouped key/value heads")

    def config_kwargs(self) -> dict[str, Any]:
        return {
            "hidden_size": self.n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "layer_norm_eps": self.number(KA.LAYERNORM_EPS),
            "rope_parameters": partial_rope_parameters(self, self.head_dim),
            "use_parallel_residual": self.src.boolean(self.key(KL.USE_PARALLEL_RESIDUAL)),
            "attention_bias": self.has_tensor("blk.0.attn_qkv.bias"),
            "hidden_act": "gelu",
        }

    def plan(self, config: Any) -> list[PlannedWeight]:
        """The base plan, with each parameter under the name transformers saves it as: transformers 5 loads
        the output matrix as ``lm_head`` but reads and writes checkpoints with ``embed_out`` (its own
        conversion mapping, reverted as ``save_pretrained`` does), the name older versions need."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.core_model_loading import revert_weight_conversion

        planned = super().plan(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            for w in planned:
                (w.hf_name,) = revert_weight_conversion(model, {w.hf_name: torch.empty(w.shape)})
        return planned

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return ungroup_qkv(data, self.n_head) if ".attn_qkv." in gguf_name else data
