"""llama.cpp ``llama`` -> ``LlamaForCausalLM`` (Llama 1/2/3, Mistral without sliding window, SmolLM,
TinyLlama, our scratch models). A ``llama`` file with ``llama.expert_count`` is a Mixtral: the registry hands
it to :class:`~.mixtral.MixtralReverse` (this class alone refuses experts).

The forward converter (and llama.cpp's own) reorders the Q/K projection rows of each head from
transformers' rotate-half layout to llama.cpp's interleaved pairs (:func:`~..convert.archs.llama.
permute_rotary_rows`); :func:`unpermute_rotary_rows` puts them back. Llama 3.x rope scaling is stored
as a ``rope_freqs`` tensor of per-frequency divisors: the parameters that make transformers compute those
same divisors are solved for and checked against the tensor (:func:`llama3_rope_parameters`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import gguf
import numpy as np

from ....errors import ModelError
from ...base import llama3_rope_factors
from ..base import KA, KL, KR, ReverseArch
from .registry import register

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def unpermute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the forward converter's ``permute_rotary_rows``: llama.cpp's interleaved rotary pairs
    (rows ``2i, 2i+1`` of a head) back to transformers' halves (rows ``i`` and ``d/2 + i``)."""
    rows = w.shape[0]
    if rows % (2 * n_head) != 0:
        raise ModelError(f"cannot un-permute {rows} rows over {n_head} heads (not a multiple of 2 * heads)")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_parameters(factors: np.ndarray, theta: float, head_dim: int, where: str) -> dict[str, Any]:
    """Llama 3.x ``rope_parameters`` that reproduce llama.cpp's ``rope_freqs`` divisors.

    transformers divides a frequency by 1 (wavelength below ``old_ctx / high``), by ``factor`` (above
    ``old_ctx / low``) or by ``1 / ((1 - s) / factor + s)`` in between, with ``s = (old_ctx / wavelength -
    low) / (high - low)``. Llama 3's published ``low_freq_factor`` 1 and ``high_freq_factor`` 4 are tried
    first (``old_ctx`` then follows from any in-between value, or is the power of two that classifies every
    frequency the same way); else ``low`` is taken as 1 and the rest solved from the in-between values. A
    candidate is accepted only if it gives the tensor's values to float32 precision; otherwise the GGUF is
    refused.
    """
    f = factors.astype(np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != inv_freq.shape:
        raise ModelError(
            f"{where}: {ROPE_FREQS} has {f.size} values, expected head_dim / 2 ({inv_freq.size})"
        )
    wavelen = 2 * math.pi / inv_freq
    factor = float(f.max())
    if factor <= 1.0 + 1e-6 or abs(float(f.min()) - 1.0) > 1e-6:
        raise ModelError(f"{where}: {ROPE_FREQS} does not have the shape of Llama 3 rope scaling")
    factor = round(factor, 6)
    mid = ~np.isclose(f, 1.0, rtol=0, atol=1e-6) & ~np.isclose(f, factor, rtol=1e-6, atol=0)
    smooth = (1.0 / f[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    w = wavelen[mid]

    def candidates() -> Any:
        if mid.any():  # low 1, high 4: s = (old / w - 1) / 3
            yield 1.0, 4.0, float(np.mean(w * (3.0 * smooth + 1.0)))
        else:
            for k in range(4, 40):
                yield 1.0, 4.0, float(2**k)
        if mid.sum() >= 2:  # low 1: s = old / ((high - 1) w) - 1 / (high - 1), linear in 1 / w
            a, b = np.linalg.lstsq(np.stack([1.0 / w, -np.ones(w.size)], 1), smooth, rcond=None)[0]
            if b > 0:
                yield 1.0, 1.0 + 1.0 / b, a / b

    for low, high, old in candidates():
        old = float(round(old)) if abs(old - round(old)) < 1e-4 * old else old
        params = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": round(high, 6),
            "original_max_position_embeddings": int(old) if old.is_integer() else old,
        }
        if np.allclose(llama3_rope_factors(params, theta, head_dim), factors, rtol=2e-6, atol=0):
            return params
    raise ModelError(f"{where}: {ROPE_FREQS} cannot be expressed as transformers' llama3 rope scaling")


@register
class LlamaReverse(ReverseArch):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    hf_architecture = "LlamaForCausalLM"
    model_type = "llama"
    config_tensors = (ROPE_FREQS,)
    # True in MixtralReverse (.mixtral, which the registry picks for files with llama.expert_count).
    mixture: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.integer(KL.EXPERT_COUNT, 0) and not self.mixture:
            raise self.refuse("a mixture of experts (llama.expert_count)")
        self.n_embd = self.integer(KL.EMBEDDING_LENGTH)
        self.n_head = self.uniform(KA.HEAD_COUNT)
        self.n_head_kv = self.uniform(KA.HEAD_COUNT_KV, self.n_head)
        if self.n_embd != self.n_embd_rows or self.n_head <= 0 or self.n_head_kv <= 0:
            raise ModelError(
                f"{self.where}: embedding_length {self.n_embd} / head counts {self.n_head}, {self.n_head_kv} "
                f"do not fit token_embd.weight of width {self.n_embd_rows}"
            )
        self.head_dim = self.integer(KA.KEY_LENGTH, self.n_embd // self.n_head)
        if self.integer(KA.VALUE_LENGTH, self.head_dim) != self.head_dim:
            raise self.refuse("value heads of another size than key heads")
        if self.integer(KR.DIMENSION_COUNT, self.head_dim) != self.head_dim:
            raise self.refuse(f"rotary embedding on part of each head ({self.key(KR.DIMENSION_COUNT)})")

    def config_kwargs(self) -> dict[str, Any]:
        rope = self.rope_parameters()
        if self.has_tensor(ROPE_FREQS):
            if rope["rope_type"] != "default":
                raise self.refuse(f"both {ROPE_FREQS} and {rope['rope_type']} rope scaling")
            rope = llama3_rope_parameters(
                self.src.load(ROPE_FREQS), rope["rope_theta"], self.head_dim, self.where
            )
        return {
            "hidden_size": self.n_embd,
            "intermediate_size": self.uniform(KL.FEED_FORWARD_LENGTH),
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.integer(KL.CONTEXT_LENGTH),
            "rms_norm_eps": self.number(KA.LAYERNORM_RMS_EPS),
            "rope_parameters": rope,
            "hidden_act": "silu",
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
            "mlp_bias": self.has_tensor("blk.0.ffn_up.bias"),
        }

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if ".attn_q." in gguf_name:
            return unpermute_rotary_rows(data, self.n_head)
        if ".attn_k." in gguf_name:
            return unpermute_rotary_rows(data, self.n_head_kv)
        return data
