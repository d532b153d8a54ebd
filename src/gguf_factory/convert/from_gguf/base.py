"""The reverse architecture plug-in base class: a GGUF's hyper-parameters -> a transformers config, and each
transformers parameter -> the GGUF tensor it comes from, with the converter's layout changes undone.

Which GGUF tensor feeds which transformers parameter is not written by hand: the transformers model is built
from the rebuilt config on the ``meta`` device (no memory), and each of its parameter names is mapped with
gguf-py's own :class:`gguf.TensorNameMap` (the table the forward converter maps with). Every parameter must
find its tensor with the shape transformers expects, and every GGUF tensor must be used (as a weight, or as
config such as rope factors): a GGUF that does not fit the architecture is refused, not half-loaded.

Adding an architecture: subclass :class:`ReverseArch` in ``archs/<name>.py``, set ``gguf_arch`` and
``hf_architecture``, implement :meth:`ReverseArch.config_kwargs` (and :meth:`ReverseArch.to_hf` for layout
changes), decorate it with :func:`gguf_factory.convert.from_gguf.archs.register` and import it in
``archs/__init__.py``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import numpy as np

from ...errors import ModelError
from .source import GGUFSource

log = logging.getLogger(__name__)

KL = gguf.Keys.LLM
KA = gguf.Keys.Attention
KR = gguf.Keys.Rope
KT = gguf.Keys.Tokenizer
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"


@dataclass
class PlannedWeight:
    """One transformers parameter: its name, shape, and how to make it from the GGUF."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class ReverseArch(ABC):
    """Base class of a GGUF architecture -> transformers architecture plug-in."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    hf_architecture: ClassVar[str]
    model_type: ClassVar[str]  # transformers' config ``model_type``
    # GGUF tensors read into the config rather than the weights (e.g. rope frequency factors).
    config_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, src: GGUFSource):
        self.src = src
        self.where = str(src.path)
        if TOKEN_EMBD not in src.tensors:
            raise ModelError(f"{self.where} has no token embedding ({TOKEN_EMBD})")
        self.n_vocab, self.n_embd_rows = src.shape(TOKEN_EMBD)
        self.n_layer = self.integer(KL.BLOCK_COUNT)
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layer)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # ---- key helpers ----------------------------------------------------------------------------

    def key(self, template: str) -> str:
        return template.format(arch=self.src.arch)

    def integer(self, template: str, default: Any = ...) -> Any:
        return self.src.integer(self.key(template), default)

    def number(self, template: str, default: Any = ...) -> Any:
        return self.src.number(self.key(template), default)

    def uniform(self, template: str, default: Any = ...) -> Any:
        """An integer key llama.cpp also accepts per layer; per-layer values that differ are refused."""
        value = self.src.int_or_ints(self.key(template), default)
        if isinstance(value, list):
            raise ModelError(
                f"{self.where}: {self.key(template)} differs between layers ({value[:6]}...), which "
                f"transformers' {self.hf_architecture} cannot express"
            )
        return value

    def head_geometry(self) -> tuple[int, int, int]:
        """(embedding_length, head_count, head size), checked: the embedding width fits token_embd.weight,
        key and value heads have one size (``key_length``, default embedding / heads), and rope turns the
        whole head (what the transformers classes of these plug-ins compute)."""
        n_embd = self.integer(KL.EMBEDDING_LENGTH)
        n_head = self.uniform(KA.HEAD_COUNT)
        if n_embd != self.n_embd_rows or n_head <= 0:
            raise ModelError(
                f"{self.where}: embedding_length {n_embd} / head_count {n_head} do not fit token_embd.weight "
                f"of width {self.n_embd_rows}"
            )
        head_dim = self.integer(KA.KEY_LENGTH, n_embd // n_head)
        if self.integer(KA.VALUE_LENGTH, head_dim) != head_dim:
            raise self.refuse("value heads of another size than key heads")
        if self.integer(KR.DIMENSION_COUNT, head_dim) != head_dim:
            raise self.refuse(f"rotary embedding on part of each head ({self.key(KR.DIMENSION_COUNT)})")
        return n_embd, n_head, head_dim

    def refuse(self, what: str) -> ModelError:
        return ModelError(f"{self.where}: {what}; {self.hf_architecture} cannot express it")

    def has_tensor(self, name: str) -> bool:
        return name in self.src.tensors

    @property
    def tied(self) -> bool:
        """No output matrix: llama.cpp multiplies by the token embedding, transformers ties the two."""
        return OUTPUT not in self.src.tensors

    def special_token_ids(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for kind, key in (("bos", KT.BOS_ID), ("eos", KT.EOS_ID), ("pad", KT.PAD_ID)):
            tid = self.src.integer(key, None)
            out[f"{kind}_token_id"] = tid if tid is not None and 0 <= tid < self.n_vocab else None
        return out

    # ---- hooks ----------------------------------------------------------------------------------

    @abstractmethod
    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the transformers config class (hyper-parameters from the GGUF)."""

    def config_class(self) -> Any:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type]

    def to_hf(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        """Undo the converter's layout change of one tensor (identity by default)."""
        return data

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor a transformers parameter comes from (gguf-py's name table)."""
        return self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    # ---- building -------------------------------------------------------------------------------

    def build_config(self, dtype: str) -> Any:
        kwargs = {
            "vocab_size": self.n_vocab,
            "tie_word_embeddings": self.tied,
            **self.special_token_ids(),
            **self.config_kwargs(),
        }
        try:
            config = self.config_class()(**kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(
                f"{self.where}: the hyper-parameters do not make a valid {self.hf_architecture}: {e}"
            ) from None
        config.architectures = [self.hf_architecture]
        config.dtype = dtype
        return config

    def plan(self, config: Any) -> list[PlannedWeight]:
        """One entry per transformers parameter, checked against the GGUF's tensors and shapes."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = dict(model.named_parameters())
        buffers = {n for n, _ in model.named_buffers() if n in model.state_dict()}
        if buffers:
            raise ModelError(
                f"{self.hf_architecture} has persistent buffers {sorted(buffers)[:3]}: not supported"
            )
        used: dict[str, str] = {}
        planned = [self._plan_one(hf_name, tuple(p.shape), used) for hf_name, p in params.items()]
        self._check_all_used(used)
        return planned

    def _gguf_tensor_for(self, key_name: str, needed_for: str, used: dict[str, str]) -> str:
        """The GGUF tensor gguf-py's table names for ``key_name``, present and not yet used (``used``: GGUF
        tensor -> what it feeds), recorded as feeding ``needed_for``."""
        gguf_name = self.gguf_name(key_name)
        if gguf_name is None:
            raise ModelError(
                f"{self.where}: no GGUF tensor name is known for {self.hf_architecture}'s {needed_for}"
            )
        if gguf_name not in self.src.tensors:
            raise ModelError(
                f"{self.where} lacks the tensor {gguf_name}, which {self.hf_architecture} needs for "
                f"{needed_for}"
            )
        if gguf_name in used:
            raise ModelError(
                f"{self.where}: tensor {gguf_name} would feed both {used[gguf_name]} and {needed_for}"
            )
        used[gguf_name] = needed_for
        return gguf_name

    def _plan_one(self, hf_name: str, shape: tuple[int, ...], used: dict[str, str]) -> PlannedWeight:
        """A parameter that is one whole GGUF tensor."""
        gguf_name = self._gguf_tensor_for(hf_name, hf_name, used)
        got = self.hf_shape(gguf_name, hf_name, self.src.shape(gguf_name))
        if got != shape:
            raise ModelError(
                f"{self.where}: tensor {gguf_name} has shape {list(self.src.shape(gguf_name))}, but "
                f"{self.hf_architecture}'s {hf_name} needs {list(shape)} with these hyper-parameters"
            )
        return PlannedWeight(hf_name, gguf_name, shape, self._producer(gguf_name, hf_name, shape))

    def _check_all_used(self, used: dict[str, str]) -> None:
        unused = sorted(set(self.src.tensors) - set(used) - set(self.config_tensors))
        if unused:
            raise ModelError(
                f"{self.where}: tensor(s) {', '.join(unused[:4])} have no place in {self.hf_architecture} "
                "(an architecture variant this rebuild does not know); refusing to drop weights"
            )

    def hf_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape :meth:`to_hf` gives a GGUF tensor of ``shape`` (e.g. transposed)."""
        return shape

    def _producer(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            data = self.to_hf(gguf_name, hf_name, self.src.load(gguf_name))
            if tuple(data.shape) != shape:  # a plug-in bug, not a file problem
                raise ModelError(f"{gguf_name}: shape {data.shape} after conversion, expected {shape}")
            return data

        return produce

    # ---- rope -----------------------------------------------------------------------------------

    def rope_parameters(self, theta_default: float = 10000.0) -> dict[str, Any]:
        """transformers' ``rope_parameters`` from the GGUF's rope base and linear / YaRN scaling keys."""
        theta = self.number(KR.FREQ_BASE, theta_default)
        kind = self.src.string(self.key(KR.SCALING_TYPE), "none")
        if kind == "none":
            return {"rope_type": "default", "rope_theta": theta}
        factor = self.number(KR.SCALING_FACTOR, None)
        if factor is None or factor <= 0:
            raise ModelError(
                f"{self.where}: rope scaling {kind!r} without a valid {self.key(KR.SCALING_FACTOR)}"
            )
        if kind == "linear":
            return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
        if kind == "yarn":
            params: dict[str, Any] = {"rope_type": "yarn", "rope_theta": theta, "factor": factor}
            orig = self.integer(KR.SCALING_ORIG_CTX_LEN, None)
            if orig:
                params["original_max_position_embeddings"] = orig
            for key, name in (
                (KR.SCALING_YARN_ATTN_FACTOR, "attention_factor"),
                (KR.SCALING_YARN_BETA_FAST, "beta_fast"),
                (KR.SCALING_YARN_BETA_SLOW, "beta_slow"),
            ):
                value = self.number(key, None)
                if value is not None:
                    params[name] = value
            return params
        raise self.refuse(f"rope scaling type {kind!r} ({self.key(KR.SCALING_TYPE)})")
