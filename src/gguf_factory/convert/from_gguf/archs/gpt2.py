"""llama.cpp ``gpt2`` -> ``GPT2LMHeadModel`` (GPT-2, DistilGPT-2, DialoGPT).

transformers keeps GPT-2's projections as ``Conv1D`` (weight ``[in, out]``), the transpose of what the GGUF
stores, so the block's 2-D weights are transposed back. Positions are the learned ``position_embd`` table;
the output matrix is tied unless the GGUF has ``output.weight``. llama.cpp runs GELU with its tanh
approximation, which is GPT-2's ``gelu_new``.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ....errors import ModelError
from ..base import KA, KL, ReverseArch
from .registry import register

POSITION_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


@register
class GPT2Reverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.GPT2
    hf_architecture = "GPT2LMHeadModel"
    model_type = "gpt2"

    def config_kwargs(self) -> dict[str, Any]:
        n_embd = self.integer(KL.EMBEDDING_LENGTH)
        n_head = self.uniform(KA.HEAD_COUNT)
        if n_embd != self.n_embd_rows or n_head <= 0 or n_embd % n_head:
            raise ModelError(
                f"{self.where}: embedding_length {n_embd} / head_count {n_head} do not fit token_embd.weight "
                f"of width {self.n_embd_rows}"
            )
        if self.uniform(KA.HEAD_COUNT_KV, n_head) != n_head:
            raise self.refuse("grouped key/value heads")
        n_ff = self.uniform(KL.FEED_FORWARD_LENGTH, 4 * n_embd)
        return {
            "n_embd": n_embd,
            "n_layer": self.n_layer,
            "n_head": n_head,
            "n_inner": None if n_ff == 4 * n_embd else n_ff,
            "n_positions": self.integer(KL.CONTEXT_LENGTH),
            "layer_norm_epsilon": self.number(KA.LAYERNORM_EPS),
            "activation_function": "gelu_new",
        }

    def hf_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[::-1] if hf_name.endswith(_CONV1D) else shape

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data.T) if hf_name.endswith(_CONV1D) else data
