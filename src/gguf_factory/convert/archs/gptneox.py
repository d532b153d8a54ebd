"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``).

transformers keeps the fused ``query_key_value`` rows per head (head 0's q, k, v, then head 1's ...);
llama.cpp's gptneox graph slices ``attn_qkv`` as all queries, then all keys, then all values, so the rows
(and the bias) are regrouped. Partial NEOX rope (``rotary_pct``), LayerNorms with biases, parallel or
sequential residual (``use_parallel_residual``), a GELU MLP.
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
class GPTNeoXConverter(ArchConverter):
    hf_architectures = ("GPTNeoXForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GPTNEOX
    output_required = True

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        where = f"{self.model_dir}/config.json"
        act = self.hparam("hidden_act", default="gelu")
        if act == "gelu":
            log.warning("%s: exact GELU is run by llama.cpp with its tanh approximation", where)
        elif act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ConversionError(f"{where}: hidden_act {act!r} is not supported by llama.cpp's gptneox")
        if self.n_head_kv != self.n_head:
            raise ConversionError(f"{where}: grouped-query attention is not supported by llama.cpp's gptneox")
        self.write_common_hparams(writer, norm="layer")
        writer.add_parallel_residual(bool(self.config.get("use_parallel_residual", True)))

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if ".attn_qkv." not in gguf_name:
            return data
        # [head][q|k|v][head_dim] rows -> [q|k|v][head][head_dim]
        per_head = data.reshape(self.n_head, 3, self.head_dim, *data.shape[1:])
        return np.ascontiguousarray(per_head.swapaxes(0, 1)).reshape(data.shape)
