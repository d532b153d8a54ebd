"""Gemma 2 models (``Gemma2ForCausalLM``); :class:`GemmaBase` is shared with Gemma 3.

* RMSNorm: transformers computes ``x * (1 + w)``, llama.cpp ``x * w``: every ``*norm.weight`` is written
  as ``w + 1``.
* Embedding scaling by ``sqrt(hidden_size)``: done by llama.cpp's graph, nothing to write.
* Attention scale: transformers uses ``query_pre_attn_scalar ** -0.5``; llama.cpp hard-codes
  ``head_dim ** -0.5`` (``(hidden/heads) ** -0.5`` for the 27B sizes). Any ratio between the two is folded
  into the query projection (Gemma 2) or the query norm (Gemma 3), exactly.
* Soft-capping of attention / final logits and the sliding window go to their GGUF keys; which layers
  slide is written per layer from ``layer_types`` (or the config's pattern).
* Rope is NEOX (rotate-half) in both engines: no Q/K row permutation. The output matrix is tied.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import ArchConverter
from .llama import rope_config
from .registry import register

log = logging.getLogger(__name__)

_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


class GemmaBase(ArchConverter):
    # n_layer of the size llama.cpp treats as "27B" (attention scale (hidden/heads) ** -0.5)
    llama_cpp_27b_layers: ClassVar[int] = 0
    default_swa_pattern: ClassVar[int] = 2

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        where = f"{self.model_dir}/config.json"
        self.n_embd = int(self.hparam("hidden_size"))
        self.n_head = int(self.hparam("num_attention_heads"))
        self.n_head_kv = int(self.hparam("num_key_value_heads", default=self.n_head))
        self.head_dim = int(self.hparam("head_dim", default=self.n_embd // self.n_head))
        act = self.hparam("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
        if act not in _TANH_GELU:
            raise ConversionError(
                f"{where}: hidden_activation {act!r} is not supported (Gemma uses gelu tanh)"
            )
        if self.config.get("attention_bias"):
            raise ConversionError(f"{where}: attention_bias=true is not supported by llama.cpp's Gemma")
        # transformers' scale vs the one llama.cpp computes
        hf_scale = float(self.hparam("query_pre_attn_scalar", default=self.head_dim)) ** -0.5
        if self.block_count == self.llama_cpp_27b_layers:
            ll_scale = float(self.n_embd // self.n_head) ** -0.5
        else:
            ll_scale = float(self.head_dim) ** -0.5
        self.q_factor = hf_scale / ll_scale

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    # ---- key/values -----------------------------------------------------------------------------

    def _swa_layers(self) -> list[bool] | None:
        """Which layers use the sliding window (None: no sliding window at all)."""
        window = self.config.get("sliding_window")
        if not window:
            return None
        types = self.config.get("layer_types")
        if isinstance(types, list) and len(types) == self.block_count:
            return [t == "sliding_attention" for t in types]
        pattern = int(self.config.get("sliding_window_pattern") or self.default_swa_pattern)
        return [bool((i + 1) % pattern) for i in range(self.block_count)]

    def _write_common(self, writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(int(self.hparam("max_position_embeddings")))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(int(self.hparam("intermediate_size")))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps", default=1e-6)))
        final_cap = self.config.get("final_logit_softcapping")
        if final_cap:
            writer.add_final_logit_softcapping(float(final_cap))
        swa = self._swa_layers()
        if swa is not None:
            writer.add_sliding_window(int(self.config["sliding_window"]))
            writer.add_sliding_window_pattern(swa)

    # ---- tensors --------------------------------------------------------------------------------

    def map_tensor_name(self, hf_name: str) -> str | None:
        if hf_name == "lm_head.weight" and not self.tie_word_embeddings:
            raise ConversionError(
                f"{self.model_dir}: tie_word_embeddings=false (a separate lm_head) is not supported by "
                f"llama.cpp's {self.arch_name}"
            )
        return super().map_tensor_name(hf_name)

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith("norm.weight"):
            data = data + 1.0
        return data


@register
class Gemma2Converter(GemmaBase):
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    llama_cpp_27b_layers = 46
    default_swa_pattern = 2

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        self._write_common(writer)
        theta, scaling = rope_config(self.config)
        if scaling["rope_type"] != "default":
            raise ConversionError(
                f"{self.model_dir}/config.json: rope scaling {scaling['rope_type']!r} is not supported "
                "for Gemma 2"
            )
        writer.add_rope_freq_base(theta)
        attn_cap = self.config.get("attn_logit_softcapping")
        # llama.cpp's gemma2 always soft-caps attention (default 50); 0 would divide by zero, so a
        # config without capping gets a cap far above any logit.
        writer.add_attn_logit_softcapping(float(attn_cap) if attn_cap else 1e5)
        if self._swa_layers() is None:
            # llama.cpp's gemma2 always uses its sliding window (default 4096): make it cover the context.
            writer.add_sliding_window(int(self.hparam("max_position_embeddings")))

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        data = super().modify_tensor(gguf_name, hf_name, data)
        if ".attn_q." in gguf_name and not math.isclose(self.q_factor, 1.0, rel_tol=1e-7):
            data = data * np.float32(self.q_factor)
        return data
