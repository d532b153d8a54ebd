"""Phi-3 / Phi-3.5 models (``Phi3ForCausalLM``).

The attention input projection is one fused ``qkv_proj`` (rows: Q, then K, then V) and the MLP input one
fused ``gate_up_proj`` (rows: gate, then up). llama.cpp's phi3 graph keeps both fused (``attn_qkv``, and
``ffn_up`` with ``2 * n_ff`` rows whose first half is the SwiGLU gate), so the tensors are copied as they
are. Rope is NEOX (rotate-half pairing, like transformers): no row permutation. Phi-3.5 / 128k "longrope"
scaling becomes the per-frequency ``rope_factors_long`` / ``rope_factors_short`` tensors plus the rope
attention factor; llama.cpp picks the long factors when the context exceeds the original one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import gguf
import numpy as np

from ...errors import ConversionError
from ..base import QT, ArchConverter, PlannedTensor
from .llama import rope_config
from .registry import register

log = logging.getLogger(__name__)


@register
class Phi3Converter(ArchConverter):
    hf_architectures = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        where = f"{self.model_dir}/config.json"
        self.n_embd = int(self.hparam("hidden_size"))
        self.n_head = int(self.hparam("num_attention_heads"))
        self.n_head_kv = int(self.hparam("num_key_value_heads", default=self.n_head))
        self.head_dim = self.n_embd // self.n_head
        if int(self.hparam("head_dim", default=self.head_dim)) != self.head_dim:
            raise ConversionError(f"{where}: head_dim != hidden_size / num_attention_heads is not supported")
        self.rope_theta, self.rope_scaling = rope_config(self.config)
        partial = float(
            self.rope_scaling.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
        )
        self.rope_dims = int(partial * self.n_embd) // self.n_head
        self.n_ctx = int(self.hparam("max_position_embeddings"))
        self.n_ctx_orig = int(
            self.rope_scaling.get("original_max_position_embeddings")
            or self.config.get("original_max_position_embeddings")
            or self.n_ctx
        )
        act = self.hparam("hidden_act", default="silu")
        if act != "silu":
            raise ConversionError(f"{where}: hidden_act {act!r} is not supported (Phi-3 uses silu)")
        kind = self.rope_scaling["rope_type"]
        if kind not in ("default", "longrope", "su"):
            raise ConversionError(f"{where}: rope scaling {kind!r} is not supported for Phi-3 yet")

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        window = self.config.get("sliding_window")
        if window and int(window) < self.n_ctx:
            log.warning(
                "sliding_window=%s is ignored by llama.cpp's phi3 (full attention); outputs differ from "
                "transformers past %s tokens",
                window,
                window,
            )
        writer.add_context_length(self.n_ctx)
        writer.add_rope_scaling_orig_ctx_len(self.n_ctx_orig)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(int(self.hparam("intermediate_size")))
        writer.add_block_count(self.block_count)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps", default=1e-5)))
        writer.add_rope_dimension_count(self.rope_dims)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_sliding_window(int(window or 0))
        if self._longrope():
            scale = self.n_ctx / self.n_ctx_orig
            attn_factor = self.rope_scaling.get("attention_factor")
            if attn_factor is None:
                attn_factor = math.sqrt(1 + math.log(scale) / math.log(self.n_ctx_orig)) if scale > 1 else 1.0
            writer.add_rope_scaling_attn_factors(float(attn_factor))

    def _longrope(self) -> bool:
        return self.rope_scaling["rope_type"] in ("longrope", "su") and bool(
            self.rope_scaling.get("long_factor")
        )

    def extra_tensors(self) -> list[PlannedTensor]:
        if not self._longrope():
            return []
        out: list[PlannedTensor] = []
        for key, tensor in (
            ("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT),
        ):
            values = self.rope_scaling.get(key)
            if not isinstance(values, list) or len(values) != self.rope_dims // 2:
                raise ConversionError(
                    f"{self.model_dir}/config.json: rope {key} must be a list of "
                    f"{self.rope_dims // 2} numbers"
                )
            arr = np.asarray(values, dtype=np.float32)
            name = gguf.TENSOR_NAMES[tensor] + ".weight"
            out.append(PlannedTensor(name, arr.shape, QT.F32, lambda a=arr: a.copy(), source=f"rope {key}"))
        return out

    def check_plan(self, plan: list[PlannedTensor]) -> None:
        super().check_plan(plan)
        n_ff = int(self.hparam("intermediate_size"))
        for p in plan:
            if p.name.endswith(".ffn_up.weight") and p.shape[0] != 2 * n_ff:
                raise ConversionError(
                    f"{p.source}: {p.shape[0]} rows, expected 2 * intermediate_size = "
                    f"{2 * n_ff} (fused gate/up)"
                )
