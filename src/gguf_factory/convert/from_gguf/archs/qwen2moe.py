"""llama.cpp ``qwen2moe`` -> ``Qwen2MoeForCausalLM`` (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (Q/K/V
biases, NEOX rope, tensors copied as they are) with every layer's MLP a mixture of experts plus one shared
expert, scaled by a sigmoid gate. The experts are written in the checkpoint layout
``mlp.experts.<i>.gate_proj / up_proj / down_proj`` (:mod:`.experts`).

GGUF keys -> ``Qwen2MoeConfig``:

* ``qwen2moe.expert_count`` -> ``num_experts`` (checked against every ``blk.N.ffn_gate_inp`` [n_expert, embd]
  and ``ffn_*_exps``);
* ``qwen2moe.expert_used_count`` -> ``num_experts_per_tok`` (1 .. expert_count; one value for all layers);
* ``qwen2moe.expert_feed_forward_length`` -> ``moe_intermediate_size``, each expert's width (absent:
  ``feed_forward_length / expert_used_count``, llama.cpp's default), checked against ``ffn_gate_exps`` /
  ``ffn_up_exps`` [n_expert, ff, embd] and ``ffn_down_exps`` [n_expert, embd, ff];
* ``qwen2moe.expert_shared_feed_forward_length`` -> ``shared_expert_intermediate_size`` (absent:
  ``feed_forward_length``, llama.cpp's default), checked against ``ffn_gate_shexp`` / ``ffn_up_shexp``
  [ff, embd] and ``ffn_down_shexp`` [embd, ff];
* ``blk.N.ffn_gate_inp_shexp`` [embd] (a vector in llama.cpp) -> ``mlp.shared_expert_gate.weight`` [1, embd]
  (a one-output Linear in transformers);
* ``qwen2moe.feed_forward_length`` -> ``intermediate_size`` (the width of a dense MLP layer, which this
  architecture does not have in llama.cpp: ``decoder_sparse_step`` 1 and no ``mlp_only_layers``);
* ``norm_topk_prob`` false: llama.cpp's qwen2moe graph never renormalizes the chosen experts' weights (a
  ``qwen2moe.expert_weights_norm`` of true, another gating function, a weight scale or expert groups are
  refused, :meth:`~.experts.ExpertsReverse.check_routing`);
* ``qkv_bias``: whether ``blk.0.attn_q.bias`` exists;
* the rest as for Qwen2 (:mod:`.qwen2`): ``embedding_length`` -> ``hidden_size``, ``block_count`` ->
  ``num_hidden_layers``, ``attention.head_count`` / ``head_count_kv``, ``context_length`` ->
  ``max_position_embeddings``, ``attention.layer_norm_rms_epsilon`` -> ``rms_norm_eps``, ``rope.*`` ->
  ``rope_parameters``, no sliding window.

llama.cpp's qwen2moe always reads ``output.weight``, so a rebuilt checkpoint never ties its embeddings.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ..base import KL
from .experts import ExpertsReverse
from .qwen2 import Qwen2Reverse
from .registry import register

SHARED_GATE = ".ffn_gate_inp_shexp."


@register
class Qwen2MoeReverse(ExpertsReverse, Qwen2Reverse):
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    hf_architecture = "Qwen2MoeForCausalLM"
    model_type = "qwen2_moe"

    def config_kwargs(self) -> dict[str, Any]:
        kwargs = super().config_kwargs()
        n_ff = kwargs["intermediate_size"]
        n_expert, n_used = self.expert_counts()
        self.check_routing(renormalized=False)
        n_ff_exp, ff_from = self.expert_width(n_ff, n_used)
        self.check_experts(n_expert, n_ff_exp, ff_from)
        sh_key = self.key(KL.EXPERT_SHARED_FEED_FORWARD_LENGTH)
        n_ff_sh = self.integer(KL.EXPERT_SHARED_FEED_FORWARD_LENGTH, None)
        sh_from = f"{sh_key} = {n_ff_sh}"
        if n_ff_sh is None:
            n_ff_sh = n_ff
            sh_from = f"no {sh_key} (feed_forward_length = {n_ff})"
        n_embd = self.n_embd_rows
        self.check_layer_shapes(
            {
                "ffn_gate_shexp.weight": (n_ff_sh, n_embd),
                "ffn_up_shexp.weight": (n_ff_sh, n_embd),
                "ffn_down_shexp.weight": (n_embd, n_ff_sh),
                "ffn_gate_inp_shexp.weight": (n_embd,),
            },
            sh_from,
        )
        kwargs.update(
            {
                "num_experts": n_expert,
                "num_experts_per_tok": n_used,
                "moe_intermediate_size": n_ff_exp,
                "shared_expert_intermediate_size": n_ff_sh,
                "norm_topk_prob": False,  # llama.cpp's qwen2moe graph never renormalizes
                "decoder_sparse_step": 1,  # and every layer is a mixture
                "mlp_only_layers": [],
                "qkv_bias": self.has_tensor("blk.0.attn_q.bias"),
            }
        )
        return kwargs

    def hf_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *shape) if SHARED_GATE in gguf_name else shape

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return data.reshape(1, -1) if SHARED_GATE in gguf_name else data
