"""llama.cpp ``qwen3`` -> ``Qwen3ForCausalLM``: Qwen2 without the Q/K/V biases, with per-head RMS norms on
queries and keys and a head size of its own; NEOX rope in both engines, so tensors are copied as they are."""

from __future__ import annotations

from typing import Any

import gguf

from ..base import KA, KL, ReverseArch
from .registry import register


@register
class Qwen3Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    hf_architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd, n_head, head_dim = self.head_geometry()
        return {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "head_dim": head_dim,
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "rms_norm_eps": self.number(KA.LAYERNORM_RMS_EPS),
            "rope_parameters": self.rope_parameters(),
            "hidden_act": "silu",
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
            "use_sliding_window": False,  # llama.cpp's qwen3 attends to the whole context
        }
