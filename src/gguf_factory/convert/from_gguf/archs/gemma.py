"""llama.cpp ``gemma`` -> ``GemmaForCausalLM`` (Gemma 1): Gemma 2's layout without the extra norms,
soft-capping or sliding window; RMSNorm weights back from ``1 + w`` to ``w`` (see :mod:`.gemma2`), the
output tied to the embedding, attention scaled by ``head_dim ** -0.5`` in both engines."""

from __future__ import annotations

from typing import Any

import gguf

from ....errors import ModelError
from ..base import OUTPUT
from .gemma2 import GemmaReverseBase
from .registry import register


@register
class GemmaReverse(GemmaReverseBase):
    gguf_arch = gguf.MODEL_ARCH.GEMMA
    hf_architecture = "GemmaForCausalLM"
    model_type = "gemma"

    def config_kwargs(self) -> dict[str, Any]:
        if self.has_tensor(OUTPUT):
            raise ModelError(f"{self.where}: llama.cpp's gemma does not read {OUTPUT} (it ties the output)")
        rope = self.rope_parameters()
        if rope["rope_type"] != "default":
            raise self.refuse(f"rope scaling {rope['rope_type']!r} for Gemma")
        return {**self.core_kwargs(), "rope_parameters": rope, "hidden_act": "gelu_pytorch_tanh"}
