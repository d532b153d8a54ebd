"""llama.cpp ``gemma2`` -> ``Gemma2ForCausalLM``; :class:`GemmaReverseBase` is shared with Gemma 3.

What the forward converter (and llama.cpp's) did, undone:

* RMSNorm: llama.cpp multiplies by ``w``, transformers by ``1 + w``: every ``*norm.weight`` becomes
  ``w - 1``. (In float32, ``(w + 1) - 1`` is ``w`` only to within half a unit of ``1``'s last place; the
  rebuilt value converts back to the very same GGUF value.)
* Attention scale: llama.cpp uses ``head_dim ** -0.5`` (``(hidden / heads) ** -0.5`` for the layer counts
  it treats as 27B); any other transformers scale was folded into the weights, so the rebuilt config says
  ``query_pre_attn_scalar`` = the size llama.cpp scales by.
* Sliding window: the window and which layers slide (the per-layer pattern key, else llama.cpp's default
  period) become ``sliding_window`` / ``layer_types``. Soft-capping keys go back to their config keys (the
  forward converter's "no attention capping" stand-in, a cap of 1e5, back to none).
"""

from __future__ import annotations

from typing import Any, ClassVar

import gguf
import numpy as np

from ....errors import ModelError
from ..base import KA, KL, OUTPUT, ReverseArch
from .registry import register

NO_ATTN_CAP = 1e5  # what the forward converter writes for "no attention soft-capping"


class GemmaReverseBase(ReverseArch):
    # n_layer llama.cpp treats as "27B" (attention scale (hidden / heads) ** -0.5), and its default period
    llama_cpp_27b_layers: ClassVar[int] = 0
    default_swa_period: ClassVar[int] = 2
    default_window: ClassVar[int | None] = 4096  # llama.cpp's sliding window when the key is missing

    def core_kwargs(self) -> dict[str, Any]:
        """What every Gemma has: sizes, heads, context, norm epsilon."""
        n_embd, n_head, head_dim = self.head_geometry()
        return {
            "hidden_size": n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.uniform(KA.HEAD_COUNT_KV, n_head),
            "head_dim": head_dim,
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "rms_norm_eps": self.number(KA.LAYERNORM_RMS_EPS),
            "attention_bias": False,
        }

    def common_kwargs(self) -> dict[str, Any]:
        """Gemma 2 and 3: the core plus the attention scale llama.cpp uses, final soft-capping, sliding."""
        core = self.core_kwargs()
        n_embd, n_head = core["hidden_size"], core["num_attention_heads"]
        scalar = n_embd // n_head if self.n_layer == self.llama_cpp_27b_layers else core["head_dim"]
        final_cap = self.number(KL.FINAL_LOGIT_SOFTCAPPING, None)
        return {
            **core,
            "hidden_activation": "gelu_pytorch_tanh",  # llama.cpp's GELU is the tanh approximation
            "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": final_cap or None,
            **self.sliding_kwargs(),
        }

    def sliding_kwargs(self) -> dict[str, Any]:
        window = self.integer(KA.SLIDING_WINDOW, self.default_window)
        if not window:
            return {"sliding_window": None, "layer_types": ["full_attention"] * self.n_layer}
        pattern = self.src.array(
            self.key(KA.SLIDING_WINDOW_PATTERN), frozenset({gguf.GGUFValueType.BOOL}), None
        )
        if pattern is not None:
            if len(pattern) != self.n_layer:
                raise ModelError(
                    f"{self.where}: {self.key(KA.SLIDING_WINDOW_PATTERN)} has {len(pattern)} entries for "
                    f"{self.n_layer} layers"
                )
            sliding = [bool(v) for v in pattern]
        else:
            period = self.default_swa_period
            sliding = [bool((i + 1) % period) for i in range(self.n_layer)]
        types = ["sliding_attention" if s else "full_attention" for s in sliding]
        return {"sliding_window": window, "layer_types": types}

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith("norm.weight"):
            return data - np.float32(1.0)
        return data


@register
class Gemma2Reverse(GemmaReverseBase):
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    hf_architecture = "Gemma2ForCausalLM"
    model_type = "gemma2"
    llama_cpp_27b_layers = 46
    default_swa_period = 2

    def config_kwargs(self) -> dict[str, Any]:
        if self.has_tensor(OUTPUT):
            raise ModelError(f"{self.where}: llama.cpp's gemma2 does not read {OUTPUT} (it ties the output)")
        rope = self.rope_parameters()
        if rope["rope_type"] != "default":
            raise self.refuse(f"rope scaling {rope['rope_type']!r} for Gemma 2")
        cap = self.number(KL.ATTN_LOGIT_SOFTCAPPING, 50.0)  # llama.cpp's default for gemma2
        return {
            **self.common_kwargs(),
            "rope_parameters": rope,
            "attn_logit_softcapping": None if cap >= NO_ATTN_CAP else cap,
        }
