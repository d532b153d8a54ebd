"""OLMo 2 (``Olmo2ForCausalLM``): norms after attention and MLP instead of before (``attn_post_norm``,
``ffn_post_norm``), RMS norms over all query / key heads (``attn_q_norm`` / ``attn_k_norm``), NEOX rope.
"""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register


@register
class Olmo2Converter(ArchConverter):
    hf_architectures = ("Olmo2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.OLMO2
    output_required = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        act = self.hparam("hidden_act", default="silu")
        if act != "silu":
            raise ConversionError(f"{self.model_dir}/config.json: hidden_act {act!r} is not supported")
        self.write_common_hparams(writer)
