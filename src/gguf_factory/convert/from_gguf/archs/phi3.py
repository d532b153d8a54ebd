"""llama.cpp ``phi3`` -> ``Phi3ForCausalLM`` (Phi-3 / Phi-3.5).

Both engines keep Q/K/V fused (``qkv_proj`` = ``attn_qkv``) and the SwiGLU gate fused with the up
projection (``gate_up_proj`` = ``ffn_up``), with NEOX rope: the tensors are copied as they are. "longrope"
scaling lives in the GGUF as ``rope_factors_long`` / ``rope_factors_short`` tensors plus the attention
factor, and goes back into ``rope_parameters``.
"""

from __future__ import annotations

import math
from typing import Any

import gguf

from ....errors import ModelError
from ..base import KA, KL, KR, ReverseArch
from .registry import register

LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"


@register
class Phi3Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.PHI3
    hf_architecture = "Phi3ForCausalLM"
    model_type = "phi3"
    config_tensors = (LONG, SHORT)

    def config_kwargs(self) -> dict[str, Any]:
        n_embd = self.integer(KL.EMBEDDING_LENGTH)
        n_head = self.uniform(KA.HEAD_COUNT)
        if n_embd != self.n_embd_rows or n_head <= 0 or n_embd % n_head:
            raise ModelError(
                f"{self.where}: embedding_length {n_embd} / head_count {n_head} do not fit token_embd.weight "
                f"of width {self.n_embd_rows}"
            )
        head_dim = n_embd // n_head
        if self.integer(KA.KEY_LENGTH, head_dim) != head_dim:
            raise self.refuse("a head size other than embedding_length / head_count")
        rope_dims = self.integer(KR.DIMENSION_COUNT, head_dim)
        n_ctx = self.integer(KL.CONTEXT_LENGTH)
        n_ctx_orig = self.integer(KR.SCALING_ORIG_CTX_LEN, n_ctx)
        window = self.integer(KA.SLIDING_WINDOW, 0)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.number(KR.FREQ_BASE, 10000.0)}
        if rope_dims != head_dim:
            rope["partial_rotary_factor"] = rope_dims / head_dim
        kind = self.src.string(self.key(KR.SCALING_TYPE), "none")
        if kind not in ("none", "longrope"):
            raise self.refuse(f"rope scaling type {kind!r}")
        if self.has_tensor(LONG) or self.has_tensor(SHORT):
            if not (self.has_tensor(LONG) and self.has_tensor(SHORT)):
                raise ModelError(f"{self.where}: longrope needs both {LONG} and {SHORT}")
            rope.update(self._longrope(rope_dims, n_ctx, n_ctx_orig))
        return {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "max_position_embeddings": n_ctx,
            "original_max_position_embeddings": n_ctx_orig,
            "rms_norm_eps": self.number(KA.LAYERNORM_RMS_EPS),
            "rope_parameters": rope,
            "sliding_window": window or None,
            "hidden_act": "silu",
        }

    def _longrope(self, rope_dims: int, n_ctx: int, n_ctx_orig: int) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": "longrope", "original_max_position_embeddings": n_ctx_orig}
        for name, key in ((LONG, "long_factor"), (SHORT, "short_factor")):
            values = self.src.load(name)
            if values.shape != (rope_dims // 2,):
                raise ModelError(
                    f"{self.where}: {name} has shape {list(values.shape)}, expected [{rope_dims // 2}]"
                )
            out[key] = [float(str(v)) for v in values]  # the float32 values, written shortest
        attn = self.number(KR.SCALING_ATTN_FACTOR, None)
        scale = n_ctx / n_ctx_orig
        default = math.sqrt(1 + math.log(scale) / math.log(n_ctx_orig)) if scale > 1 else 1.0
        if attn is not None and not math.isclose(attn, default, rel_tol=1e-6):
            out["attention_factor"] = attn
        return out
