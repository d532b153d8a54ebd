"""Gemma 1 (``GemmaForCausalLM``): the Gemma 2 layout without the extra norms, soft-capping or sliding
window. RMSNorm ``x * (1 + w)`` is written as ``w + 1``, the embedding is scaled by sqrt(hidden) in
llama.cpp's graph and the output matrix is tied; see :mod:`.gemma2`.
"""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from .gemma2 import GemmaBase
from .registry import register


@register
class GemmaConverter(GemmaBase):
    hf_architectures = ("GemmaForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        if abs(self.q_factor - 1.0) > 1e-7:
            raise ConversionError(
                f"{self.model_dir}/config.json: an attention scale other than head_dim ** -0.5 is not "
                "supported by llama.cpp's gemma"
            )
        self._write_common(writer)
        self.write_rope_scaling(writer, allowed=())
        writer.add_rope_freq_base(self.rope[0])
