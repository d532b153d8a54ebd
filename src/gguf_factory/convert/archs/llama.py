"""LLaMA-architecture models (Llama 1/2/3, Mistral-style configs, TinyLlama, SmolLM, our scratch models).

``rope_config`` and ``llama3_rope_factors`` live in :mod:`..base` (re-exported here for older imports).
"""

from __future__ import annotations

import logging
from typing import Any

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import QT, ArchConverter, PlannedTensor, llama3_rope_factors, rope_config
from .registry import register

log = logging.getLogger(__name__)

__all__ = ["LlamaConverter", "permute_rotary_rows", "rope_config", "llama3_rope_factors"]


def permute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K projection rows from HF's rotate-half layout to llama.cpp's interleaved-pair layout.

    Per head, HF keeps the first halves of the rotary pairs in rows ``[0, d/2)`` and the second halves
    in ``[d/2, d)``; llama.cpp's LLaMA graph (rope type NORM) rotates adjacent rows ``(2i, 2i+1)``.
    Row ``h*d/2 + i`` of head half ``h`` moves to ``2i + h``. Works for weights (2-D) and biases (1-D).
    """
    rows = w.shape[0]
    if rows % (2 * n_head) != 0:
        raise ConversionError(f"cannot permute {rows} rows over {n_head} heads (not a multiple of 2*heads)")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register
class LlamaConverter(ArchConverter):
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_embd = int(self.hparam("hidden_size"))
        self.n_head = int(self.hparam("num_attention_heads"))
        self.n_head_kv = int(self.hparam("num_key_value_heads", default=self.n_head))
        self.head_dim = int(self.hparam("head_dim", default=self.n_embd // self.n_head))
        self.rope_theta, self.rope_scaling = rope_config(self.config)
        act = self.hparam("hidden_act", "hidden_activation", default="silu")
        if act != "silu":
            raise ConversionError(
                f"{self.model_dir}/config.json: hidden_act {act!r} is not supported (LLaMA uses silu)"
            )

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        n_ctx = int(self.hparam("max_position_embeddings"))
        window = self.config.get("sliding_window")
        if window and int(window) < n_ctx:
            log.warning(
                "sliding_window=%s is ignored by llama.cpp's llama architecture (full attention); "
                "outputs differ from transformers past %s tokens",
                window,
                window,
            )
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(int(self.hparam("intermediate_size")))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        if self.head_dim != self.n_embd // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps", default=1e-6)))
        self._set_rope_scaling(writer)

    def _set_rope_scaling(self, writer: gguf.GGUFWriter) -> None:
        # llama3: the rope_freqs tensor (extra_tensors); dynamic NTK and others: refused (no llama.cpp key)
        self.write_rope_scaling(writer, allowed=("linear", "yarn", "llama3"))

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if ".attn_q." in gguf_name:
            return permute_rotary_rows(data, self.n_head)
        if ".attn_k." in gguf_name:
            return permute_rotary_rows(data, self.n_head_kv)
        return data

    def extra_tensors(self) -> list[PlannedTensor]:
        if self.rope_scaling["rope_type"] != "llama3":
            return []
        factors = llama3_rope_factors(self.rope_scaling, self.rope_theta, self.head_dim)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [PlannedTensor(name, factors.shape, QT.F32, lambda: factors.copy(), source="rope_parameters")]
