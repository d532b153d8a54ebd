"""llama.cpp ``olmo2`` -> ``Olmo2ForCausalLM`` (OLMo 2).

The forward converter changes no layout: OLMo 2 uses NEOX ("rotate half") rope in both engines, its norms
sit after attention and the MLP (``post_attention_norm`` / ``post_ffw_norm``) and its query / key RMS norms
run over the whole projection (all heads at once, ``attn_q_norm`` of ``heads * head_dim`` values) in both, so
every tensor is copied as it is. llama.cpp's olmo2 graph always reads ``output.weight`` (the forward
converter writes a copy of tied embeddings), so the rebuilt checkpoint has an untied output matrix whenever
the GGUF has one.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..base import KA, KL, ReverseArch
from .registry import register


@register
class Olmo2Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.OLMO2
    hf_architecture = "Olmo2ForCausalLM"
    model_type = "olmo2"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd, n_head, head_dim = self.head_geometry()
        if self.integer(KA.SLIDING_WINDOW, 0):
            raise self.refuse(f"sliding-window attention ({self.key(KA.SLIDING_WINDOW)})")
        kwargs: dict[str, Any] = {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "rms_norm_eps": self.number(KA.LAYERNORM_RMS_EPS),
            "rope_parameters": self.rope_parameters(),
            "hidden_act": "silu",
            "attention_bias": False,  # llama.cpp's olmo2 reads no projection biases (any would be refused)
        }
        if head_dim != n_embd // n_head:  # Olmo2Config has no head_dim field; its attention reads one if set
            kwargs["head_dim"] = head_dim
        return kwargs
