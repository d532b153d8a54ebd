"""GPT-2-architecture models (GPT-2, DistilGPT-2, DialoGPT: ``GPT2LMHeadModel``).

Differences from LLaMA: HF stores the projections as ``Conv1D`` (weight ``[in, out]``, the transpose of
``nn.Linear``), so every 2-D block weight is transposed; positions are a learned table (``wpe`` ->
``position_embd``) instead of rotary; norms are LayerNorm with bias; Q/K/V are one fused ``c_attn``
(kept fused: llama.cpp's gpt2 graph reads ``attn_qkv``); the output matrix is tied to the token
embedding (llama.cpp reuses ``token_embd`` when ``output.weight`` is absent).
"""

from __future__ import annotations

import logging
from typing import Any

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register

log = logging.getLogger(__name__)

# GELU flavours HF GPT-2 configs name. llama.cpp's GELU is the tanh approximation ("gelu_new").
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@register
class GPT2Converter(ArchConverter):
    hf_architectures = ("GPT2LMHeadModel",)
    gguf_arch = gguf.MODEL_ARCH.GPT2
    # Conv1D weights (``[in, out]`` in HF) of the blocks; GGUF wants ``[out, in]`` like nn.Linear.
    conv1d_suffixes = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_embd = int(self.hparam("n_embd", "hidden_size"))
        self.n_head = int(self.hparam("n_head", "num_attention_heads"))
        where = f"{self.model_dir}/config.json"
        act = self.hparam("activation_function", default="gelu_new")
        if act == "gelu":
            log.warning("%s: exact GELU is run by llama.cpp with its tanh approximation", where)
        elif act not in _TANH_GELU:
            raise ConversionError(
                f"{where}: activation_function {act!r} is not supported (GPT-2 uses gelu_new)"
            )
        if self.config.get("scale_attn_by_inverse_layer_idx"):
            raise ConversionError(
                f"{where}: scale_attn_by_inverse_layer_idx=true is not supported by llama.cpp"
            )
        if self.config.get("scale_attn_weights") is False:
            raise ConversionError(f"{where}: scale_attn_weights=false is not supported by llama.cpp")
        if self.n_embd % self.n_head:
            raise ConversionError(f"{where}: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

    @property
    def tie_word_embeddings(self) -> bool:
        # GPT2Config ties by default; an explicit false with an lm_head tensor keeps the head.
        return bool(self.config.get("tie_word_embeddings", True))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(int(self.hparam("n_positions", "n_ctx", "max_position_embeddings")))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(int(self.hparam("n_inner", default=4 * self.n_embd)))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head)
        writer.add_layer_norm_eps(float(self.hparam("layer_norm_epsilon", "layer_norm_eps", default=1e-5)))

    def _is_conv1d(self, hf_name: str) -> bool:
        return hf_name.endswith(self.conv1d_suffixes)

    def tensor_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[::-1] if self._is_conv1d(hf_name) else shape

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if self._is_conv1d(hf_name):
            return np.ascontiguousarray(data.T)
        return data

    def check_plan(self, plan: list[Any]) -> None:
        super().check_plan(plan)
        pos = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"
        if not any(p.name == pos for p in plan):
            raise ConversionError(f"the weights in {self.model_dir} have no position embedding (wpe)")
