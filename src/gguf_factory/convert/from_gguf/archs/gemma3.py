"""llama.cpp ``gemma3`` -> ``Gemma3ForCausalLM`` (text models): Gemma 2's rules (:mod:`.gemma2`) plus the
Q/K norms (also ``w - 1``; any attention-scale ratio was folded into the query norm), separate rope bases
for the sliding (``rope.freq_base_swa``) and global layers, linear rope scaling on the global layers only,
no attention soft-capping, and an untied output matrix when the GGUF has one.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..base import KR
from .gemma2 import GemmaReverseBase
from .registry import register


@register
class Gemma3Reverse(GemmaReverseBase):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    hf_architecture = "Gemma3ForCausalLM"
    model_type = "gemma3_text"
    llama_cpp_27b_layers = 62
    default_swa_period = 6
    default_window = None  # llama.cpp's gemma3 without a window key: no sliding layers

    def config_kwargs(self) -> dict[str, Any]:
        full = self.rope_parameters(1_000_000.0)
        if full["rope_type"] not in ("default", "linear"):
            raise self.refuse(f"rope scaling {full['rope_type']!r} for Gemma 3")
        local = {"rope_type": "default", "rope_theta": self.number(KR.FREQ_BASE_SWA, 10_000.0)}
        kwargs = self.common_kwargs()
        return {
            **kwargs,
            "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "attn_logit_softcapping": None,
        }
