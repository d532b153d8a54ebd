"""llama.cpp ``qwen2`` -> ``Qwen2ForCausalLM`` (Qwen2 / Qwen2.5): a LLaMA layout with Q/K/V biases and
NEOX ("rotate half") rope in both engines, so the tensors are copied as they are."""

from __future__ import annotations

from typing import Any

import gguf

from ....errors import ModelError
from ..base import KA, KL, KR, ReverseArch
from .registry import register


@register
class Qwen2Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    hf_architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd = self.integer(KL.EMBEDDING_LENGTH)
        n_head = self.uniform(KA.HEAD_COUNT)
        if n_embd != self.n_embd_rows or n_head <= 0 or n_embd % n_head:
            raise ModelError(
                f"{self.where}: embedding_length {n_embd} / head_count {n_head} do not fit token_embd.weight "
                f"of width {self.n_embd_rows}"
            )
        head_dim = n_embd // n_head
        if (
            self.integer(KA.KEY_LENGTH, head_dim) != head_dim
            or self.integer(KA.VALUE_LENGTH, head_dim) != head_dim
        ):
            raise self.refuse("a head size other than embedding_length / head_count")
        if self.integer(KR.DIMENSION_COUNT, head_dim) != head_dim:
            raise self.refuse(f"rotary embedding on part of each head ({self.key(KR.DIMENSION_COUNT)})")
        return {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "rms_norm_eps": self.number(KA.LAYERNORM_RMS_EPS),
            "rope_parameters": self.rope_parameters(),
            "hidden_act": "silu",
            "use_sliding_window": False,  # llama.cpp's qwen2 attends to the whole context
        }
