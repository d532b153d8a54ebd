"""SmolLM3 (``SmolLM3ForCausalLM``): a LLaMA where every 4th layer uses no rope (NoPE). llama.cpp's smollm3
graph fixes that pattern (layers 4, 8, ... skip rope), so a config with another ``no_rope_layers`` list is
refused; so is Llama 3 rope scaling, whose frequency factors that graph does not apply (linear and YaRN
scaling are keys it reads).
"""

from __future__ import annotations

import gguf

from ...errors import ConversionError
from .llama import LlamaConverter
from .registry import register

LLAMA_CPP_NO_ROPE_STEP = 4


@register
class SmolLM3Converter(LlamaConverter):
    hf_architectures = ("SmolLM3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.SMOLLM3

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        uses_rope = self.config.get("no_rope_layers")
        expected = [int((i + 1) % LLAMA_CPP_NO_ROPE_STEP != 0) for i in range(self.block_count)]
        if uses_rope is not None and [int(x) for x in uses_rope] != expected:
            raise ConversionError(
                f"{self.model_dir}/config.json: no_rope_layers {uses_rope} differs from llama.cpp's smollm3, "
                f"which skips rope on every {LLAMA_CPP_NO_ROPE_STEP}th layer ({expected})"
            )
        if self.config.get("use_sliding_window") and self.config.get("sliding_window"):
            raise ConversionError(f"{self.model_dir}/config.json: use_sliding_window=true is not supported")
        super().set_gguf_parameters(writer)

    def _set_rope_scaling(self, writer: gguf.GGUFWriter) -> None:
        # llama.cpp's smollm3 graph ropes without frequency factors (ggml_rope_ext(..., nullptr, ...)): a
        # llama3 rope_freqs tensor would be written and silently ignored
        self.write_rope_scaling(writer, allowed=("linear", "yarn"))
