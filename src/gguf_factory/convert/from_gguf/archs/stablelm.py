"""llama.cpp ``stablelm`` -> ``StableLmForCausalLM`` (StableLM-3B-4E1T, StableLM 2 1.6B, StableLM Zephyr).

A LLaMA-style SwiGLU block with LayerNorms (with biases), optional Q/K/V biases (``use_qkv_bias``) and
partial NEOX rope (``stablelm.rope.dimension_count`` -> ``partial_rotary_factor``); the forward converter
changes no layout, so the tensors are copied as they are. llama.cpp's graph runs the block in parallel
(attention and MLP from the one input norm) exactly when a layer has no ``ffn_norm``; that, not the
``stablelm.use_parallel_residual`` key (which llama.cpp does not read), is transformers'
``use_parallel_residual``, and a key that says otherwise is refused as a contradiction. llama.cpp's graph
always has an output matrix: a GGUF made from a checkpoint with tied embeddings holds a copy, which comes
back as an untied (equal) ``lm_head``.

Refused besides: per-head query/key LayerNorms (StableLM 2 12B, ``attn_q_norm``/``attn_k_norm``; not
rebuilt yet), layers that differ in whether they have ``ffn_norm``, and a head size other than
``embedding_length / head_count``.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..base import KA, KL, ReverseArch
from .phi2 import checked_head_dim, partial_rope_parameters
from .registry import register


@register
class StableLmReverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.STABLELM
    hf_architecture = "StableLmForCausalLM"
    model_type = "stablelm"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd = self.integer(KL.EMBEDDING_LENGTH)
        n_head = self.uniform(KA.HEAD_COUNT)
        head_dim = checked_head_dim(self, n_embd, n_head)
        if self.has_tensor("blk.0.attn_q_norm.weight") or self.has_tensor("blk.0.attn_k_norm.weight"):
            raise self.refuse("per-head query/key norms (StableLM 2 12B's attn_q_norm / attn_k_norm)")
        return {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "layer_norm_eps": self.number(KA.LAYERNORM_EPS),
            "rope_parameters": partial_rope_parameters(self, head_dim),
            "use_qkv_bias": self.has_tensor("blk.0.attn_q.bias"),
            "use_parallel_residual": self._parallel_residual(),
            "qk_layernorm": False,
            "hidden_act": "silu",
        }

    def _parallel_residual(self) -> bool:
        with_norm = [self.has_tensor(f"blk.{i}.ffn_norm.weight") for i in range(self.n_layer)]
        if len(set(with_norm)) > 1:
            raise self.refuse("an ffn_norm in some layers only (parallel and sequential blocks mixed)")
        parallel = not with_norm[0]
        key = self.key(KL.USE_PARALLEL_RESIDUAL)
        said = self.src.boolean(key, parallel)
        if said != parallel:
            raise self.refuse(
                f"{key} = {str(said).lower()} contradicting the tensors (llama.cpp runs the block "
                f"{'in parallel: no' if parallel else 'sequentially: an'} ffn_norm)"
            )
        return parallel
