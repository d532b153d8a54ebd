"""llama.cpp ``smollm3`` -> ``SmolLM3ForCausalLM`` (SmolLM3).

SmolLM3 is a LLaMA layout, and the forward converter treats it as one: the Q/K projection rows are
permuted to llama.cpp's interleaved rotary pairs, undone here with the LLaMA plug-in's
:func:`~.llama.unpermute_rotary_rows`. Which layers skip rope (NoPE) is not in the GGUF: llama.cpp's
smollm3 fixes ``n_no_rope_layer_step = 4`` (layers 4, 8, ... skip rope, the forward converter refuses any
other ``no_rope_layers``), so the rebuilt config gets transformers' ``no_rope_layers`` list for that step
(``1`` = uses rope) and ``no_rope_layer_interval`` 4. llama.cpp's smollm3 graph attends to the whole context
and applies no ``rope_freqs`` factors, so the config has no sliding window and a GGUF with ``rope_freqs``
(Llama 3 rope scaling llama.cpp would ignore here) is refused.
"""

from __future__ import annotations

from typing import Any

import gguf

from .llama import ROPE_FREQS, LlamaReverse
from .registry import register

LLAMA_CPP_NO_ROPE_STEP = 4  # llama.cpp's hparams.n_no_rope_layer_step for smollm3 (no GGUF key)


@register
class SmolLM3Reverse(LlamaReverse):
    gguf_arch = gguf.MODEL_ARCH.SMOLLM3
    hf_architecture = "SmolLM3ForCausalLM"
    model_type = "smollm3"

    def config_kwargs(self) -> dict[str, Any]:
        if self.has_tensor(ROPE_FREQS):
            raise self.refuse(
                f"{ROPE_FREQS} (Llama 3 rope scaling, which llama.cpp's smollm3 does not apply)"
            )
        kwargs = super().config_kwargs()
        if kwargs["head_dim"] == self.n_embd // self.n_head:
            del kwargs["head_dim"]  # SmolLM3Config has no head_dim field; its attention reads one if set
        step = LLAMA_CPP_NO_ROPE_STEP
        return {
            **kwargs,
            "no_rope_layers": [int((i + 1) % step != 0) for i in range(self.n_layer)],
            "no_rope_layer_interval": step,
            "use_sliding_window": False,  # llama.cpp's smollm3 attends to the whole context
            "sliding_window": None,
        }
