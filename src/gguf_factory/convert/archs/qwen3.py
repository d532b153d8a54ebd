"""Qwen3 (``Qwen3ForCausalLM``): Qwen2 without the Q/K/V biases, with per-head RMS norms on queries and keys
(``q_norm`` / ``k_norm`` -> ``attn_q_norm`` / ``attn_k_norm``) and a head size of its own (``head_dim``).
NEOX rope in both engines: rows are written as they are.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import ArchConverter
from .registry import register

log = logging.getLogger(__name__)


@register
class Qwen3Converter(ArchConverter):
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3

    def check_config(self) -> None:
        where = f"{self.model_dir}/config.json"
        act = self.hparam("hidden_act", default="silu")
        if act != "silu":
            raise ConversionError(f"{where}: hidden_act {act!r} is not supported (Qwen3 uses silu)")
        if self.config.get("use_sliding_window") and self.config.get("sliding_window"):
            log.warning("%s: use_sliding_window=true is ignored by llama.cpp's %s", where, self.arch_name)

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        self.check_config()
        self.write_common_hparams(writer)  # key/value length when head_dim != hidden / heads

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        return data
