"""llama.cpp ``starcoder2`` -> ``Starcoder2ForCausalLM`` (StarCoder 2).

The forward converter changes no layout: StarCoder 2 uses NEOX ("rotate half") rope in both engines,
LayerNorms with biases (``attn_norm`` / ``ffn_norm`` / ``output_norm`` weight and bias), biased Q/K/V/O
projections and a two-matrix tanh-GELU MLP (``c_fc`` = ``ffn_up``, ``c_proj`` = ``ffn_down``), so every
tensor is copied as it is. llama.cpp's starcoder2 attends over the whole context, so the rebuilt config has
no ``sliding_window``; its GELU is the tanh approximation (``gelu_pytorch_tanh``). A GGUF without the biases
(``use_bias=false``) is refused by the shape / tensor checks rather than rebuilt without them.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..base import KA, KL, ReverseArch
from .registry import register


@register
class Starcoder2Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.STARCODER2
    hf_architecture = "Starcoder2ForCausalLM"
    model_type = "starcoder2"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd, n_head, head_dim = self.head_geometry()
        kwargs: dict[str, Any] = {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "norm_epsilon": self.number(KA.LAYERNORM_EPS),
            "rope_parameters": self.rope_parameters(),
            "hidden_act": "gelu_pytorch_tanh",  # llama.cpp's GELU is the tanh approximation
            "sliding_window": None,  # llama.cpp's starcoder2 attends to the whole context
            "use_bias": True,
        }
        if head_dim != n_embd // n_head:  # no head_dim field; Starcoder2's attention reads one if set
            kwargs["head_dim"] = head_dim
        return kwargs
