"""Qwen2 / Qwen2.5 models (``Qwen2ForCausalLM``).

A LLaMA layout with biases on the Q/K/V projections. llama.cpp's qwen2 graph uses NEOX ("rotate half")
rope, the same pairing as transformers, so the Q/K rows are written unpermuted.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np

from ...errors import ConversionError
from .llama import LlamaConverter
from .registry import register

log = logging.getLogger(__name__)


@register
class Qwen2Converter(LlamaConverter):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        # Qwen2 configs carry sliding_window even when unused (use_sliding_window=false).
        if self.config.get("use_sliding_window") and self.config.get("sliding_window"):
            log.warning(
                "%s/config.json: use_sliding_window=true is ignored by llama.cpp's qwen2 (full attention)",
                self.model_dir,
            )
        writer.add_context_length(int(self.hparam("max_position_embeddings")))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(int(self.hparam("intermediate_size")))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        if self.head_dim != self.n_embd // self.n_head:
            raise ConversionError(
                f"{self.model_dir}/config.json: head_dim {self.head_dim} != "
                "hidden_size / num_attention_heads "
                "is not supported by llama.cpp's qwen2"
            )
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps", default=1e-6)))
        self._set_rope_scaling(writer)

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return data
