"""llama.cpp ``qwen3moe`` -> ``Qwen3MoeForCausalLM`` (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention
(per-head Q/K RMS norms, a head size of its own, NEOX rope, tensors copied as they are) with every layer's
MLP a mixture of experts, no shared expert. The experts are written in the checkpoint layout
``mlp.experts.<i>.gate_proj / up_proj / down_proj`` (:mod:`.experts`).

GGUF keys -> ``Qwen3MoeConfig``:

* ``qwen3moe.expert_count`` -> ``num_experts`` (checked against every ``blk.N.ffn_gate_inp`` [n_expert, embd]
  and ``ffn_*_exps``);
* ``qwen3moe.expert_used_count`` -> ``num_experts_per_tok`` (1 .. expert_count; one value for all layers);
* ``qwen3moe.expert_feed_forward_length`` -> ``moe_intermediate_size``, each expert's width (absent:
  ``feed_forward_length / expert_used_count``, llama.cpp's default), checked against ``ffn_gate_exps`` /
  ``ffn_up_exps`` [n_expert, ff, embd] and ``ffn_down_exps`` [n_expert, embd, ff];
* ``qwen3moe.feed_forward_length`` -> ``intermediate_size`` (the width of a dense MLP layer, which this
  architecture does not have in llama.cpp: ``decoder_sparse_step`` 1 and no ``mlp_only_layers``);
* ``norm_topk_prob`` true: llama.cpp's qwen3moe graph always renormalizes the chosen experts' weights (a
  ``qwen3moe.expert_weights_norm`` of false, another gating function, a weight scale or expert groups are
  refused, :meth:`~.experts.ExpertsReverse.check_routing`);
* the rest as for Qwen3 (:mod:`.qwen3`): ``embedding_length`` -> ``hidden_size``, ``block_count`` ->
  ``num_hidden_layers``, ``attention.head_count`` / ``head_count_kv``, ``attention.key_length`` ->
  ``head_dim``, ``context_length`` -> ``max_position_embeddings``, ``attention.layer_norm_rms_epsilon`` ->
  ``rms_norm_eps``, ``rope.*`` -> ``rope_parameters``, ``attention_bias`` whether ``blk.0.attn_q.bias``
  exists, no sliding window.
"""

from __future__ import annotations

from typing import Any

import gguf

from .experts import ExpertsReverse
from .qwen3 import Qwen3Reverse
from .registry import register


@register
class Qwen3MoeReverse(ExpertsReverse, Qwen3Reverse):
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    hf_architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"

    def config_kwargs(self) -> dict[str, Any]:
        kwargs = super().config_kwargs()
        n_ff = kwargs["intermediate_size"]
        n_expert, n_used = self.expert_counts()
        self.check_routing(renormalized=True)
        n_ff_exp, ff_from = self.expert_width(n_ff, n_used)
        self.check_experts(n_expert, n_ff_exp, ff_from)
        kwargs.update(
            {
                "num_experts": n_expert,
                "num_experts_per_tok": n_used,
                "moe_intermediate_size": n_ff_exp,
                "norm_topk_prob": True,  # llama.cpp's qwen3moe graph always renormalizes
                "decoder_sparse_step": 1,  # and every layer is a mixture
                "mlp_only_layers": [],
            }
        )
        return kwargs
