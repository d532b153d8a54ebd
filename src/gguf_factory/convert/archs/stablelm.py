"""StableLM (``StableLmForCausalLM``: StableLM-3B-4E1T, StableLM 2): a LLaMA-style SwiGLU block with
LayerNorms (with biases), partial NEOX rope (``partial_rotary_factor``), optional Q/K/V biases.
"""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register


@register
class StableLmConverter(ArchConverter):
    hf_architectures = ("StableLmForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.STABLELM
    output_required = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        where = f"{self.model_dir}/config.json"
        if self.config.get("qk_layernorm"):
            # StableLM 2 12B: per-head LayerNorms stored one tensor per head; not written yet.
            raise ConversionError(f"{where}: qk_layernorm=true (per-head Q/K norms) is not supported yet")
        act = self.hparam("hidden_act", default="silu")
        if act != "silu":
            raise ConversionError(f"{where}: hidden_act {act!r} is not supported (StableLM uses silu)")
        self.write_common_hparams(writer, norm="layer")
        writer.add_parallel_residual(bool(self.config.get("use_parallel_residual", False)))
