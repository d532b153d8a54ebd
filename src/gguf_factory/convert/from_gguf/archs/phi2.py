"""llama.cpp ``phi2`` -> ``PhiForCausalLM`` (Phi-1 / Phi-1.5 / Phi-2).

One LayerNorm per block feeds attention and the tanh-GELU MLP in parallel; Q/K/V are separate projections
with biases and the output matrix has a bias. NEOX ("rotate half") rope on the first
``phi2.rope.dimension_count`` dimensions of each head in both engines, which is transformers'
``partial_rotary_factor`` (:func:`partial_rope_parameters`). The forward converter changes no layout, so
the tensors are copied as they are. llama.cpp's graph always has an output matrix: a GGUF made from a
checkpoint with tied embeddings holds a copy, which comes back as an untied (equal) ``lm_head``.

Refused: old-style GGUFs with one fused ``attn_qkv`` (transformers' Phi has separate projections; this
rebuild does not split them yet) and a head size other than ``embedding_length / head_count``.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ....errors import ModelError
from ..base import KA, KL, KR, ReverseArch
from .registry import register

FUSED_QKV = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_QKV].format(bid=0) + ".weight"


def checked_head_dim(rev: ReverseArch, n_embd: int, n_head: int) -> int:
    """``embedding_length / head_count``, the only head size the LayerNorm families' transformers classes
    have; a GGUF whose token embedding, heads or key/value lengths say otherwise is refused."""
    if n_embd != rev.n_embd_rows or n_head <= 0 or n_embd % n_head:
        raise ModelError(
            f"{rev.where}: embedding_length {n_embd} / head_count {n_head} do not fit token_embd.weight "
            f"of width {rev.n_embd_rows}"
        )
    head_dim = n_embd // n_head
    if rev.integer(KA.KEY_LENGTH, head_dim) != head_dim or rev.integer(KA.VALUE_LENGTH, head_dim) != head_dim:
        raise rev.refuse("a head size other than embedding_length / head_count")
    return head_dim


def partial_rope_parameters(rev: ReverseArch, head_dim: int) -> dict[str, Any]:
    """``rope_parameters`` with the ``partial_rotary_factor`` that gives ``{arch}.rope.dimension_count``.

    transformers rotates ``int(head_dim * partial_rotary_factor)`` dimensions; ``dims / head_dim`` is the
    factor, or the next float up where the product rounds just below ``dims`` (e.g. 15 of 22). The factor
    is always written (1.0 included): these classes default to a partial factor of their own when absent.
    """
    dims = rev.integer(KR.DIMENSION_COUNT, head_dim)
    if dims <= 0 or dims > head_dim or dims % 2:
        raise ModelError(
            f"{rev.where}: {rev.key(KR.DIMENSION_COUNT)} {dims} is not an even number of rotary dimensions "
            f"of a head of {head_dim}"
        )
    factor = dims / head_dim
    if int(head_dim * factor) != dims:
        factor = float(np.nextafter(factor, 2.0))
    if int(head_dim * factor) != dims:  # not reached for head sizes up to 4096
        raise rev.refuse(f"{dims} rotary dimensions of a head of {head_dim}")
    return {**rev.rope_parameters(), "partial_rotary_factor": factor}


@register
class Phi2Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.PHI2
    hf_architecture = "PhiForCausalLM"
    model_type = "phi"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd = self.integer(KL.EMBEDDING_LENGTH)
        n_head = self.uniform(KA.HEAD_COUNT)
        head_dim = checked_head_dim(self, n_embd, n_head)
        if self.has_tensor(FUSED_QKV):
            raise self.refuse(f"fused Q/K/V projections ({FUSED_QKV}, an old-style phi2 GGUF)")
        return {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "layer_norm_eps": self.number(KA.LAYERNORM_EPS),
            "rope_parameters": partial_rope_parameters(self, head_dim),
            "hidden_act": "gelu_new",  # llama.cpp's GELU is the tanh approximation
            "qk_layernorm": False,
        }
