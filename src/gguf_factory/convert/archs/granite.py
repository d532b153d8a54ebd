"""Granite 3.x (``GraniteForCausalLM``): a LLaMA with four scalars, each a llama.cpp key: the embedding
multiplier, the residual multiplier (on each block's attention and MLP output), the attention multiplier
(the softmax scale instead of head_dim ** -0.5) and the logits divisor (``logits_scaling``).
"""

from __future__ import annotations

import gguf

from .llama import LlamaConverter
from .registry import register


@register
class GraniteConverter(LlamaConverter):
    hf_architectures = ("GraniteForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GRANITE

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(writer)
        writer.add_logit_scale(float(self.hparam("logits_scaling", default=1.0)))
        writer.add_residual_scale(float(self.hparam("residual_multiplier", default=1.0)))
        writer.add_embedding_scale(float(self.hparam("embedding_multiplier", default=1.0)))
        writer.add_attention_scale(float(self.hparam("attention_multiplier", default=self.head_dim**-0.5)))
