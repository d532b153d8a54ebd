"""llama.cpp ``falcon`` -> ``FalconForCausalLM`` (Falcon-7B/40B/180B, Falcon2-11B).

transformers fuses Q/K/V per key/value group (each group: its query heads, then one key and one value
head; multi-query is one group, plain multi-head attention a group per head); llama.cpp's graph slices
``attn_qkv`` as all queries, then all keys, then all values (the "jploski" layout), so the forward converter
regrouped the rows and :func:`ungroup_qkv` puts them back. Attention and MLP always run in parallel, with
full NEOX rope, a GELU MLP and no biases.

Which transformers variant a GGUF is follows from its tensors and head counts, as llama.cpp's graph reads
them: an ``attn_norm_2`` (the attention's own norm, ``ln_attn``; ``attn_norm`` is then ``ln_mlp``) is the
new decoder architecture with two norms (Falcon-40B/180B); one norm and one key/value head is the original
multi-query block (Falcon-7B), one norm and a key/value head per query head the original block without
multi-query, one norm and any other number of key/value heads the new architecture with one norm
(Falcon2-11B). llama.cpp runs GELU with its tanh approximation; the rebuild writes Falcon's exact ``gelu``
(the activation every Falcon checkpoint uses; the forward converter accepts it with a warning).

Refused: ``attn_norm_2`` in some layers only, query heads that do not split into the key/value groups,
a ``falcon.tensor_data_layout`` other than "jploski", partial rotary dimensions, biases (no place in the
model: transformers' ``bias`` would put them everywhere, llama.cpp's falcon has none).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ....errors import ModelError
from ..base import KA, KL, KR, ReverseArch
from .phi2 import checked_head_dim
from .registry import register


def ungroup_qkv(data: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The inverse of the forward converter's regrouping: all query rows, then all key rows, then all
    value rows back to ``n_head_kv`` groups of (their ``n_head / n_head_kv`` query heads, one key head, one
    value head)."""
    head = data.shape[0] // (n_head + 2 * n_head_kv)
    rest = data.shape[1:]
    q = data[: n_head * head].reshape(n_head_kv, n_head // n_head_kv, head, *rest)
    k = data[n_head * head : (n_head + n_head_kv) * head].reshape(n_head_kv, 1, head, *rest)
    v = data[(n_head + n_head_kv) * head :].reshape(n_head_kv, 1, head, *rest)
    return np.concatenate([q, k, v], axis=1).reshape(data.shape)


@register
class FalconReverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.FALCON
    hf_architecture = "FalconForCausalLM"
    model_type = "falcon"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.n_embd = self.integer(KL.EMBEDDING_LENGTH)
        self.n_head = self.uniform(KA.HEAD_COUNT)
        self.head_dim = checked_head_dim(self, self.n_embd, self.n_head)
        self.n_head_kv = self.uniform(KA.HEAD_COUNT_KV, self.n_head)
        if self.n_head_kv <= 0 or self.n_head % self.n_head_kv:
            raise ModelError(
                f"{self.where}: {self.n_head} query heads do not split into {self.n_head_kv} key/value groups"
            )
        layout = self.src.string(self.key(KL.TENSOR_DATA_LAYOUT), "jploski")
        if layout != "jploski":
            raise self.refuse(f"Q/K/V rows in a {layout!r} layout ({self.key(KL.TENSOR_DATA_LAYOUT)})")
        if self.integer(KR.DIMENSION_COUNT, self.head_dim) != self.head_dim:
            raise self.refuse(f"rotary embedding on part of each head ({self.key(KR.DIMENSION_COUNT)})")

    def config_kwargs(self) -> dict[str, Any]:
        return {
            "hidden_size": self.n_embd,
            "ffn_hidden_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            **self._decoder_variant(),
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "layer_norm_epsilon": self.number(KA.LAYERNORM_EPS),
            "rope_parameters": self.rope_parameters(),
            "activation": "gelu",
            "alibi": False,
            "bias": False,
            "parallel_attn": True,
        }

    def _decoder_variant(self) -> dict[str, Any]:
        """transformers' decoder flags for the GGUF's norms and key/value heads (see the module doc)."""
        norm_2 = [self.has_tensor(f"blk.{i}.attn_norm_2.weight") for i in range(self.n_layer)]
        if len(set(norm_2)) > 1:
            raise self.refuse("attn_norm_2 in some layers only (two decoder architectures mixed)")
        if norm_2[0]:
            return {
                "new_decoder_architecture": True,
                "num_kv_heads": self.n_head_kv,
                "num_ln_in_parallel_attn": 2,
            }
        if self.n_head_kv == 1:
            return {"new_decoder_architecture": False, "multi_query": True}
        if self.n_head_kv == self.n_head:
            return {"new_decoder_architecture": False, "multi_query": False}
        return {
            "new_decoder_architecture": True,
            "num_kv_heads": self.n_head_kv,
            "num_ln_in_parallel_attn": 1,
        }

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return ungroup_qkv(data, self.n_head, self.n_head_kv) if ".attn_qkv." in gguf_name else data
