"""The architecture plug-in base class and the streaming weight readers.

A converter turns one Hugging Face model folder into GGUF key/values and a *plan* of tensors. The plan
is computed from shapes only (no tensor data is read), so the GGUF header, key/values and tensor infos
can be written first; each tensor is then loaded, converted and written one at a time and dropped.

Adding an architecture: subclass :class:`ArchConverter` in ``archs/<name>.py``, set
``hf_architectures`` and ``gguf_arch``, implement :meth:`ArchConverter.set_gguf_parameters` (most write
:meth:`ArchConverter.write_common_hparams` and a few keys of their own; and
:meth:`ArchConverter.modify_tensor` if weights need a layout change), decorate it with
:func:`gguf_factory.convert.archs.register`, and import it in ``archs/__init__.py``. Tensor names come from
gguf-py's ``TensorNameMap`` for the architecture; ``stack_experts`` stacks per-expert MoE weights into
llama.cpp's 3-D expert tensors, ``output_required`` writes ``output.weight`` for tied embeddings where
llama.cpp's graph needs it. Add the family to :mod:`gguf_factory.convert.families` with a fixture in
tests/model_builders.py: its parity test then runs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ..errors import ConversionError, ModelError

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
# Tensors with at least this many elements are converted and written in row chunks when they can be.
STREAM_MIN_ELEMENTS = 1 << 23

# outtype -> (main tensor type for 2-D weights, general.file_type)
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


# ---------------------------------------------------------------------------------------------------
# Weight readers: names and shapes without loading data; one tensor at a time as float32 numpy.
# ---------------------------------------------------------------------------------------------------


class WeightSource(ABC):
    """Read-only view over a checkpoint's tensors."""

    files: list[Path]

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 numpy array (a fresh copy the caller may modify)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __contains__(self, name: str) -> bool:
        return name in self.names()


def _to_numpy_f32(t: Any) -> np.ndarray:
    import torch

    if not t.dtype.is_floating_point:
        raise ConversionError(f"unexpected non-float tensor of type {t.dtype}")
    return t.detach().to(torch.float32).numpy().copy()


# safetensors dtype -> (numpy storage dtype, how to get float32 from the raw values)
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # the top 16 bits of a float32
    "F64": np.dtype("<f8"),
}


def _raw_to_f32(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return raw.astype(np.float32)


class SafetensorsSource(WeightSource):
    """One or several ``.safetensors`` files, read tensor by tensor (or row range by row range) without torch.

    The format is an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
    ``data_offsets`` per tensor) and the raw little-endian data. The header is validated against the file
    size up front, so a truncated download is reported before anything is written. Data is read with
    ``readinto`` into fresh buffers (no memory map: the process's resident memory stays near one tensor,
    or one chunk of the largest tensors, instead of growing with every page of the file it has touched).
    """

    def __init__(self, files: list[Path]):
        self.files = files
        # name -> (file, dtype, shape, absolute data offset)
        self._info: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        self._fh: dict[Path, Any] = {}
        for f in files:
            self._read_header(f)

    def _read_header(self, f: Path) -> None:
        try:
            size = f.stat().st_size
            fh = open(f, "rb")  # noqa: SIM115 - kept open until close()
        except OSError as e:
            raise ModelError(f"cannot read weights file {f}: {e}") from e
        self._fh[f] = fh
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"weights file {f} is truncated or not safetensors ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise ModelError(f"weights file {f} is truncated or not safetensors (header of {n} bytes)")
        try:
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"weights file {f} has a corrupt safetensors header: {e}") from e
        data_start = 8 + n
        data_end = data_start
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ModelError(f"weights file {f}: bad header entry for {name!r}: {e}") from e
            if dtype in _ST_DTYPES and (end - begin) != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
                raise ModelError(
                    f"weights file {f}: {name!r} has {end - begin} bytes for shape {list(shape)}"
                )
            self._info[name] = (f, dtype, shape, data_start + begin)
            data_end = max(data_end, data_start + end)
        if data_end > size:
            raise ModelError(
                f"weights file {f} is truncated: its header describes {data_end} bytes, the file has {size} "
                "(an interrupted download or copy?)"
            )

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][2]

    def _read(self, name: str, first: int, count: int) -> np.ndarray:
        """Elements ``[first, first + count)`` of the flattened tensor, as float32."""
        f, dtype, _, offset = self._info[name]
        if dtype not in _ST_DTYPES:
            raise ConversionError(
                f"tensor {name} in {f} has unsupported type {dtype} (expected a float type)"
            )
        np_dtype = _ST_DTYPES[dtype]
        raw = np.empty(count, dtype=np_dtype)
        fh = self._fh[f]
        fh.seek(offset + first * np_dtype.itemsize)
        if fh.readinto(memoryview(raw).cast("B")) != raw.nbytes:
            raise ModelError(f"weights file {f} is truncated inside tensor {name}")
        return _raw_to_f32(raw, dtype)

    def load(self, name: str) -> np.ndarray:
        shape = self._info[name][2]
        return self._read(name, 0, math.prod(shape)).reshape(shape)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (along the first axis) as float32."""
        shape = self._info[name][2]
        row = math.prod(shape[1:])
        return self._read(name, start * row, (stop - start) * row).reshape((stop - start, *shape[1:]))

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()


def _torch_load_reason(e: Exception) -> str:
    """torch.load's (multi-paragraph) refusal as one line: the global the pickle wanted, if it names one."""
    text = str(e)
    m = re.search(r"[Uu]nsupported (?:GLOBAL|global):? *(?:GLOBAL )?([\w.]+)", text)
    if m:
        return f"the pickle needs {m.group(1)}, i.e. running code from the file, which is refused"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class TorchBinSource(WeightSource):
    """PyTorch ``.bin`` checkpoints, read only with ``torch.load(weights_only=True)`` (memory-mapped)."""

    def __init__(self, files: list[Path]):
        import torch

        self.files = files
        self._tensors: dict[str, Any] = {}
        for f in files:
            try:
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConversionError(
                    f"cannot load {f} safely with torch.load(weights_only=True): {_torch_load_reason(e)}. "
                    "Re-save the model as safetensors (model.save_pretrained(..., safe_serialization=True))."
                ) from e
            if not isinstance(sd, dict):
                raise ConversionError(f"{f} does not hold a state dict (got {type(sd).__name__})")
            for k, v in sd.items():
                if hasattr(v, "shape") and hasattr(v, "dtype"):
                    self._tensors[k] = v

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        return _to_numpy_f32(self._tensors[name])

    def close(self) -> None:
        self._tensors.clear()


def _index_files(model_dir: Path, index_name: str) -> list[Path]:
    index_path = model_dir / index_name
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        names = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ModelError(f"cannot read weight index {index_path}: {e}") from e
    files = [model_dir / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"weight shard(s) listed in {index_path} are missing: {', '.join(missing)}")
    return files


def open_weights(model_dir: Path) -> WeightSource:
    """Find the checkpoint's weights: safetensors (single or sharded) first, then PyTorch ``.bin``."""
    if (model_dir / "model.safetensors.index.json").is_file():
        return SafetensorsSource(_index_files(model_dir, "model.safetensors.index.json"))
    if (model_dir / "model.safetensors").is_file():
        return SafetensorsSource([model_dir / "model.safetensors"])
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        return SafetensorsSource(st)
    if (model_dir / "pytorch_model.bin.index.json").is_file():
        return TorchBinSource(_index_files(model_dir, "pytorch_model.bin.index.json"))
    if (model_dir / "pytorch_model.bin").is_file():
        return TorchBinSource([model_dir / "pytorch_model.bin"])
    raise ModelError(
        f"no model weights in {model_dir}: expected model.safetensors, model.safetensors.index.json "
        "(sharded) or pytorch_model.bin"
    )


# ---------------------------------------------------------------------------------------------------
# Rope parameters (transformers 5 ``rope_parameters`` or 4.x keys)
# ---------------------------------------------------------------------------------------------------


def rope_config(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling parameters) from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/
    ``rope_scaling``; the scaling dict has a ``rope_type`` key (``default`` when unscaled)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), scaling


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3.x rope scaling, as llama.cpp's ``rope_freqs`` tensor wants.

    transformers scales each inverse frequency by ``s`` (1 for high frequencies, 1/factor for low ones,
    interpolated in between); llama.cpp divides the frequency by the stored value, i.e. stores ``1/s``.
    """
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    scale = np.where(
        wavelen < high_wavelen,
        1.0,
        np.where(wavelen > low_wavelen, 1.0 / factor, (1 - smooth) / factor + smooth),
    )
    return (1.0 / scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# The plan and the converter base class
# ---------------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, numpy-order shape, storage type and how to produce its float32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]
    source: str | None = None  # the HF tensor name, for messages
    # Rows [start, stop) as float32, already modified, for tensors large enough to stream in chunks (set
    # only where the architecture leaves the tensor unchanged and the reader can read row ranges).
    produce_rows: Callable[[int, int], np.ndarray] | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * size

    def data(self) -> np.ndarray:
        """Load and convert to the storage type (bytes for block/bf16 types)."""
        arr = self.produce()
        if tuple(arr.shape) != self.shape:
            raise ConversionError(
                f"tensor {self.source or self.name} has shape {arr.shape} after conversion, "
                f"planned {self.shape}"
            )
        return self._store(arr)

    def _store(self, arr: np.ndarray) -> np.ndarray:
        if self.qtype == QT.F32:
            return arr.astype(np.float32, copy=False)
        if self.qtype == QT.F16:
            return arr.astype(np.float16)
        return gguf.quants.quantize(arr.astype(np.float32, copy=False), self.qtype)

    def chunks(self, max_elements: int = 1 << 22) -> Iterator[np.ndarray]:
        """The stored data in row chunks of about ``max_elements`` (one piece if it cannot stream)."""
        if self.produce_rows is None:
            yield self.data()
            return
        rows = self.shape[0]
        step = max(1, max_elements // max(1, self.n_elements // rows))
        for start in range(0, rows, step):
            arr = self.produce_rows(start, min(rows, start + step))
            yield self._store(arr)
            del arr


class ArchConverter(ABC):
    """Base class of an architecture plug-in (HF ``config.architectures`` name -> llama.cpp arch)."""

    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # HF tensors that carry no weights llama.cpp needs (recomputed buffers).
    skip_suffixes: ClassVar[tuple[str, ...]] = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")
    # Mixture of experts: per-expert HF tensors (``...experts.<i>.<name>.weight``) are stacked into one 3-D
    # GGUF tensor per name (``...experts.<name>``, which gguf.TensorNameMap knows), one expert at a time.
    stack_experts: ClassVar[bool] = False
    # The architecture's llama.cpp graph reads output.weight even when the embeddings are tied: write a copy.
    output_required: ClassVar[bool] = False

    def __init__(self, model_dir: Path, config: dict[str, Any], weights: WeightSource, outtype: str):
        self.model_dir = model_dir
        self.config = config
        self.weights = weights
        self.outtype = outtype
        self.main_qtype, self.file_type = OUTTYPES[outtype]
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)

    # ---- config helpers -------------------------------------------------------------------------

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def block_count(self) -> int:
        return int(self.hparam("num_hidden_layers", "n_layer", "num_layers"))

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def hparam(self, *keys: str, default: Any = ...) -> Any:
        """The first of ``keys`` present (and not null) in config.json, else ``default`` or a ModelError."""
        for k in keys:
            if self.config.get(k) is not None:
                return self.config[k]
        if default is not ...:
            return default
        raise ModelError(f"config.json in {self.model_dir} lacks {' / '.join(keys)}")

    # ---- the hyperparameters most decoders share -------------------------------------------------

    @cached_property
    def n_embd(self) -> int:
        return int(self.hparam("hidden_size", "n_embd", "d_model"))

    @cached_property
    def n_head(self) -> int:
        return int(self.hparam("num_attention_heads", "n_head"))

    @cached_property
    def n_head_kv(self) -> int:
        return int(self.hparam("num_key_value_heads", "num_kv_heads", default=self.n_head))

    @cached_property
    def head_dim(self) -> int:
        return int(self.hparam("head_dim", default=self.n_embd // self.n_head))

    @cached_property
    def rope(self) -> tuple[float, dict[str, Any]]:
        """(rope theta, scaling parameters with a ``rope_type``), see :func:`rope_config`."""
        return rope_config(self.config)

    @cached_property
    def rope_dims(self) -> int:
        """Rotary dimensions per head: all of them, or the config's partial rotary fraction."""
        scaling = self.rope[1]
        frac = scaling.get("partial_rotary_factor")
        if frac is None:
            frac = self.hparam("partial_rotary_factor", "rotary_pct", "rope_pct", default=1.0)
        return int(float(frac) * self.head_dim)

    def write_common_hparams(self, writer: gguf.GGUFWriter, *, norm: str = "rms") -> None:
        """The keys every decoder writes: context, widths, layers, heads (key/value length when head_dim
        is not hidden / heads), rope dimensions, base and scaling, the norm epsilon (``rms`` or ``layer``)."""
        writer.add_context_length(int(self.hparam("max_position_embeddings", "n_positions", "n_ctx")))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.block_count)
        n_ff = self.hparam("intermediate_size", "n_inner", "ffn_hidden_size", default=None)
        writer.add_feed_forward_length(int(n_ff) if n_ff is not None else 4 * self.n_embd)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        if self.head_dim != self.n_embd // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_rope_dimension_count(self.rope_dims)
        writer.add_rope_freq_base(self.rope[0])
        if norm == "rms":
            writer.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps", "norm_eps", default=1e-6)))
        else:
            # StarCoder2's config calls it norm_epsilon
            eps = self.hparam(
                "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps", default=1e-5
            )
            writer.add_layer_norm_eps(float(eps))
        self.write_rope_scaling(writer)

    def write_rope_scaling(
        self, writer: gguf.GGUFWriter, *, allowed: tuple[str, ...] = ("linear", "yarn")
    ) -> None:
        """linear and YaRN rope scaling as llama.cpp keys; ``llama3`` is the caller's (a tensor); anything
        else is refused rather than written unscaled."""
        kind, scaling = self.rope[1]["rope_type"], self.rope[1]
        if kind == "default" or kind == "llama3" and "llama3" in allowed:
            return
        if kind not in allowed:
            raise ConversionError(
                f"{self.model_dir}/config.json: rope scaling {kind!r} is not supported for llama.cpp's "
                f"{self.arch_name} (supported: {', '.join(allowed)})"
            )
        writer.add_rope_scaling_type(
            gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN
        )
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn":
            orig = scaling.get("original_max_position_embeddings") or self.config.get(
                "original_max_position_embeddings"
            )
            if orig:
                writer.add_rope_scaling_orig_ctx_len(int(orig))
            for key, add in (
                ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
            ):
                if scaling.get(key) is not None:
                    add(float(scaling[key]))

    def write_expert_hparams(self, writer: gguf.GGUFWriter, *, norm_topk: bool | None) -> None:
        """Expert counts and widths. ``norm_topk``: whether llama.cpp's graph for this architecture
        renormalizes the chosen experts' weights (no GGUF key there), checked against norm_topk_prob."""
        writer.add_expert_count(int(self.hparam("num_local_experts", "num_experts")))
        writer.add_expert_used_count(int(self.hparam("num_experts_per_tok")))
        n_ff_exp = self.hparam("moe_intermediate_size", default=None)
        if n_ff_exp is not None:
            writer.add_expert_feed_forward_length(int(n_ff_exp))
        n_ff_shexp = self.hparam("shared_expert_intermediate_size", default=None)
        if n_ff_shexp is not None:
            writer.add_expert_shared_feed_forward_length(int(n_ff_shexp))
        cfg_norm = self.config.get("norm_topk_prob")
        if norm_topk is not None and cfg_norm is not None and bool(cfg_norm) != norm_topk:
            raise ConversionError(
                f"{self.model_dir}/config.json: norm_topk_prob={str(bool(cfg_norm)).lower()} but llama.cpp's "
                f"{self.arch_name} always uses {str(norm_topk).lower()}"
            )

    # ---- hooks ----------------------------------------------------------------------------------

    @abstractmethod
    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        """Write the architecture's hyperparameters (``{arch}.*`` keys)."""

    def map_tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor, or None to skip it. Unknown names are an error."""
        if hf_name.endswith(self.skip_suffixes):
            return None
        if self.tie_word_embeddings and hf_name in ("lm_head.weight", "output.weight"):
            return None  # llama.cpp reuses token_embd when output.weight is absent
        new = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConversionError(
                f"cannot map tensor {hf_name!r} of {self.model_dir} to a llama.cpp {self.arch_name} tensor"
            )
        return new

    def modify_tensor(self, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        """Change a tensor's layout for llama.cpp (e.g. LLaMA's Q/K row permutation). Identity by default."""
        return data

    def tensor_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape :meth:`modify_tensor` gives a tensor of HF shape ``shape`` (e.g. transposed)."""
        return shape

    def extra_tensors(self) -> list[PlannedTensor]:
        """Tensors computed from the config rather than read (e.g. rope frequency factors)."""
        return []

    def tensor_qtype(self, gguf_name: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        """1-D tensors (norms, biases) stay F32; 2-D weights take the outtype if their rows fit its blocks."""
        if len(shape) < 2:
            return QT.F32
        qtype = self.main_qtype
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block != 0:
            log.warning("%s: row size %d is not a multiple of %d, stored as F16", gguf_name, shape[-1], block)
            return QT.F16
        return qtype

    # ---- the plan -------------------------------------------------------------------------------

    def tensor_plan(self) -> list[PlannedTensor]:
        plan: list[PlannedTensor] = []
        seen: dict[str, str] = {}
        names, expert_groups = self._split_expert_tensors(self.weights.names())
        for hf_name in names:
            gguf_name = self.map_tensor_name(hf_name)
            if gguf_name is None:
                continue
            if gguf_name in seen:
                raise ConversionError(
                    f"tensors {seen[gguf_name]!r} and {hf_name!r} both map to {gguf_name!r}"
                )
            seen[gguf_name] = hf_name
            shape = self.tensor_shape(gguf_name, hf_name, self.weights.shape(hf_name))
            plan.append(
                PlannedTensor(
                    name=gguf_name,
                    shape=shape,
                    qtype=self.tensor_qtype(gguf_name, shape),
                    produce=self._producer(gguf_name, hf_name),
                    source=hf_name,
                    produce_rows=self._row_producer(gguf_name, hf_name, shape),
                )
            )
        for merged, members in expert_groups.items():
            plan.append(self._stacked_expert_tensor(merged, members, seen))
        plan.extend(self._tied_output_copy(plan))
        plan.extend(self.extra_tensors())
        self.check_plan(plan)  # the architecture's own checks first: their messages are the most specific
        self.check_shapes(plan)
        return plan

    _EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<xid>\d+)\.(?P<tail>.+)\.weight$")

    def _split_expert_tensors(self, names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
        """(tensors that are not per-expert, merged HF name -> the per-expert tensors in expert order)."""
        if not self.stack_experts:
            return names, {}
        rest: list[str] = []
        groups: dict[str, dict[int, str]] = {}
        for n in names:
            m = self._EXPERT.match(n)
            if m:
                groups.setdefault(f"{m['head']}.{m['tail']}.weight", {})[int(m["xid"])] = n
            else:
                rest.append(n)
        n_expert = self.hparam("num_local_experts", "num_experts", default=None)
        ordered: dict[str, list[str]] = {}
        for merged, by_id in groups.items():
            if sorted(by_id) != list(range(len(by_id))) or (n_expert is not None and len(by_id) != n_expert):
                raise ModelError(
                    f"the weights in {self.model_dir} have experts {sorted(by_id)[:8]} for {merged}, but "
                    f"config.json says num_experts = {n_expert}"
                )
            ordered[merged] = [by_id[i] for i in range(len(by_id))]
        return rest, ordered

    def _stacked_expert_tensor(self, merged: str, members: list[str], seen: dict[str, str]) -> PlannedTensor:
        gguf_name = self.map_tensor_name(merged)
        if gguf_name is None:
            raise ConversionError(f"{self.model_dir}: expert tensors {merged} have no llama.cpp name")
        shapes = {tuple(self.weights.shape(m)) for m in members}
        if len(shapes) != 1:
            raise ModelError(
                f"{self.model_dir}: the experts of {merged} have different shapes {sorted(shapes)}"
            )
        seen[gguf_name] = merged
        shape = (len(members), *self.tensor_shape(gguf_name, members[0], shapes.pop()))

        def rows(start: int, stop: int) -> np.ndarray:
            return np.stack(
                [self.modify_tensor(gguf_name, m, self.weights.load(m)) for m in members[start:stop]]
            )

        return PlannedTensor(
            name=gguf_name,
            shape=shape,
            qtype=self.tensor_qtype(gguf_name, shape),
            produce=lambda: rows(0, len(members)),
            source=merged,
            produce_rows=rows,
        )

    def _tied_output_copy(self, plan: list[PlannedTensor]) -> list[PlannedTensor]:
        out = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
        embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        if not self.output_required or any(p.name == out for p in plan):
            return []
        src = next((p for p in plan if p.name == embd), None)
        if src is None:
            return []
        return [
            PlannedTensor(out, src.shape, src.qtype, src.produce, src.source, produce_rows=src.produce_rows)
        ]

    def check_plan(self, plan: list[PlannedTensor]) -> None:
        names = {p.name for p in plan}
        embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        if embd not in names:
            raise ModelError(f"the weights in {self.model_dir} have no token embedding ({embd})")

    def check_shapes(self, plan: list[PlannedTensor]) -> None:
        """Compare the weights' shapes with config.json (vocabulary, width, layers, heads, FFN size), so
        a config that does not belong to the weights is refused here rather than by llama.cpp at load."""
        cfg = self.config
        where = f"{self.model_dir}/config.json"

        def want(key_names: tuple[str, ...], expected: int | None, p: PlannedTensor, dim: int) -> None:
            if expected is not None and p.shape[dim] != expected:
                raise ModelError(
                    f"{where} says {' / '.join(key_names)} = {expected} but the weight {p.source or p.name} "
                    f"has shape {list(p.shape)}: the config does not match the weights"
                )

        def get(*keys: str) -> int | None:
            v = next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), None)
            return int(v) if v is not None else None

        n_embd = get("hidden_size", "n_embd", "d_model")
        vocab = get("vocab_size")
        n_head = get("num_attention_heads", "n_head")
        n_kv = get("num_key_value_heads") or n_head
        head_dim = get("head_dim") or (n_embd // n_head if n_embd and n_head else None)
        n_ff = get("intermediate_size", "n_inner")
        blocks: set[int] = set()
        for p in plan:
            m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", p.name)
            if p.name == "token_embd.weight":
                want(("vocab_size",), vocab, p, 0)
                want(("hidden_size",), n_embd, p, 1)
            if not m:
                continue
            blocks.add(int(m.group(1)))
            kind = m.group(2)
            if len(p.shape) != 2:
                continue
            if kind in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
                want(("hidden_size",), n_embd, p, 1)
            if kind == "attn_q" and head_dim and n_head:
                want(("num_attention_heads", "head_dim"), n_head * head_dim, p, 0)
            if kind in ("attn_k", "attn_v") and head_dim and n_kv:
                want(("num_key_value_heads", "head_dim"), n_kv * head_dim, p, 0)
            if kind == "ffn_down":
                want(("hidden_size",), n_embd, p, 0)
                want(("intermediate_size",), n_ff, p, 1)
        n_layer = self.block_count
        extra = sorted(b for b in blocks if b >= n_layer)
        missing = sorted(set(range(n_layer)) - blocks)
        if extra or missing:
            raise ModelError(
                f"{where} says num_hidden_layers = {n_layer} but the weights have "
                + (f"layers up to {max(blocks)}" if extra else f"no tensors for layer(s) {missing[:5]}")
                + ": the config does not match the weights"
            )

    def _producer(self, gguf_name: str, hf_name: str) -> Callable[[], np.ndarray]:
        return lambda: self.modify_tensor(gguf_name, hf_name, self.weights.load(hf_name))

    def _row_producer(
        self, gguf_name: str, hf_name: str, shape: tuple[int, ...]
    ) -> Callable[[int, int], np.ndarray] | None:
        """A row-range reader for a large tensor that :meth:`modify_tensor` leaves as it is, else None.

        Whether the architecture changes the tensor is asked of :meth:`modify_tensor` itself, with a
        read-only all-zero array of the tensor's shape (calloc'd: it costs no resident memory until
        touched): only a transform that returns that very array unchanged lets the tensor stream.
        """
        load_rows = getattr(self.weights, "load_rows", None)
        if load_rows is None or math.prod(shape) < STREAM_MIN_ELEMENTS or len(shape) < 2:
            return None
        if tuple(self.weights.shape(hf_name)) != tuple(shape):
            return None
        probe = np.zeros(shape, dtype=np.float32)
        probe.flags.writeable = False
        try:
            same = self.modify_tensor(gguf_name, hf_name, probe) is probe
        except (ValueError, TypeError):  # e.g. an in-place change of the read-only probe
            same = False
        del probe
        return (lambda start, stop: load_rows(hf_name, start, stop)) if same else None

    def vocab_rows(self, plan: list[PlannedTensor]) -> int:
        """The number of rows in the token embedding: the GGUF token list must have exactly this many."""
        embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        return next(p.shape[0] for p in plan if p.name == embd)
