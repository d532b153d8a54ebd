"""Falcon (``FalconForCausalLM``: Falcon-7B/40B/180B, Falcon-RW is refused).

transformers fuses Q/K/V per KV group (each group: its query heads, then one key and one value head; with
``multi_query`` a single group); llama.cpp's falcon graph slices all queries, then all keys, then all values
(the "jploski" layout), so the rows are regrouped. Attention and MLP run in parallel from one LayerNorm
(two with ``new_decoder_architecture``: ``ln_attn`` / ``ln_mlp``), NEOX rope, a GELU MLP, no biases.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register

log = logging.getLogger(__name__)


@register
class FalconConverter(ArchConverter):
    hf_architectures = ("FalconForCausalLM", "RWForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.FALCON

    @property
    def n_head_kv(self) -> int:  # type: ignore[override]
        if self.config.get("new_decoder_architecture"):
            return int(self.hparam("num_kv_heads", "n_head_kv", default=self.n_head))
        return 1 if self.config.get("multi_query", True) else self.n_head

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        where = f"{self.model_dir}/config.json"
        for key, bad in (("alibi", True), ("bias", True), ("parallel_attn", False)):
            if bool(self.config.get(key, not bad)) == bad:
                raise ConversionError(
                    f"{where}: {key}={str(bad).lower()} is not supported by llama.cpp's falcon"
                )
        act = self.hparam("activation", default="gelu")
        if act == "gelu":
            log.warning("%s: exact GELU is run by llama.cpp with its tanh approximation", where)
        elif act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ConversionError(f"{where}: activation {act!r} is not supported by llama.cpp's falcon")
        n_ff = self.hparam("ffn_hidden_size", default=4 * self.n_embd)
        writer.add_context_length(int(self.hparam("max_position_embeddings", default=2048)))
        writer.add_tensor_data_layout("jploski")  # the regrouped Q/K/V rows
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(int(n_ff))
        writer.add_block_count(self.block_count)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_eps(float(self.hparam("layer_norm_epsilon", default=1e-5)))
        writer.add_rope_freq_base(self.rope[0])
        self.write_rope_scaling(writer, allowed=())

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if ".attn_qkv." not in gguf_name:
            return data
        n_kv, head = self.n_head_kv, self.n_embd // self.n_head
        groups = data.reshape(n_kv, self.n_head // n_kv + 2, head, -1)
        q = groups[:, :-2].reshape(-1, data.shape[1])
        k = groups[:, -2].reshape(-1, data.shape[1])
        v = groups[:, -1].reshape(-1, data.shape[1])
        return np.concatenate([q, k, v])
