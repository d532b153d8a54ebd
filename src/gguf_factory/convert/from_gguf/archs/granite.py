"""llama.cpp ``granite`` -> ``GraniteForCausalLM`` (IBM Granite 3.x dense).

Granite is a LLaMA layout, and the forward converter treats it as one: the Q/K projection rows are
permuted to llama.cpp's interleaved rotary pairs, undone here with the LLaMA plug-in's
:func:`~.llama.unpermute_rotary_rows` (Llama 3 ``rope_freqs`` scaling too, which llama.cpp's granite graph
applies). Its four scalars are llama.cpp keys, read back as the config's multipliers: ``embedding_scale``
-> ``embedding_multiplier``, ``residual_scale`` -> ``residual_multiplier``, ``attention.scale`` ->
``attention_multiplier`` (the softmax scale) and ``logit_scale`` -> ``logits_scaling`` (the logits
divisor). llama.cpp reads 0 (or a missing key) for the first three as "no scaling" / ``head_dim ** -0.5``,
which is what is written then. The keys are float32, so each multiplier is the shortest decimal of its
float32 value (``0.2``, not ``0.20000000298``): a config multiplier that float32 cannot hold exactly comes
back as the float32 value llama.cpp computes with. A GGUF whose ``rope.scaling.finetuned`` is false (for
llama.cpp's granite: no rotary embedding at all) is refused.
"""

from __future__ import annotations

from typing import Any

import gguf

from ....errors import ModelError
from ..base import KA, KL, KR
from .llama import LlamaReverse
from .registry import register


@register
class GraniteReverse(LlamaReverse):
    gguf_arch = gguf.MODEL_ARCH.GRANITE
    hf_architecture = "GraniteForCausalLM"
    model_type = "granite"

    def config_kwargs(self) -> dict[str, Any]:
        if not self.src.boolean(self.key(KR.SCALING_FINETUNED), True):
            raise self.refuse(f"no rotary embedding ({self.key(KR.SCALING_FINETUNED)} = false)")
        kwargs = super().config_kwargs()
        if kwargs["head_dim"] == self.n_embd // self.n_head:
            del kwargs["head_dim"]  # GraniteConfig has no head_dim field; its attention reads one if set
        logit_scale = self.number(KL.LOGIT_SCALE)
        if not logit_scale > 0:
            raise ModelError(f"{self.where}: {self.key(KL.LOGIT_SCALE)} is {logit_scale}, not a divisor")
        return {
            **kwargs,
            "embedding_multiplier": self.number(KL.EMBEDDING_SCALE, 0.0) or 1.0,
            "residual_multiplier": self.number(KL.RESIDUAL_SCALE, 0.0) or 1.0,
            "attention_multiplier": self.number(KA.SCALE, 0.0) or self.head_dim**-0.5,
            "logits_scaling": logit_scale,
        }
