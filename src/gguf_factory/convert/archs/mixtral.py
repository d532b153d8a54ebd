"""Mixtral (``MixtralForCausalLM``): a LLaMA with a mixture of experts in place of each MLP.

llama.cpp runs it as its ``llama`` architecture with expert tensors: the router (``block_sparse_moe.gate``
-> ``ffn_gate_inp``) and the experts' w1/w3/w2 stacked into ``ffn_gate_exps`` / ``ffn_up_exps`` /
``ffn_down_exps`` (one 3-D tensor each, written one expert at a time). Its graph renormalizes the chosen
experts' softmax weights, as Mixtral does.
"""

from __future__ import annotations

import gguf

from .llama import LlamaConverter
from .registry import register


@register
class MixtralConverter(LlamaConverter):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    stack_experts = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(writer)
        self.write_expert_hparams(writer, norm_topk=None)  # Mixtral always renormalizes, as llama.cpp does
