"""Gemma 3 text models (``Gemma3ForCausalLM``): Gemma 2 plus Q/K RMS norms, no attention soft-capping,
5 sliding layers to 1 global by default, separate rope bases for sliding (local) and global layers, and
rope scaling (linear) on the global layers only. See :mod:`.gemma2` for what is shared.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import ArchConverter
from .gemma2 import GemmaBase
from .registry import register


@register
class Gemma3Converter(GemmaBase):
    hf_architectures = ("Gemma3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    llama_cpp_27b_layers = 62
    default_swa_pattern = 6

    def map_tensor_name(self, hf_name: str) -> str | None:
        # llama.cpp's gemma3 (unlike gemma2) reads an untied output matrix.
        return ArchConverter.map_tensor_name(self, hf_name)

    def _rope(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(global, local) rope parameters from transformers 5 ``rope_parameters`` or the 4.x keys."""
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and "full_attention" in params:
            full = dict(params.get("full_attention") or {})
            local = dict(params.get("sliding_attention") or {})
        else:
            full = dict(self.config.get("rope_scaling") or {})
            full.setdefault("rope_theta", self.config.get("rope_theta", 1_000_000.0))
            local = {"rope_theta": self.config.get("rope_local_base_freq", 10_000.0)}
        for p in (full, local):
            p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
        return full, local

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        where = f"{self.model_dir}/config.json"
        if self.config.get("attn_logit_softcapping"):
            raise ConversionError(f"{where}: attn_logit_softcapping is not supported by llama.cpp's gemma3")
        self._write_common(writer)
        full, local = self._rope()
        writer.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
        if self._swa_layers() is not None:
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10_000.0)))
        if local["rope_type"] != "default":
            raise ConversionError(f"{where}: rope scaling on the sliding layers is not supported")
        if full["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        elif full["rope_type"] != "default":
            raise ConversionError(f"{where}: rope scaling {full['rope_type']!r} is not supported for Gemma 3")

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        data = super().modify_tensor(gguf_name, hf_name, data)  # norms: w + 1
        # The attention-scale ratio goes into the query norm (a scale on q_proj would be normalised away).
        if ".attn_q_norm." in gguf_name and not math.isclose(self.q_factor, 1.0, rel_tol=1e-7):
            data = data * np.float32(self.q_factor)
        return data
