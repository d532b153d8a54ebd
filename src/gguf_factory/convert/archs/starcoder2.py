"""StarCoder2 (``Starcoder2ForCausalLM``): LayerNorms with biases, biased projections, NEOX rope and a
tanh-GELU MLP (``c_fc`` / ``c_proj``). llama.cpp's starcoder2 attends over the whole context: a
``sliding_window`` shorter than the context is reported, as outputs differ past it.
"""

from __future__ import annotations

import logging

import gguf

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register

log = logging.getLogger(__name__)


@register
class Starcoder2Converter(ArchConverter):
    hf_architectures = ("Starcoder2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.STARCODER2

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        where = f"{self.model_dir}/config.json"
        act = self.hparam("hidden_act", default="gelu_pytorch_tanh")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ConversionError(f"{where}: hidden_act {act!r} is not supported (StarCoder2 uses tanh GELU)")
        if not self.config.get("use_bias", True):
            raise ConversionError(f"{where}: use_bias=false is not supported by llama.cpp's starcoder2")
        window = self.config.get("sliding_window")
        n_ctx = int(self.hparam("max_position_embeddings"))
        if window and int(window) < n_ctx:
            log.warning(
                "%s: sliding_window=%s is ignored by llama.cpp's starcoder2 (full attention)", where, window
            )
        self.write_common_hparams(writer, norm="layer")
