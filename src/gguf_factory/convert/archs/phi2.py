"""Phi-1/1.5/2 (``PhiForCausalLM``): one LayerNorm per block feeding attention and MLP in parallel,
separate Q/K/V projections with biases (llama.cpp's phi2 reads them separately too), partial NEOX rope
(``partial_rotary_factor``), a tanh-GELU MLP (``fc1``/``fc2``) and an output matrix with a bias.
"""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register


@register
class Phi2Converter(ArchConverter):
    hf_architectures = ("PhiForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI2
    output_required = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        where = f"{self.model_dir}/config.json"
        if self.config.get("qk_layernorm"):
            raise ConversionError(f"{where}: qk_layernorm=true is not supported by llama.cpp's phi2")
        act = self.hparam("hidden_act", default="gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ConversionError(f"{where}: hidden_act {act!r} is not supported (phi2 uses gelu_new)")
        self.write_common_hparams(writer, norm="layer")
