"""llama.cpp ``llama`` with experts -> ``MixtralForCausalLM`` (Mixtral 8x7B / 8x22B and other Llama-layout
mixtures of experts).

llama.cpp has no architecture of its own for Mixtral: a ``llama`` GGUF whose ``llama.expert_count`` is set
runs every layer's FFN as a mixture of experts (router ``ffn_gate_inp``, experts merged in ``ffn_gate_exps``
/ ``ffn_up_exps`` / ``ffn_down_exps``). The registry hands such files to this class
(:func:`~.registry.register_variant`); every other ``llama`` file stays a :class:`~.llama.LlamaReverse`
rebuild, with its own refusals. Attention is the Llama one (Q/K rows un-permuted, Llama 3 ``rope_freqs``
solved for, :mod:`.llama`); the experts are written in the checkpoint layout
``block_sparse_moe.experts.<i>.w1 / w3 / w2`` (:mod:`.experts`).

GGUF keys -> ``MixtralConfig``:

* ``llama.expert_count`` -> ``num_local_experts`` (checked against every ``blk.N.ffn_gate_inp`` [n_expert,
  embd] and ``ffn_*_exps``);
* ``llama.expert_used_count`` -> ``num_experts_per_tok`` (1 .. expert_count; one value for all layers);
* ``llama.feed_forward_length`` -> ``intermediate_size``, each expert's width: llama.cpp sizes the llama
  architecture's ``ffn_*_exps`` by it ([n_expert, ff, embd], down [n_expert, embd, ff]) and does not read
  ``llama.expert_feed_forward_length``;
* renormalizing the chosen experts' weights: llama.cpp's llama graph always does, as Mixtral always does (no
  config field); a ``llama.expert_weights_norm`` of false, another gating function, a weight scale or expert
  groups are refused (:meth:`~.experts.ExpertsReverse.check_routing`);
* ``sliding_window`` None (llama.cpp's llama attends to the whole context);
* the rest as for Llama: ``llama.embedding_length`` -> ``hidden_size``, ``llama.block_count`` ->
  ``num_hidden_layers``, ``llama.attention.head_count`` / ``head_count_kv`` -> ``num_attention_heads`` /
  ``num_key_value_heads``, ``llama.attention.key_length`` -> ``head_dim`` (None when it is
  embedding_length / head_count, as in Mixtral's configs), ``llama.context_length`` ->
  ``max_position_embeddings``, ``llama.attention.layer_norm_rms_epsilon`` -> ``rms_norm_eps``,
  ``llama.rope.*`` and ``rope_freqs`` -> ``rope_parameters``.

Mixtral has no attention or FFN biases: a file with them is refused.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..base import KL
from ..source import GGUFSource
from .experts import ExpertsReverse
from .llama import LlamaReverse
from .registry import register_variant


def has_experts(src: GGUFSource) -> bool:
    """A ``llama`` file with ``llama.expert_count`` set (non-zero): a mixture of experts."""
    return src.integer(src.arch_key(KL.EXPERT_COUNT), 0) != 0


@register_variant(has_experts)
class MixtralReverse(ExpertsReverse, LlamaReverse):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    hf_architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    mixture = True

    def config_kwargs(self) -> dict[str, Any]:
        kwargs = super().config_kwargs()
        biases = [kwargs.pop("attention_bias"), kwargs.pop("mlp_bias")]
        if any(biases):
            raise self.refuse("attention or FFN biases (blk.0.attn_q.bias / blk.0.ffn_up.bias)")
        if kwargs["head_dim"] == self.n_embd // self.n_head:
            kwargs["head_dim"] = None  # as Mixtral configs leave it: hidden_size / num_attention_heads
        n_expert, n_used = self.expert_counts()
        self.check_routing(renormalized=True)
        n_ff = kwargs["intermediate_size"]
        self.check_experts(n_expert, n_ff, f"{self.key(KL.FEED_FORWARD_LENGTH)} = {n_ff}")
        kwargs.update(
            {
                "num_local_experts": n_expert,
                "num_experts_per_tok": n_used,
                "sliding_window": None,  # llama.cpp's llama attends to the whole context
            }
        )
        return kwargs
