"""Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``).

Every layer's MLP is a mixture of experts (``mlp.gate`` router, experts stacked into ``ffn_*_exps``);
Qwen2-MoE adds a shared expert (``ffn_*_shexp``) scaled by a sigmoid gate (``shared_expert_gate``, a
``[1, hidden]`` matrix in transformers, a vector in llama.cpp). llama.cpp's graphs fix two choices that the
configs carry: the chosen experts' weights are renormalized in qwen3moe and not in qwen2moe
(``norm_topk_prob``), and every layer is sparse (``decoder_sparse_step`` 1, no ``mlp_only_layers``).
"""

from __future__ import annotations

import gguf
import numpy as np

from ...errors import ConversionError
from .qwen2 import Qwen2Converter
from .qwen3 import Qwen3Converter
from .registry import register


def _check_all_layers_sparse(conv: Qwen2Converter | Qwen3Converter) -> None:
    where = f"{conv.model_dir}/config.json"
    if int(conv.config.get("decoder_sparse_step") or 1) != 1 or conv.config.get("mlp_only_layers"):
        raise ConversionError(
            f"{where}: decoder_sparse_step != 1 or mlp_only_layers (dense layers among the MoE layers) is "
            f"not supported by llama.cpp's {conv.arch_name}"
        )


@register
class Qwen2MoeConverter(Qwen2Converter):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    stack_experts = True
    output_required = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        _check_all_layers_sparse(self)
        super().set_gguf_parameters(writer)
        self.write_expert_hparams(writer, norm_topk=False)

    def tensor_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[1:] if ".ffn_gate_inp_shexp." in gguf_name else shape

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return data.reshape(-1) if ".ffn_gate_inp_shexp." in gguf_name else data


@register
class Qwen3MoeConverter(Qwen3Converter):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    stack_experts = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        _check_all_layers_sparse(self)
        super().set_gguf_parameters(writer)
        self.write_expert_hparams(writer, norm_topk=True)
