"""Auto-quant: one type per tensor, chosen to meet a size or quality budget with the lowest KL divergence,
from sensitivities measured with llama.cpp on the user's own conversations.

How it decides (measured, nothing assumed about the architecture):

1. **Costs.** Each candidate type is applied to every tensor at once (a pure quantization). That file
   tells, per tensor, the type llama.cpp really wrote (a row width that is not a multiple of a K-quant's
   256-value block falls back to a 32-block type), its exact size, and its quantization error
   ``e_i(T) = sum_c w_c * (W - W_hat)^2`` of the dequantized weights against the input's, each input column
   weighted by the importance matrix when there is one (the expected squared error of the tensor's output).
2. **Sensitivity.** Starting from every tensor at the top candidate (Q8_0), one tensor at a time is
   lowered to its smallest option and the KL divergence against the input model is measured on the
   calibration conversations: ``s_i = dKLD_i / de_i``. An assignment's predicted KLD is
   ``KLD(top) + sum_i s_i * (e_i(t_i) - e_i(top))``.
3. **Choice.** A multiple-choice knapsack picks one option per tensor: Lagrangian relaxation (bisection on
   the price of a byte), then greedy moves into whatever budget is left.
4. **Proof.** The file is quantized with one tensor-type override per tensor, then measured: its size is
   exact, its KLD is measured on the calibration data. When the measurement misses the budget, the budget
   is tightened and solved again; when it cannot be met, nothing is written.

Calibration uses the dataset's ``val.jsonl`` (not ``test.jsonl``, which stays for reports) and, with
``imatrix="auto"``, an importance matrix computed from its ``train.jsonl``.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

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

# the file type to pure-quantize with to get a tensor type everywhere
_FILE_TYPE_OF = {
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "IQ2_S": "IQ2_S", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
    "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S", "F16": "F16", "BF16": "BF16",
}  # fmt: skip
_ROW_CHUNK = 16384


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
    notes: list[str] = field(default_factory=list)

    @property
    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.types.values()).most_common())

    @property
    def reduction(self) -> float:
        return 1.0 - self.size_bytes / self.input_bytes if self.input_bytes else 0.0


# --------------------------------------------------------------------------------------------- costs


def _float_rows(g: Any, t: Any) -> Iterator[np.ndarray]:
    """The tensor as float32 rows, in chunks (the input: F32, F16 or BF16)."""
    import gguf

    from .doctor.reader import tensor_data

    raw = tensor_data(g, t)
    if raw is None:
        raise InputError(f"{g.path}: tensor {t.name} lies outside the file")
    width = t.dims[0]
    rows = t.n_elements // width
    row_bytes = t.n_bytes // rows
    for start in range(0, rows, _ROW_CHUNK):
        stop = min(rows, start + _ROW_CHUNK)
        block = np.asarray(raw[start * row_bytes : stop * row_bytes]).reshape(stop - start, row_bytes)
        yield gguf.quants.dequantize(block, t.type).reshape(stop - start, width).astype(np.float32)


def _weighted_error(orig: Any, q: Any, t_orig: Any, t_q: Any, weights: np.ndarray | None) -> float:
    total = 0.0
    for a, b in zip(_float_rows(orig, t_orig), _float_rows(q, t_q), strict=True):
        d2 = np.square(a - b, dtype=np.float64).sum(axis=0)
        total += float(d2 @ weights) if weights is not None else float(d2.sum())
    return total


def measure_costs(
    input_path: Path,
    pure_files: Mapping[str, Path],
    imatrix: Mapping[str, np.ndarray] | None,
) -> tuple[list[TensorCosts], int]:
    """Per quantizable tensor, its options (type written, bytes, weighted error) from the pure files;
    and the bytes that no choice changes (header, norms, padding) in the top type's file."""
    from .doctor.reader import pad, read_gguf

    orig = read_gguf(input_path)
    files = {c: read_gguf(p) for c, p in pure_files.items()}
    top_file = files[TOP_TYPE]
    out: list[TensorCosts] = []
    quantized_bytes = 0
    for t in orig.tensors:
        per_type: dict[str, Option] = {}
        for _cand, g in files.items():
            tq = g.tensor(t.name)
            if tq is None or tq.type is None or tq.n_bytes is None:
                raise QuantizeError(f"llama.cpp's pure quantization of {input_path} lost tensor {t.name}")
            if tq.type_name in ("F32", "F16", "BF16") or tq.type_name in per_type:
                continue
            w = imatrix.get(t.name) if imatrix else None
            if w is not None and w.size != t.dims[0]:
                w = None
            err = _weighted_error(orig, g, t, tq, w.astype(np.float64) if w is not None else None)
            per_type[tq.type_name] = Option(tq.type_name, tq.n_bytes, err)
        top_t = top_file.tensor(t.name)
        if not per_type or top_t is None or top_t.type_name not in per_type:
            continue  # llama.cpp never quantizes it (norms, 1-D tensors): part of the fixed bytes
        top = per_type[top_t.type_name]
        quantized_bytes += pad(top.nbytes, top_file.alignment)
        opts = sorted(per_type.values(), key=lambda o: (o.nbytes, o.error))
        out.append(TensorCosts(t.name, opts, top))
    fixed = top_file.file_size - quantized_bytes
    return out, fixed


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
) -> AutoQuantResult:
    """Quantize ``input_path`` (F32/F16/BF16) with per-tensor types that meet ``max_size`` (bytes or a
    string such as ``"50MB"``) and/or ``max_kld`` (mean KL divergence against the input on the calibration
    conversations of ``data``) with the lowest measured KLD (``max_size``) or the smallest file
    (``max_kld`` alone). ``imatrix="auto"`` computes one from ``data``; None quantizes without.

    Writes the GGUF and, beside it, ``<name>.recipe.yaml`` (the per-tensor rules, reusable with
    ``quantize --recipe``). Raises :class:`InputError` for an impossible budget, naming what is possible.
    To build several budgets from one set of measurements, use :class:`AutoQuantizer`.
    """
    src = require_file(input_path, "input GGUF")
    size_cap, max_kld = _check_budget(max_size, max_kld)
    dst = _output_paths(src, output_path)[0]
    with AutoQuantizer(
        src, data=data, imatrix=imatrix, candidates=candidates, limit=limit, threads=threads,
        progress=progress, work_dir=dst.parent,
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


def _output_paths(src: Path, output_path: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    from .files import check_output_path

    dst = check_output_path(
        output_path if output_path is not None else src.with_name(f"{src.stem}-auto.gguf")
    )
    if dst.resolve() == src.resolve():
        raise InputError(f"output would overwrite the input: {dst}")
    return dst, check_output_path(dst.with_suffix(".recipe.yaml"))


class AutoQuantizer:
    """Measures a model once (costs of every candidate type, sensitivity of every tensor), then builds as
    many budgets as asked with :meth:`build`. Holds a work folder of temporary GGUFs: use it as a context
    manager (or call :meth:`close`)."""

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
    ):
        from .doctor.reader import read_gguf
        from .evaluate import KLDScorer
        from .quantize import (
            FLOAT_TYPES,
            IMATRIX_TENSOR_TYPES,
            check_gguf_magic,
            load_imatrix,
            normalize_tensor_type,
            read_gguf_info,
        )

        t0 = time.perf_counter()
        src = self.src = require_file(input_path, "input GGUF")
        check_gguf_magic(src)
        quantized = sorted({t for t in read_gguf_info(src).tensor_types.values() if t not in FLOAT_TYPES})
        if quantized:
            raise InputError(
                f"{src} is already quantized ({', '.join(quantized)}): auto-quant measures every type "
                "against the float model, so start from the F16/F32 file"
            )
        cands = list(dict.fromkeys(normalize_tensor_type(c, "candidate type") for c in candidates))
        if TOP_TYPE not in cands:
            cands.append(TOP_TYPE)
        unknown = [c for c in cands if c not in _FILE_TYPE_OF or c in ("F16", "BF16")]
        if unknown:
            raise InputError(f"candidate type(s) {', '.join(unknown)} not supported by auto-quant")
        data_path = Path(data)
        if not data_path.exists():
            raise InputError(f"calibration data not found: {data_path}")
        calib = _calibration_file(data_path)
        if imatrix is None and any(c in IMATRIX_TENSOR_TYPES for c in cands):
            raise InputError(
                f"{', '.join(c for c in cands if c in IMATRIX_TENSOR_TYPES)} need an importance matrix"
            )
        self.threads = threads
        self.progress = progress
        self.work = Path(tempfile.mkdtemp(prefix=".autoquant-", dir=work_dir))
        try:
            with _Progress(progress) as prog:
                self.imatrix_path: Path | None = None
                imat_src: Any = imatrix
                if isinstance(imatrix, str) and imatrix == "auto":
                    from .imatrix import compute_imatrix

                    prog.step("importance matrix from the training conversations")
                    self.imatrix_path = imat_src = self.work / "imatrix.gguf"
                    with _quiet():
                        compute_imatrix(
                            src,
                            data_path if data_path.is_dir() else calib,
                            self.imatrix_path,
                            threads=threads,
                        )
                elif imatrix is not None and not isinstance(imatrix, Mapping):
                    self.imatrix_path = Path(imatrix)
                self.imat = load_imatrix(imat_src) if imat_src is not None else None

                pure: dict[str, Path] = {}
                task = prog.task("pure quantization per candidate type", len(cands))
                for c in cands:
                    pure[c] = self._q(self.work / f"pure-{c}.gguf", _FILE_TYPE_OF[c])
                    prog.advance(task)
                prog.step("quantization error of every tensor in every type")
                self.tensors, self.fixed = measure_costs(src, pure, self.imat)
                if not self.tensors:
                    raise QuantizeError(f"{src} has no tensor llama.cpp quantizes")
                self.align = read_gguf(pure[TOP_TYPE]).alignment
                self.notes = _width_notes(self.tensors, cands)
                for c, path in pure.items():  # keep the top type's file only
                    if c != TOP_TYPE:
                        path.unlink()

                prog.step(f"reference log-probabilities on {calib.name}")
                self.scorer = KLDScorer(src, calib, limit=limit, threads=threads)
                self.kld_top = self.scorer.score(pure[TOP_TYPE]).kld_mean
                task = prog.task("sensitivity of each tensor", len(self.tensors))
                self.probes = 0
                for tc in self.tensors:
                    low = tc.options[0]
                    if low.type != tc.top.type and low.error > tc.top.error:
                        probe = self._q(
                            self.work / "probe.gguf", TOP_TYPE, tensor_types=[_rule(tc.name, low.type)]
                        )
                        tc.probe_kld = self.scorer.score(probe).kld_mean
                        probe.unlink()
                        self.probes += 1
                        tc.sensitivity = max(tc.probe_kld - self.kld_top, 0.0) / (low.error - tc.top.error)
                    prog.advance(task)
        except BaseException:
            self.close()
            raise
        self.measure_seconds = time.perf_counter() - t0

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
            notes=list(self.notes),
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
    """A rich progress display on stderr (nothing when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p: Any = None
        self._step: Any = None

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
        if self._p is not None:
            self._p.__exit__(*exc)

    def step(self, text: str) -> None:
        log.debug("auto-quant: %s", text)
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
