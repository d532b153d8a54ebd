"""Auto-quant: one type per tensor, chosen to meet a size or quality budget with the lowest KL divergence,
from sensitivities measured with llama.cpp on the user's own conversations.

How it decides (measured, nothing assumed about the architecture):

0. **What is possible.** llama.cpp's quantizer is asked, in a dry run per candidate type (nothing written),
   which type it would write for every tensor: a row width that is not a multiple of a K-quant's 256-value
   block falls back to a 32-block type. From those types and the tensors' shapes come the smallest and the
   largest file the candidates can make (:func:`size_bounds`), before anything is measured: a size budget
   below the smallest is refused at once, naming it.
1. **Costs.** Each candidate type is applied to every tensor at once (a pure quantization; tensors whose
   written type an earlier candidate already produced are written as Q8_0 instead, which costs nothing to
   make). That file tells, per tensor, the type llama.cpp really wrote, its exact size, and its quantization
   error ``e_i(T) = sum_c w_c * (W - W_hat)^2`` of the dequantized weights against the input's, each input
   column weighted by the importance matrix when there is one (the expected squared error of the tensor's
   output). The fast mode sums it over at most 256 evenly spaced rows and scales it to the whole tensor.
   Each of those files is also scored as a whole on the calibration conversations, and a candidate that
   another beats at no more bytes is left out: the weight error cannot see llama.cpp's arithmetic (on
   SmolLM2-135M every tensor in Q5_1 measures about twice Q5_0's KLD, although its weight error is lower).
2. **Sensitivity.** Starting from every tensor at the top candidate (Q8_0), a group of tensors is lowered
   to its smallest options and the KL divergence against the input model is measured on calibration
   conversations; every member gets the group's KLD per unit of error, ``s = dKLD / sum_i de_i``.
   An assignment's predicted KLD is ``KLD(top) + sum_i s_i * (e_i(t_i) - e_i(top))``: quantization noise of
   different tensors is independent, so their contributions add. Members of a group share ``s``, not their
   error: each keeps its own measured ``e_i(T)`` for every type, which carries what differs between them
   (size, importance-weighted activations, how well a type fits its values).

   * ``mode="fast"`` (default): a group is one role (``attn_q``, ``attn_k``, … ``ffn_down``; tensors outside
     the blocks, such as ``token_embd``, each alone) within one of three bands of consecutive layers
     (early, middle, late), probed on the first 16 calibration conversations. A 30-layer Llama takes
     7 x 3 + 1 = 22 probes instead of 211. An automatic importance matrix reads at most 16k training
     tokens.
   * ``mode="exhaustive"``: one probe per tensor, on all calibration conversations, errors over all rows,
     the importance matrix from up to 100k training tokens.
3. **Choice.** A multiple-choice knapsack picks one option per tensor: Lagrangian relaxation (bisection on
   the price of a byte), then greedy moves into whatever budget is left.
4. **Proof.** The file is quantized with one tensor-type override per tensor, then measured on all the
   calibration conversations: its size is exact, its KLD measured. When the measurement misses the budget,
   the budget is tightened and solved again; when it cannot be met, nothing is written. A size budget's
   mixture must also beat llama.cpp's largest preset within it (built with the same importance matrix,
   measured the same way), which is written instead when it measures lower.

Calibration uses the dataset's ``val.jsonl`` (not ``test.jsonl``, which stays for reports) and, with
``imatrix="auto"``, an importance matrix computed from its ``train.jsonl``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import InputError, QuantizeError
from .files import atomic_write_text, human_size, parse_size, require_file

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
"""Tensor types tried by default: the K-quant ladder, IQ4_XS, and the 32-block types (IQ4_NL, Q5_0) that
keep 4-5 bits for rows too narrow for a 256-value block."""

TOP_TYPE = "Q8_0"
"""Every tensor starts here for the sensitivity probes: near-lossless, and a quantized file type (llama.cpp
applies tensor-type overrides only when the file type is quantized)."""

Mode = Literal["fast", "exhaustive"]
MODES: tuple[Mode, ...] = ("fast", "exhaustive")
FAST_BANDS = 3
"""Fast mode: bands of consecutive layers whose tensors of one role share a probe."""
FAST_PROBE_CONVERSATIONS = 16
"""Fast mode: calibration conversations each probe is measured on (the proof uses all of them)."""
FAST_ERROR_ROWS = 256
"""Fast mode: rows (evenly spaced) the quantization error of a tensor is summed over, then scaled."""
FAST_IMATRIX_TOKENS = 16384
"""Fast mode, ``imatrix="auto"``: training tokens the importance matrix is computed from (at most)."""

# the file type to pure-quantize with to get a tensor type everywhere
_FILE_TYPE_OF = {
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "IQ2_S": "IQ2_S", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
    "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S", "F16": "F16", "BF16": "BF16",
}  # fmt: skip
_ROW_CHUNK = 16384
_FLOAT_NAMES = ("F32", "F16", "BF16")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: the type llama.cpp writes, its bytes, and its weighted error."""

    type: str
    nbytes: int
    error: float


@dataclass
class TensorCosts:
    name: str
    options: list[Option]  # by increasing size, duplicates (same written type) removed
    top: Option
    sensitivity: float = 0.0  # KLD per unit of error
    probe_kld: float | None = None
    """KLD measured by the probe that set the sensitivity (the group's, in fast mode)."""


@dataclass
class AutoQuantResult:
    path: Path
    recipe_path: Path
    input_path: Path
    input_bytes: int
    size_bytes: int
    max_size: int | None
    max_kld: float | None
    kld_mean: float
    """Measured on the calibration conversations."""
    kld_predicted: float
    kld_top: float
    """KLD with every tensor at the top type (the floor the budget is measured against)."""
    top1: float
    calibration_tokens: int
    types: dict[str, str]
    imatrix_path: Path | None
    attempts: int
    probes: int
    seconds: float
    mode: str = "fast"
    probe_tokens: int = 0
    """Scored tokens each sensitivity probe was measured on."""
    evaluated_tokens: int = 0
    """Tokens llama.cpp evaluated to measure the model (references, probes), before any build."""
    imatrix_tokens: int = 0
    """Training tokens the importance matrix was computed from (0: given, or none)."""
    measure_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    stock: dict[str, Any] | None = None
    """The largest llama.cpp preset within ``max_size`` (with the same importance matrix), built and
    measured as the mixture's rival: ``ftype``, ``size_bytes``, ``kld_mean``, ``chosen`` (it measured lower,
    so it was written instead)."""

    @property
    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.types.values()).most_common())

    @property
    def reduction(self) -> float:
        return 1.0 - self.size_bytes / self.input_bytes if self.input_bytes else 0.0


# --------------------------------------------------------------------------------------------- bounds

_DRY_RUN_LINE = re.compile(
    r"^\[\s*\d+/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^(\n]*(?:\((\w+)\))?[ \t]*$", re.M
)


def _dry_run_types(src: Path, ftype: str, threads: int | None, *, pure: bool = True) -> dict[str, str]:
    """Tensor name -> the type llama.cpp would write when quantizing ``src`` to ``ftype`` (``pure``: every
    tensor that type; else the preset's own mixture): its quantizer's dry run (no file written), read from
    the per-tensor report it logs."""
    import llama_cpp
    from llama_cpp import _logger

    from .quantize import QUANT_TYPES

    pieces: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pieces.append(text.decode("utf-8", errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[ftype])
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    params.dry_run = True
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), os.devnull.encode(), ctypes.byref(params))
    finally:  # llama-cpp-python's own callback back in place
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    found = _DRY_RUN_LINE.findall("".join(pieces))
    types = {name: (new or cur).upper() for _n, name, cur, new in found}
    if rc != 0 or not found or len(types) != int(found[0][0]):
        raise QuantizeError(
            f"llama.cpp's dry run of {ftype} on {src} did not report every tensor (return code {rc}, "
            f"{len(types)} reported): run with -v to see its log"
        )
    return types


def _nbytes(type_name: str, n_elements: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return n_elements // block * size


@dataclass(frozen=True)
class SizeBounds:
    """What the candidate types can make of a model, from its shapes and llama.cpp's dry runs alone."""

    input_path: Path
    candidates: tuple[str, ...]
    smallest: int
    """Bytes with every tensor at its smallest option (a lower bound: the written header carries a few
    keys more than the input's, a few hundred bytes)."""
    largest: int
    """Bytes with every tensor at its largest option (same bound)."""
    tensors: int
    """Tensors llama.cpp quantizes (the ones auto-quant chooses a type for)."""
    narrow: int
    """Of them, those whose rows fit no 256-value block type asked for (they fall back to 32-block types)."""
    narrow_floor_bpw: float | None
    """Bits per weight of the smallest type the narrow tensors can take."""
    written: Mapping[str, Mapping[str, str]]
    """Candidate -> tensor -> the type llama.cpp writes for it."""

    def refusal(self, max_size: int) -> str | None:
        """The one-line reason ``max_size`` is impossible, or None when it may be possible."""
        if max_size >= self.smallest:
            return None
        why = ""
        if self.narrow and self.narrow_floor_bpw is not None:
            why = (
                f" ({self.narrow} of {self.tensors} tensors have rows no 256-value block fits: no candidate "
                f"below {self.narrow_floor_bpw:.1f} bits/weight takes them)"
            )
        return (
            f"--max-size {human_size(max_size)} is impossible for {self.input_path.name}: the smallest "
            f"mixture of the candidate types is {human_size(self.smallest)}{why}"
        )


def size_bounds(
    input_path: str | os.PathLike[str],
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    threads: int | None = None,
) -> SizeBounds:
    """The smallest and largest file auto-quant can make of ``input_path`` with ``candidates``, without
    measuring anything (about a second: one llama.cpp dry run per candidate type)."""
    import gguf

    from .doctor.reader import pad, read_gguf
    from .quantize import check_gguf_magic

    src = require_file(input_path, "input GGUF")
    check_gguf_magic(src)
    cands = _candidates(candidates)
    written = {c: _dry_run_types(src, _FILE_TYPE_OF[c], threads) for c in cands}
    g = read_gguf(src)
    align = g.alignment
    smallest = largest = g.data_offset
    n_quant = narrow = 0
    floor: float | None = None
    k_asked = any(_block_of(c) == 256 for c in cands)
    for t in g.tensors:
        types = {written[c].get(t.name, t.type_name) for c in cands}
        sizes = [_nbytes(ty, t.n_elements) for ty in types]
        smallest += pad(min(sizes), align)
        largest += pad(max(sizes), align)
        if all(ty in _FLOAT_NAMES for ty in types):
            continue
        n_quant += 1
        if k_asked and all(_block_of(ty) != 256 for ty in types):
            narrow += 1
            low = min(types, key=lambda ty: _nbytes(ty, t.n_elements))
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[low]]
            bpw = 8 * size / block
            floor = bpw if floor is None else min(floor, bpw)
    return SizeBounds(src, tuple(cands), smallest, largest, n_quant, narrow, floor, written)


STOCK_PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L", "Q3_K_M")
STOCK_PRESETS += ("Q3_K_S", "Q2_K")
"""llama.cpp's own file types: the rivals a size-budgeted mixture must beat (:meth:`AutoQuantizer.build`
tries the largest that fits, by this model's sizes)."""


def stock_size(input_path: Path, ftype: str, threads: int | None = None) -> int:
    """Bytes of ``input_path`` quantized to llama.cpp's preset ``ftype``, from its dry run and the shapes
    (the header is the input's: within a few KB of the written file's)."""
    from .doctor.reader import pad, read_gguf

    written = _dry_run_types(input_path, ftype, threads, pure=False)
    g = read_gguf(input_path)
    return g.data_offset + sum(
        pad(_nbytes(written.get(t.name, t.type_name), t.n_elements), g.alignment) for t in g.tensors
    )


def _block_of(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def _candidates(candidates: Sequence[str]) -> list[str]:
    from .quantize import normalize_tensor_type

    cands = list(dict.fromkeys(normalize_tensor_type(c, "candidate type") for c in candidates))
    if TOP_TYPE not in cands:
        cands.append(TOP_TYPE)
    unknown = [c for c in cands if c not in _FILE_TYPE_OF or c in ("F16", "BF16")]
    if unknown:
        raise InputError(f"candidate type(s) {', '.join(unknown)} not supported by auto-quant")
    return cands


# --------------------------------------------------------------------------------------------- costs


def _float_rows(g: Any, t: Any, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The tensor as float32 rows, in chunks (all rows, or the ``rows`` given, in order)."""
    import gguf

    from .doctor.reader import tensor_data

    raw = tensor_data(g, t)
    if raw is None:
        raise InputError(f"{g.path}: tensor {t.name} lies outside the file")
    width = t.dims[0]
    n_rows = t.n_elements // width
    blocks = np.asarray(raw).reshape(n_rows, t.n_bytes // n_rows)
    if rows is not None:
        blocks = blocks[rows]
    for start in range(0, len(blocks), _ROW_CHUNK):
        chunk = blocks[start : start + _ROW_CHUNK]
        yield gguf.quants.dequantize(chunk, t.type).reshape(len(chunk), width).astype(np.float32)


def _sample_rows(n_rows: int, max_rows: int | None) -> np.ndarray | None:
    if max_rows is None or n_rows <= max_rows:
        return None
    return np.unique(np.linspace(0, n_rows - 1, max_rows).round().astype(np.int64))


def measure_costs(
    input_path: Path,
    pure_files: Mapping[str, Path],
    imatrix: Mapping[str, np.ndarray] | None,
    *,
    max_rows: int | None = None,
) -> tuple[list[TensorCosts], int]:
    """Per quantizable tensor, its options (type written, bytes, weighted error) from the pure files;
    and the bytes that no choice changes (header, norms, padding) in the top type's file.

    ``max_rows``: sum each error over at most that many evenly spaced rows, scaled to all rows (rows are
    quantized independently, so the sample is unbiased). The top type's file comes first in the errors'
    order when present, so a type several files hold is measured from the first."""
    from .doctor.reader import pad, read_gguf

    orig = read_gguf(input_path)
    files = {c: read_gguf(p) for c, p in pure_files.items()}
    top_file = files[TOP_TYPE]
    out: list[TensorCosts] = []
    quantized_bytes = 0
    for t in orig.tensors:
        infos = {}
        for c, g in files.items():
            tq = g.tensor(t.name)
            if tq is None or tq.type is None or tq.n_bytes is None:
                raise QuantizeError(f"llama.cpp's pure quantization of {input_path} lost tensor {t.name}")
            infos[c] = tq
        top_t = infos[TOP_TYPE]
        if top_t.type_name in _FLOAT_NAMES:
            continue  # llama.cpp never quantizes it (norms, 1-D tensors): part of the fixed bytes
        w = imatrix.get(t.name) if imatrix else None
        weights = w.astype(np.float64) if w is not None and w.size == t.dims[0] else None
        n_rows = t.n_elements // t.dims[0]
        rows = _sample_rows(n_rows, max_rows)
        scale = n_rows / len(rows) if rows is not None else 1.0
        ref: list[np.ndarray] | None = None
        per_type: dict[str, Option] = {}
        for c in sorted(files, key=lambda c: c != TOP_TYPE):
            tq, g = infos[c], files[c]
            if tq.type_name in _FLOAT_NAMES or tq.type_name in per_type:
                continue
            if ref is None:
                ref = list(_float_rows(orig, t, rows))
            total = 0.0
            for a, b in zip(ref, _float_rows(g, tq, rows), strict=True):
                d2 = np.square(a - b, dtype=np.float64).sum(axis=0)
                total += float(d2 @ weights) if weights is not None else float(d2.sum())
            per_type[tq.type_name] = Option(tq.type_name, int(tq.n_bytes), total * scale)
        top = per_type[top_t.type_name]
        quantized_bytes += pad(top.nbytes, top_file.alignment)
        opts = sorted(per_type.values(), key=lambda o: (o.nbytes, o.error))
        out.append(TensorCosts(t.name, opts, top))
    fixed = top_file.file_size - quantized_bytes
    return out, fixed


# --------------------------------------------------------------------------------------------- probes


def probe_groups(
    tensors: Sequence[TensorCosts], mode: Mode = "fast", bands: int = FAST_BANDS
) -> list[list[int]]:
    """Indices of ``tensors`` probed together: one tensor each (exhaustive), or (fast) one role in one of
    ``bands`` bands of consecutive layers (``blk.N.<role>``), each tensor outside the blocks alone."""
    if mode == "exhaustive":
        return [[i] for i in range(len(tensors))]
    layers = [_BLOCK.match(tc.name) for tc in tensors]
    n_layers = 1 + max((int(m.group(1)) for m in layers if m), default=0)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (tc, m) in enumerate(zip(tensors, layers, strict=True)):
        key = (m.group(2), int(m.group(1)) * bands // n_layers) if m else (tc.name, -1)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


# --------------------------------------------------------------------------------------------- choice


def _pareto(tc: TensorCosts) -> list[Option]:
    """Options not beaten by a smaller one with no more error."""
    keep: list[Option] = []
    for o in tc.options:  # by increasing size
        if not keep or o.error < keep[-1].error:
            keep.append(o)
    return keep


@dataclass
class Choice:
    picks: list[Option]
    nbytes: int
    kld: float


def _evaluate(tensors: Sequence[TensorCosts], picks: Sequence[Option], fixed: int, align: int,
              kld_top: float) -> Choice:  # fmt: skip
    from .doctor.reader import pad

    nbytes = fixed + sum(pad(o.nbytes, align) for o in picks)
    kld = kld_top + sum(
        tc.sensitivity * (o.error - tc.top.error) for tc, o in zip(tensors, picks, strict=True)
    )
    return Choice(list(picks), nbytes, kld)


def solve(
    tensors: Sequence[TensorCosts],
    fixed: int,
    align: int,
    kld_top: float,
    *,
    max_size: int | None = None,
    max_kld: float | None = None,
) -> Choice | None:
    """Lowest predicted KLD within ``max_size``, or smallest size within ``max_kld`` (None: impossible)."""
    from .doctor.reader import pad

    opts = [_pareto(tc) for tc in tensors]

    def pick(lam: float) -> list[Option]:
        return [
            min(os_, key=lambda o, tc=tc: (tc.sensitivity * o.error + lam * pad(o.nbytes, align), o.nbytes))
            for tc, os_ in zip(tensors, opts, strict=True)
        ]

    def ev(p: Sequence[Option]) -> Choice:
        return _evaluate(tensors, p, fixed, align, kld_top)

    smallest = ev([o[0] for o in opts])
    best = ev([o[-1] for o in opts])
    if max_size is not None:
        if smallest.nbytes > max_size:
            return None
        if best.nbytes <= max_size:
            choice = best
        else:
            lo, hi = 0.0, 1.0
            while ev(pick(hi)).nbytes > max_size:  # price high enough to fit
                hi *= 4.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if ev(pick(mid)).nbytes > max_size:
                    lo = mid
                else:
                    hi = mid
            choice = _greedy(tensors, opts, ev(pick(hi)), ev, _upgrade_gain(max_size))
        if max_kld is not None and choice.kld > max_kld:
            return None
        return choice
    if max_kld is None:
        raise InputError("auto-quant needs a budget: max_size and/or max_kld")
    if best.kld > max_kld:
        return None
    if smallest.kld <= max_kld:
        return smallest
    lo, hi = 0.0, 1.0  # bigger price of a byte -> smaller file, more KLD
    while ev(pick(hi)).kld <= max_kld:
        hi *= 4.0
        if hi > 1e30:
            break
    for _ in range(60):
        mid = (lo + hi) / 2
        if ev(pick(mid)).kld <= max_kld:
            lo = mid
        else:
            hi = mid
    return _greedy(tensors, opts, ev(pick(lo)), ev, _downgrade_gain(max_kld))


def _greedy(
    tensors: Sequence[TensorCosts],
    opts: Sequence[list[Option]],
    choice: Choice,
    ev: Callable[[Sequence[Option]], Choice],
    gain: Callable[[Choice, TensorCosts, Option, Option], float | None],
) -> Choice:
    """Make the single-tensor move with the best ``gain(current, tensor, its pick, option)`` (None: not
    allowed) until no move is left."""
    picks = list(choice.picks)
    while True:
        cur = ev(picks)
        best: tuple[float, int, Option] | None = None
        for i, (tc, os_) in enumerate(zip(tensors, opts, strict=True)):
            for o in os_:
                g = gain(cur, tc, picks[i], o)
                if g is not None and (best is None or g > best[0]):
                    best = (g, i, o)
        if best is None:
            return cur
        picks[best[1]] = best[2]


def _upgrade_gain(max_size: int) -> Callable[[Choice, TensorCosts, Option, Option], float | None]:
    """Spend the bytes left on the upgrades that buy the most KLD per byte."""

    def gain(cur: Choice, tc: TensorCosts, pick: Option, o: Option) -> float | None:
        db = o.nbytes - pick.nbytes
        dk = tc.sensitivity * (o.error - pick.error)
        if db <= 0 or dk >= 0 or cur.nbytes + db > max_size:
            return None
        return -dk / db

    return gain


def _downgrade_gain(max_kld: float) -> Callable[[Choice, TensorCosts, Option, Option], float | None]:
    """Spend the KLD left on the downgrades that save the most bytes per unit of KLD."""

    def gain(cur: Choice, tc: TensorCosts, pick: Option, o: Option) -> float | None:
        db = pick.nbytes - o.nbytes
        dk = tc.sensitivity * (o.error - pick.error)
        if db <= 0 or cur.kld + max(dk, 0.0) > max_kld:
            return None
        return db / max(dk, 1e-30)

    return gain


# --------------------------------------------------------------------------------------------- driver


def _calibration_file(data: Path) -> Path:
    if data.is_dir():
        for name in ("val.jsonl", "train.jsonl"):
            if (data / name).is_file():
                return data / name
        raise InputError(f"no val.jsonl or train.jsonl in dataset folder {data} (run `gguf-factory prepare`)")
    return require_file(data, "calibration data")


def _rule(name: str, ttype: str) -> str:
    return f"^{re.escape(name)}$={ttype}"


def _file_type_for(types: Mapping[str, str], sizes: Mapping[str, int]) -> str:
    """The file type named after the tensor type holding the most bytes (general.file_type)."""
    by_type: Counter[str] = Counter()
    for name, t in types.items():
        by_type[t] += sizes[name]
    main = by_type.most_common(1)[0][0]
    return _FILE_TYPE_OF.get(main, TOP_TYPE)


def autoquant(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str],
    max_size: int | str | None = None,
    max_kld: float | None = None,
    imatrix: str | os.PathLike[str] | Mapping[str, Any] | None = "auto",
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    limit: int | None = 64,
    threads: int | None = None,
    profile: str | None = None,
    context_length: int | None = None,
    progress: bool = True,
    attempts: int = 4,
    mode: Mode = "fast",
    bands: int | None = None,
    probe_conversations: int | None = None,
    imatrix_tokens: int | None = None,
) -> AutoQuantResult:
    """Quantize ``input_path`` (F32/F16/BF16) with per-tensor types that meet ``max_size`` (bytes or a
    string such as ``"50MB"``) and/or ``max_kld`` (mean KL divergence against the input on the calibration
    conversations of ``data``) with the lowest measured KLD (``max_size``) or the smallest file
    (``max_kld`` alone). ``imatrix="auto"`` computes one from ``data``; None quantizes without.
    ``mode``: ``"fast"`` (sensitivities shared by role and depth band) or ``"exhaustive"`` (one probe per
    tensor); see the module docstring. ``bands``, ``probe_conversations`` and ``imatrix_tokens`` override
    the fast mode's settings (:class:`AutoQuantizer`).

    Writes the GGUF and, beside it, ``<name>.recipe.yaml`` (the per-tensor rules, reusable with
    ``quantize --recipe``). Raises :class:`InputError` for an impossible budget, naming what is possible;
    a size below the smallest mixture is refused before anything is measured (:func:`size_bounds`).
    To build several budgets from one set of measurements, use :class:`AutoQuantizer`.
    """
    src = require_file(input_path, "input GGUF")
    size_cap, max_kld = _check_budget(max_size, max_kld)
    dst = _output_paths(src, output_path)[0]
    cands = _check_inputs(src, data, imatrix, candidates, mode)[0]
    bounds = size_bounds(src, cands, threads=threads)
    why = bounds.refusal(size_cap) if size_cap is not None else None
    if why:
        raise InputError(why)
    with AutoQuantizer(
        src, data=data, imatrix=imatrix, candidates=cands, limit=limit, threads=threads,
        progress=progress, work_dir=dst.parent, mode=mode, bounds=bounds, bands=bands,
        probe_conversations=probe_conversations, imatrix_tokens=imatrix_tokens,
    ) as aq:  # fmt: skip
        return aq.build(
            dst, max_size=size_cap, max_kld=max_kld, profile=profile, context_length=context_length,
            attempts=attempts,
        )  # fmt: skip


def _check_budget(max_size: int | str | None, max_kld: float | None) -> tuple[int | None, float | None]:
    if max_size is None and max_kld is None:
        raise InputError("auto-quant needs a budget: --max-size and/or --max-kld")
    size_cap = parse_size(max_size, "--max-size") if max_size is not None else None
    if max_kld is not None and not (max_kld > 0 and math.isfinite(max_kld)):
        raise InputError(f"--max-kld must be a positive number, got {max_kld}")
    return size_cap, max_kld


def _check_inputs(
    src: Path,
    data: str | os.PathLike[str],
    imatrix: str | os.PathLike[str] | Mapping[str, Any] | None,
    candidates: Sequence[str],
    mode: str,
) -> tuple[list[str], Path]:
    """The candidate types and the calibration file, after every check that needs no measurement."""
    from .quantize import FLOAT_TYPES, IMATRIX_TENSOR_TYPES, check_gguf_magic, read_gguf_info

    if mode not in MODES:
        raise InputError(f"unknown auto-quant mode {mode!r}; choose one of: {', '.join(MODES)}")
    check_gguf_magic(src)
    quantized = sorted({t for t in read_gguf_info(src).tensor_types.values() if t not in FLOAT_TYPES})
    if quantized:
        raise InputError(
            f"{src} is already quantized ({', '.join(quantized)}): auto-quant measures every type "
            "against the float model, so start from the F16/F32 file"
        )
    cands = _candidates(candidates)
    data_path = Path(data)
    if not data_path.exists():
        raise InputError(f"calibration data not found: {data_path}")
    calib = _calibration_file(data_path)
    if imatrix is None and any(c in IMATRIX_TENSOR_TYPES for c in cands):
        raise InputError(
            f"{', '.join(c for c in cands if c in IMATRIX_TENSOR_TYPES)} need an importance matrix"
        )
    return cands, calib


def _output_paths(src: Path, output_path: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    from .files import check_output_path

    dst = check_output_path(
        output_path if output_path is not None else src.with_name(f"{src.stem}-auto.gguf")
    )
    if dst.resolve() == src.resolve():
        raise InputError(f"output would overwrite the input: {dst}")
    return dst, check_output_path(dst.with_suffix(".recipe.yaml"))


def _evaluated_tokens(scorer: Any) -> int:
    """Tokens one pass of ``scorer`` runs through llama.cpp (prompts and replies, not only scored ones)."""
    return sum(len(e.ids) for e in scorer.encoded)


class AutoQuantizer:
    """Measures a model once (costs of every candidate type, sensitivity of every tensor), then builds as
    many budgets as asked with :meth:`build`. Holds a work folder of temporary GGUFs: use it as a context
    manager (or call :meth:`close`).

    ``mode`` is ``"fast"`` or ``"exhaustive"`` (module docstring); ``bands``, ``probe_conversations``,
    ``error_rows`` and ``imatrix_tokens`` override the fast mode's settings. ``bounds``: :func:`size_bounds`
    of the same input and candidates, already computed (saves its dry runs)."""

    def __init__(
        self,
        input_path: str | os.PathLike[str],
        *,
        data: str | os.PathLike[str],
        imatrix: str | os.PathLike[str] | Mapping[str, Any] | None = "auto",
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        limit: int | None = 64,
        threads: int | None = None,
        progress: bool = True,
        work_dir: str | os.PathLike[str] | None = None,
        mode: Mode = "fast",
        bands: int | None = None,
        probe_conversations: int | None = None,
        error_rows: int | None = None,
        imatrix_tokens: int | None = None,
        bounds: SizeBounds | None = None,
    ):
        from .doctor.reader import read_gguf
        from .evaluate import KLDScorer
        from .quantize import load_imatrix

        t0 = time.perf_counter()
        src = self.src = require_file(input_path, "input GGUF")
        cands, calib = _check_inputs(src, data, imatrix, candidates, mode)
        data_path = Path(data)
        fast = mode == "fast"
        self.mode: str = mode
        self.bands = (bands or FAST_BANDS) if fast else None
        probe_convs = (probe_conversations or FAST_PROBE_CONVERSATIONS) if fast else None
        rows = (error_rows or FAST_ERROR_ROWS) if fast else None
        imat_tokens = imatrix_tokens or (FAST_IMATRIX_TOKENS if fast else None)
        for name, value in (
            ("bands", bands), ("probe_conversations", probe_conversations), ("error_rows", error_rows),
            ("imatrix_tokens", imatrix_tokens),
        ):  # fmt: skip
            if value is not None and value < 1:
                raise InputError(f"{name} must be positive, got {value}")
        self.threads = threads
        self.progress = progress
        self.work = Path(tempfile.mkdtemp(prefix=".autoquant-", dir=work_dir))
        try:
            with _Progress(progress) as prog:
                prog.step("types llama.cpp writes for each candidate (dry runs)")
                if bounds is None or bounds.input_path != src or set(bounds.candidates) != set(cands):
                    bounds = size_bounds(src, cands, threads=threads)
                self.bounds = bounds

                self.imatrix_path: Path | None = None
                self.imatrix_tokens = 0
                imat_src: Any = imatrix
                if isinstance(imatrix, str) and imatrix == "auto":
                    from .imatrix import compute_imatrix

                    prog.step("importance matrix from the training conversations")
                    self.imatrix_path = imat_src = self.work / "imatrix.gguf"
                    with _quiet():
                        im = compute_imatrix(
                            src,
                            data_path if data_path.is_dir() else calib,
                            self.imatrix_path,
                            threads=threads,
                            **({"max_tokens": imat_tokens} if imat_tokens else {}),
                        )
                    self.imatrix_tokens = im.tokens
                elif imatrix is not None and not isinstance(imatrix, Mapping):
                    self.imatrix_path = Path(imatrix)
                self.imat = load_imatrix(imat_src) if imat_src is not None else None

                pure = self._pure_files(cands, bounds, prog)
                prog.step("reference log-probabilities, top type's KLD")
                self.scorer = KLDScorer(src, calib, limit=limit, threads=threads)
                self.kld_top = self.scorer.score(pure[TOP_TYPE]).kld_mean
                self.evaluated_tokens = 2 * _evaluated_tokens(self.scorer)
                pure = self._drop_dominated(pure, prog)
                prog.step("quantization error of every tensor in every type")
                self.tensors, self.fixed = measure_costs(src, pure, self.imat, max_rows=rows)
                if not self.tensors:
                    raise QuantizeError(f"{src} has no tensor llama.cpp quantizes")
                self.align = read_gguf(pure[TOP_TYPE]).alignment
                self.notes = _width_notes(self.tensors, cands) + self.dropped_notes
                for c, path in pure.items():  # keep the top type's file only
                    if c != TOP_TYPE:
                        path.unlink()

                probe_scorer, probe_top = self.scorer, self.kld_top
                if probe_convs is not None and probe_convs < len(self.scorer.encoded):
                    probe_scorer = KLDScorer(src, calib, limit=probe_convs, threads=threads)
                    probe_top = probe_scorer.score(pure[TOP_TYPE]).kld_mean
                    self.evaluated_tokens += 2 * _evaluated_tokens(probe_scorer)
                self.probe_tokens = probe_scorer.n_tokens
                self.probes = self._probe(probe_scorer, probe_top, prog)
                self.evaluated_tokens += self.probes * _evaluated_tokens(probe_scorer)
            self.step_seconds = prog.seconds
        except BaseException:
            self.close()
            raise
        self.measure_seconds = time.perf_counter() - t0

    def _drop_dominated(self, pure: dict[str, Path], prog: _Progress) -> dict[str, Path]:
        """Score every candidate's pure file on the calibration conversations and leave out each candidate
        that another one beats at no more bytes (lower KLD, same size or smaller).

        The per-tensor error the solver weighs is measured on dequantized weights; llama.cpp's arithmetic can
        disagree. Measured on SmolLM2-135M (fine-tuned and not): every tensor in Q5_1 (the Q5_K candidate's
        fallback for 576-wide rows) gives about twice the KLD of Q5_0, which is smaller, although its weight
        error is lower. Such a candidate would look cheap to the solver and be worse in the file."""
        task = prog.task("whole-model KLD of each candidate type", len(pure) - 1)
        self.candidate_klds: dict[str, float] = {TOP_TYPE: self.kld_top}
        for c, path in pure.items():
            if c != TOP_TYPE:
                self.candidate_klds[c] = self.scorer.score(path).kld_mean
                self.evaluated_tokens += _evaluated_tokens(self.scorer)
                prog.advance(task)
        self.candidate_sizes = {c: p.stat().st_size for c, p in pure.items()}
        kld, size = self.candidate_klds, self.candidate_sizes
        self.dropped_notes: list[str] = []
        kept: dict[str, Path] = {}
        for c, path in pure.items():
            better = [d for d in pure if d != c and size[d] <= size[c] and kld[d] < kld[c]]
            if c == TOP_TYPE or not better:
                kept[c] = path
                continue
            d = min(better, key=lambda d: kld[d])
            self.dropped_notes.append(
                f"candidate {c} left out: every tensor in it measured mean KLD {kld[c]:.3g} "
                f"({human_size(size[c])}), {d} {kld[d]:.3g} ({human_size(size[d])})"
            )
            path.unlink()
        return kept

    def _pure_files(self, cands: Sequence[str], bounds: SizeBounds, prog: _Progress) -> dict[str, Path]:
        """One pure quantization per candidate type, the top type first; a tensor whose written type an
        earlier file already holds is written as the top type (no work), a file that would add nothing is
        not made."""
        order = sorted(cands, key=lambda c: (c != TOP_TYPE, _block_of(c) != 32))
        seen: dict[str, set[str]] = {}
        pure: dict[str, Path] = {}
        task = prog.task("pure quantization per candidate type", len(order))
        for c in order:
            rules: list[str] = []
            new = False
            for name, ty in bounds.written[c].items():
                if ty in _FLOAT_NAMES:
                    continue
                if ty in seen.setdefault(name, set()):
                    rules.append(_rule(name, TOP_TYPE))
                else:
                    seen[name].add(ty)
                    new = True
            if new:
                pure[c] = self._q(self.work / f"pure-{c}.gguf", _FILE_TYPE_OF[c], tensor_types=rules)
            prog.advance(task)
        return pure

    def _probe(self, scorer: Any, kld_top: float, prog: _Progress) -> int:
        """Set every tensor's sensitivity from probes of its group; returns the number of probes."""
        groups = probe_groups(self.tensors, "fast" if self.bands else "exhaustive", self.bands or 1)
        # per probe: the tensors lowered together, the KLD measured, the sensitivity they got
        self.probe_log: list[dict[str, Any]] = []
        task = prog.task("sensitivity probes", len(groups))
        probes = 0
        for group in groups:
            members = [
                self.tensors[i] for i in group
                if self.tensors[i].options[0].type != self.tensors[i].top.type
                and self.tensors[i].options[0].error > self.tensors[i].top.error
            ]  # fmt: skip
            if members:
                rules = [_rule(tc.name, tc.options[0].type) for tc in members]
                probe = self._q(self.work / "probe.gguf", TOP_TYPE, tensor_types=rules)
                kld = scorer.score(probe).kld_mean
                probe.unlink()
                probes += 1
                de = sum(tc.options[0].error - tc.top.error for tc in members)
                for tc in members:
                    tc.probe_kld = kld
                    tc.sensitivity = max(kld - kld_top, 0.0) / de
                self.probe_log.append(
                    {
                        "tensors": [tc.name for tc in members],
                        "kld": kld,
                        "sensitivity": members[0].sensitivity,
                    }
                )
                log.debug("probe of %d tensors (%s, ...): KLD %.4g", len(members), members[0].name, kld)
            prog.advance(task)
        return probes

    def _stock_rival(
        self, size_cap: int, profile: str | None, context_length: int | None
    ) -> dict[str, Any] | None:
        """The largest llama.cpp preset that fits ``size_cap``, quantized with this run's importance matrix
        and scored like the mixture (None when none fits). The sensitivity model predicts KLD from
        per-group probes; a preset is one real measurement that it must beat, so auto-quant never writes a
        file that measured worse than ``quantize`` would at the same size."""
        from .quantize import quantize

        sizes = {ftype: stock_size(self.src, ftype, self.threads) for ftype in STOCK_PRESETS}
        # largest first by this model's sizes (576-wide rows make Q5_0 smaller than Q4_K_M on SmolLM2)
        for ftype in sorted((f for f in STOCK_PRESETS if sizes[f] <= size_cap), key=lambda f: -sizes[f]):
            path = self.work / f"stock-{ftype}.gguf"
            with _quiet():
                quantize(
                    self.src, path, ftype, imatrix=self.imat, threads=self.threads, profile=profile,
                    context_length=context_length,
                )  # fmt: skip
            size = path.stat().st_size
            if size > size_cap:  # the estimate's header was a few bytes short
                path.unlink()
                continue
            score = self.scorer.score(path)
            return {"ftype": ftype, "size_bytes": size, "kld_mean": score.kld_mean, "chosen": False,
                    "path": path, "score": score}  # fmt: skip
        return None

    def _q(self, out: Path, ftype: str, **kw: Any) -> Path:
        from .quantize import quantize

        with _quiet():
            quantize(self.src, out, ftype, pure=True, imatrix=self.imat, threads=self.threads, **kw)
        return out

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> AutoQuantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(
        self,
        output_path: str | os.PathLike[str] | None = None,
        *,
        max_size: int | str | None = None,
        max_kld: float | None = None,
        profile: str | None = None,
        context_length: int | None = None,
        attempts: int = 4,
    ) -> AutoQuantResult:
        """The mixture that meets the budget, written to ``output_path`` with its recipe YAML beside it."""
        from .files import atomic_path
        from .quantize import Recipe, make_rule, read_gguf_info

        t0 = time.perf_counter()
        size_cap, max_kld = _check_budget(max_size, max_kld)
        dst, recipe_path = _output_paths(self.src, output_path)
        tensors, src = self.tensors, self.src
        label = f"auto {_budget_text(size_cap, max_kld)}"
        budget_size, budget_kld = size_cap, max_kld
        with _Progress(self.progress) as prog:
            for attempt in range(1, attempts + 1):
                choice = solve(
                    tensors, self.fixed, self.align, self.kld_top, max_size=budget_size, max_kld=budget_kld
                )
                if choice is None:
                    raise _impossible(src, tensors, self.fixed, self.align, self.kld_top, size_cap, max_kld)
                types = {tc.name: o.type for tc, o in zip(tensors, choice.picks, strict=True)}
                sizes = {tc.name: o.nbytes for tc, o in zip(tensors, choice.picks, strict=True)}
                recipe = Recipe(label, [make_rule(f"^{re.escape(n)}$", t) for n, t in types.items()])
                prog.step(f"building the chosen mixture (attempt {attempt})")
                built = self._q(
                    self.work / f"candidate-{attempt}.gguf", _file_type_for(types, sizes),
                    recipe=recipe, profile=profile, context_length=context_length,
                )  # fmt: skip
                written = {n: t for n, t in read_gguf_info(built).tensor_types.items() if n in types}
                if written != types:
                    missed = sorted(n for n in types if written.get(n) != types[n])
                    raise QuantizeError(
                        f"llama.cpp did not apply the chosen types to {', '.join(missed[:5])}"
                    )
                size = built.stat().st_size
                measured = self.scorer.score(built)
                log.info(
                    "attempt %d: %s, mean KLD %.3g measured, %.3g predicted",
                    attempt, human_size(size), measured.kld_mean, choice.kld,
                )  # fmt: skip
                ok_size = size_cap is None or size <= size_cap
                ok_kld = max_kld is None or measured.kld_mean <= max_kld
                if ok_size and ok_kld:
                    break
                if not ok_size and budget_size is not None and size_cap is not None:
                    budget_size -= size - size_cap + 4096
                if not ok_kld and max_kld is not None:
                    budget_kld = (budget_kld or max_kld) * max_kld / measured.kld_mean * 0.9
                built.unlink()
            else:
                raise QuantizeError(
                    f"could not meet {_budget_text(size_cap, max_kld)} in {attempts} attempts: the last "
                    f"mixture measured {human_size(size)} with mean KLD {measured.kld_mean:.4g} (predicted "
                    f"{choice.kld:.4g}); loosen the budget"
                )
            stock = None
            if size_cap is not None:
                prog.step("llama.cpp's own preset within the budget, measured as the rival")
                stock = self._stock_rival(size_cap, profile, context_length)
            if stock is not None:
                stock["mixture_kld"] = measured.kld_mean
            if stock is not None and stock["kld_mean"] < measured.kld_mean:
                stock["chosen"] = True
                built.unlink()
                built, measured, size = stock.pop("path"), stock.pop("score"), stock["size_bytes"]
                written = read_gguf_info(built).tensor_types
                types = {n: written[n] for n in types}
                label = f"llama.cpp {stock['ftype']} with the importance matrix"
                self.notes.append(
                    f"llama.cpp's own {stock['ftype']} measured a lower KLD than the mixture the "
                    f"sensitivity model chose ({measured.kld_mean:.4g} against {stock['mixture_kld']:.4g}): "
                    "written instead"
                )
            elif stock is not None:
                stock.pop("path").unlink()
                stock.pop("score")
        _write_recipe(recipe_path, types, label, src, measured.kld_mean, size)
        with atomic_path(dst) as tmp:
            shutil.move(str(built), tmp)
        return AutoQuantResult(
            path=dst,
            recipe_path=recipe_path,
            input_path=src,
            input_bytes=src.stat().st_size,
            size_bytes=dst.stat().st_size,
            max_size=size_cap,
            max_kld=max_kld,
            kld_mean=measured.kld_mean,
            kld_predicted=choice.kld,
            kld_top=self.kld_top,
            top1=measured.top1,
            calibration_tokens=self.scorer.n_tokens,
            types=types,
            imatrix_path=self.imatrix_path if self.imatrix_path and self.imatrix_path.exists() else None,
            attempts=attempt,
            probes=self.probes,
            seconds=self.measure_seconds + time.perf_counter() - t0,
            mode=self.mode,
            probe_tokens=self.probe_tokens,
            evaluated_tokens=self.evaluated_tokens,
            imatrix_tokens=self.imatrix_tokens,
            measure_seconds=self.measure_seconds,
            notes=list(self.notes),
            stock=stock,
        )


def _width_notes(tensors: Sequence[TensorCosts], cands: Sequence[str]) -> list[str]:
    """Say how many tensors could not take the 256-block types asked for (rows too narrow)."""
    k_cands = {c for c in cands if c.endswith("_K") or c == "IQ4_XS"}
    if not k_cands:
        return []
    narrow = [tc.name for tc in tensors if not any(o.type in k_cands for o in tc.options)]
    if not narrow:
        return []
    return [
        f"{len(narrow)} of {len(tensors)} tensors have rows that are not a multiple of 256 values: only "
        f"32-block types were possible for them (e.g. {narrow[0]})"
    ]


def _budget_text(max_size: int | None, max_kld: float | None) -> str:
    parts = []
    if max_size is not None:
        parts.append(f"size <= {human_size(max_size)}")
    if max_kld is not None:
        parts.append(f"KLD <= {max_kld:g}")
    return ", ".join(parts)


def _impossible(
    src: Path,
    tensors: Sequence[TensorCosts],
    fixed: int,
    align: int,
    kld_top: float,
    max_size: int | None,
    max_kld: float | None,
) -> InputError:
    opts = [_pareto(tc) for tc in tensors]
    smallest = _evaluate(tensors, [o[0] for o in opts], fixed, align, kld_top)
    best = _evaluate(tensors, [o[-1] for o in opts], fixed, align, kld_top)
    if max_size is not None and smallest.nbytes > max_size:
        return InputError(
            f"--max-size {human_size(max_size)} is impossible for {src.name}: the smallest mixture of the "
            f"candidate types is {human_size(smallest.nbytes)}"
        )
    if max_kld is not None and best.kld > max_kld:
        return InputError(
            f"--max-kld {max_kld:g} is impossible for {src.name}: even every tensor at {TOP_TYPE} measures "
            f"a mean KLD of {kld_top:.3g}"
        )
    return InputError(
        f"no mixture meets both {_budget_text(max_size, max_kld)} for {src.name}: within the size the "
        "lowest predicted KLD is above the cap; loosen one of them"
    )


def _write_recipe(path: Path, types: Mapping[str, str], label: str, src: Path, kld: float, size: int) -> None:
    lines = [
        f"# written by gguf-factory auto-quant for {src.name}: {human_size(size)}, mean KLD {kld:.4g}",
        f"name: {label!r}",
        "description: per-tensor types chosen by auto-quant (reuse with `gguf-factory quantize --recipe`)",
        f"type: {_file_type_for(types, dict.fromkeys(types, 1))}",
        "rules:",
    ]
    lines += [f"  - '{_rule(n, t)}'" for n, t in types.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp narrates every tensor of every probe on fd 2; keep it for -v."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    from .runtime import _quiet_stderr

    with _quiet_stderr():
        yield


class _Progress:
    """A rich progress display on stderr (nothing when disabled), and the seconds each step took."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p: Any = None
        self._step: Any = None
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lap()
        if self._p is not None:
            self._p.__exit__(*exc)

    def _lap(self) -> None:
        if self._current is not None:
            name, t0 = self._current
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._current = None

    def step(self, text: str) -> None:
        log.debug("auto-quant: %s", text)
        self._lap()
        self._current = (text, time.perf_counter())
        if self._p is not None:
            if self._step is not None:
                self._p.update(self._step, completed=1, visible=False)
            self._step = self._p.add_task(text, total=1)

    def task(self, text: str, total: int) -> Any:
        self.step(text)
        if self._p is not None:
            self._p.update(self._step, total=total)
        return self._step

    def advance(self, task: Any) -> None:
        if self._p is not None:
            self._p.advance(task)
