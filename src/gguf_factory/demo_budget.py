"""``gguf-factory demo --time-budget``: plan the demo to fit a wall-clock budget on this machine.

The planner (:func:`plan_budget`) is a pure function of plain numbers: this machine's measured seconds per
fine-tune optimizer step, what the demo will do (:class:`Work`: step counts, layers, systems measured), the
settings of the full recipes and their floors (:class:`Settings`), the budget and the time already spent.
It returns a :class:`BudgetPlan`: the settings every stage runs with and the seconds each is expected to
take. :mod:`gguf_factory.demo` measures the machine, plans before any heavy work, and plans again after
every heavy stage from the time really spent (a stage that ran long shrinks the later ones; one that ran
short gives time back, up to the full recipe).

**How fast is this machine.** Before the fine-tune, a calibration run trains the base for
:data:`CALIBRATION_STEPS` optimizer steps on conversations drawn from the training split, with the recipe's
batch size, precision and threads (the real ``train``; its output is thrown away), and reads the seconds
per step from its ``training.json`` (scaled to the split's mean conversation length). After the fine-tune,
its own seconds per step replace the calibration's.

**What each stage costs** is that step time ``u`` times the stage's cost in steps, read from the two
measured demo runs in ``benchmarks/results/demo.json`` (:data:`REFERENCE`): a 2-core AMD EPYC with AVX2
only, which trains in fp32 (84.3 min), and a 2-core AVX-512 machine with native bfloat16 (19.7 min), whose
training is relatively faster than its inference, so every other stage costs more steps there. The table
of the precision the fine-tune uses is taken. Each later plan multiplies those reference costs by how far
off they were on the stages already run here (:func:`correction`).

**Order of sacrifice** (:data:`SACRIFICE`). When the full recipes do not fit, settings are lowered one rung
at a time in this order, each down to its floor, until the estimate fits:

1. measurement repeats (``runs`` 3 -> 1): they only tighten the medians of load time, first token and
   tokens/s; a single fresh process still measures each system;
2. speed prompts (``n_prompts`` 5 -> 2): the prompts behind the same speed figures;
3. quality conversations (``max_quality`` 40 -> 10): held-out conversations answered per system for the
   on-topic and similarity figures (bits per byte is still scored on every held-out conversation);
4. auto-quant's measurement: calibration conversations (64 -> 16), importance-matrix tokens
   (16384 -> 4096), probe conversations (16 -> 8), depth bands (3 -> 1: 8 probes instead of 22): the
   per-tensor types are chosen on noisier KL divergences;
5. pruning calibration (256 -> 32 conversations): which layers the student loses is judged on fewer
   conversations;
6. training steps, last: the fine-tune and the distillation keep the same fraction of their recipe, each
   at least :func:`train_floor` steps.

Figures that only describe the result go before choices that shape it, and those before the training that
makes the models every later step reports on. Never cut: the conversions and quantized files, the parity
check, bits per byte on every held-out conversation.

**The floor of training steps** (:func:`train_floor`): a fifth of the recipe's steps and at least
:data:`MIN_TRAIN_STEPS`, or the whole recipe if it is shorter. Below eight steps the schedule is mostly
its ends (one warm-up step, then a cosine decay to a tenth of the learning rate), and below a fifth of an
epoch (144 of the demo's 718 conversations) the fine-tune has seen too little of the corpus for the
demo's point, the fine-tuned model against the untouched base, to stand. This is a judgment, not a
measurement: the report records the steps each model got, and their bits per byte show the effect.

When even the floors do not fit, :func:`plan_budget` says so (``fits=False``) with the estimated minimum,
and the demo stops before its heavy work with :class:`BudgetError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import InputError

__all__ = [
    "BudgetError",
    "BudgetPlan",
    "CALIBRATION_STEPS",
    "FLOORS",
    "MIN_TRAIN_STEPS",
    "REFERENCE",
    "SACRIFICE",
    "Settings",
    "Work",
    "correction",
    "estimate",
    "format_duration",
    "parse_duration",
    "plan_budget",
    "train_floor",
]

CALIBRATION_STEPS = 3
"""Optimizer steps the calibration run trains (the real loop, on as many batches of the training split)."""

MIN_TRAIN_STEPS = 8
TRAIN_FLOOR_FRACTION = 0.2
PROCESS_SECONDS = 3.0
"""A fresh measurement process (``python -m gguf_factory.bench``) importing llama.cpp or torch, before it
loads the model: a constant, whatever the model's size."""


class BudgetError(InputError):
    """``time_budget`` (``--time-budget``) is below the least the demo can do on this machine.

    ``minimum``: the estimated seconds at every floor; ``full``: at the full recipes; ``plan``: the
    :class:`BudgetPlan` at the floors."""

    def __init__(self, message: str, *, minimum: float, full: float, plan: BudgetPlan) -> None:
        super().__init__(message)
        self.minimum, self.full, self.plan = minimum, full, plan


@dataclass(frozen=True)
class Reference:
    """What each stage of one measured demo run cost, in fine-tune optimizer steps (``u``) of that run.

    Source: ``step_seconds`` of ``benchmarks/results/demo.json`` (SmolLM2-135M-Instruct, the chatterbot
    corpus, 90 fine-tune steps of 8 conversations); the measurement's parts split its total the way the
    slow run's own table does (load times, tokens/s of each system; 48-token replies)."""

    machine: str
    prune_pass: float
    """One calibration conversation through the model once (layer pruning: one pass per layer)."""
    distil_fixed: float
    """The teacher's pass over the training split (llama.cpp), loading and saving: 15 % of the stage."""
    distil_step: float
    autoquant: float
    """One full auto-quant (fast mode, 64 calibration conversations) of the student."""
    parity: float
    other: float
    """Conversions, the three quantizations, the vocabulary trim."""
    lstm: float
    """Training the Bi-LSTM baseline."""
    generation: float
    """One greedy reply of at most 48 tokens, averaged over the systems."""
    bits_per_byte: float
    """Scoring every held-out conversation teacher-forced, per system."""
    load: float
    """Loading a system in a fresh process (beyond :data:`PROCESS_SECONDS`)."""


REFERENCE: dict[str, Reference] = {
    # 2-core AMD EPYC, AVX2, fp32 training: fine-tune 1118 s / 90 steps = 12.42 s per step; prune 965.5 s
    # (256 conversations x 31 passes), distil 1112.2 s, auto-quant 849.9 s, parity 46.0 s, measure 936.8 s
    # (LSTM 79 s to train; 7 systems x (3 runs x 5 prompts + 40 quality) replies at ~1.9 s; 24 processes)
    "fp32": Reference(
        machine="2-core AMD EPYC (AVX2), fp32 training",
        prune_pass=0.0098, distil_fixed=13.4, distil_step=0.845, autoquant=68.4, parity=3.7, other=1.45,
        lstm=7.0, generation=0.15, bits_per_byte=0.65, load=0.08,
    ),
    # 2-core AVX-512 machine, bf16 training: 191.1 s / 90 = 2.12 s per step; prune 249.9 s, distil 242.4 s,
    # auto-quant 163.3 s, parity 15.2 s, measure 309.7 s (its parts: the fp32 split x 1.656)
    "bf16": Reference(
        machine="2-core AVX-512 CPU with native bfloat16, bf16 training",
        prune_pass=0.0149, distil_fixed=17.1, distil_step=0.97, autoquant=77.0, parity=7.2, other=4.0,
        lstm=11.6, generation=0.248, bits_per_byte=1.08, load=0.13,
    ),
}  # fmt: skip

# auto-quant's measurement by part (benchmarks/results/autoquant_scale_finetuned.json, SmolLM2-135M, fast
# mode): fixed (dry runs, pure quantizations, errors, the build's quantizations) 14 %, the importance
# matrix 10 %, scoring on the calibration conversations (reference, every candidate, the proof) 45 %,
# the 22 sensitivity probes 31 % (each a fifth quantization, four fifths scoring on 16 conversations)
_AQ_FIXED, _AQ_IMATRIX, _AQ_CALIBRATION, _AQ_PROBES = 0.14, 0.10, 0.45, 0.31
AQ_FULL = {"limit": 64, "imatrix_tokens": 16384, "probe_conversations": 16, "bands": 3}
_ROLES = 7  # attn_q/k/v/output, ffn_gate/up/down: probes per band, plus the token embedding alone


@dataclass(frozen=True)
class Settings:
    """What every budgeted stage runs with (or, for :data:`FLOORS`, the least it may)."""

    train_steps: int
    """Fine-tune (or from-scratch training) optimizer steps."""
    distil_steps: int
    prune_samples: int
    aq_limit: int
    aq_imatrix_tokens: int
    aq_probe_conversations: int
    aq_bands: int
    runs: int
    n_prompts: int
    max_quality: int


FLOORS = {
    "prune_samples": 32, "aq_limit": 16, "aq_imatrix_tokens": 4096, "aq_probe_conversations": 8,
    "aq_bands": 1, "runs": 1, "n_prompts": 2, "max_quality": 10,
}  # fmt: skip
"""The least each setting is lowered to (training steps: :func:`train_floor`); a full setting already
below its floor stays as it is."""

SACRIFICE = (
    "runs", "n_prompts", "max_quality", "aq_limit", "aq_imatrix_tokens", "aq_probe_conversations",
    "aq_bands", "prune_samples",
)  # fmt: skip
"""The order settings are lowered in (training steps after all of them); see the module docstring."""

_STAGE_OF = {
    "train_steps": "train", "distil_steps": "distil", "prune_samples": "prune", "aq_limit": "autoquant",
    "aq_imatrix_tokens": "autoquant", "aq_probe_conversations": "autoquant", "aq_bands": "autoquant",
    "runs": "measure", "n_prompts": "measure", "max_quality": "measure",
}  # fmt: skip

LABELS = {
    "train_steps": "training steps", "distil_steps": "distillation steps",
    "prune_samples": "pruning calibration conversations", "aq_limit": "auto-quant calibration conversations",
    "aq_imatrix_tokens": "auto-quant importance-matrix tokens",
    "aq_probe_conversations": "auto-quant probe conversations", "aq_bands": "auto-quant depth bands",
    "runs": "measurement repeats", "n_prompts": "speed prompts", "max_quality": "quality conversations",
}  # fmt: skip

STAGES = ("train", "prune", "distil", "autoquant", "parity", "other", "measure")


@dataclass(frozen=True)
class Work:
    """What the demo will do, and how fast this machine trains (the planner's inputs besides settings)."""

    step_seconds: float
    """Seconds of one fine-tune optimizer step on this machine (measured)."""
    reference: str = "fp32"
    """Which :data:`REFERENCE` table: the fine-tune's precision (``bf16`` or ``fp32``)."""
    train_overhead: float = 0.0
    """Seconds of the training stage besides its steps (loading, validation, saving)."""
    prune_passes: int = 0
    """Passes of each pruning calibration conversation through the model (0: no pruning)."""
    train_conversations: int = 0
    """Conversations of the training split (pruning calibrates on at most that many)."""
    val_conversations: int = 0
    """Of the validation split (auto-quant calibrates on at most that many)."""
    student: bool = False
    """A student is trimmed, pruned and distilled."""
    autoquants: int = 0
    """Full auto-quant runs (the fine-tuned model's, the student's)."""
    systems: int = 0
    """Systems measured besides the LSTM baseline."""
    lstm: bool = False
    quantize: bool = True
    """Conversions and quantizations still to do (:attr:`Reference.other`)."""


@dataclass
class BudgetPlan:
    budget: float
    spent: float
    """Seconds already spent when this plan was made."""
    work: Work
    full: Settings
    settings: Settings
    estimates: dict[str, float]
    """Seconds each stage still to run is expected to take."""
    fits: bool
    minimum: float
    """The estimated total (spent included) at every floor."""
    full_total: float
    """The estimated total at the full recipes."""
    correction: float = 1.0
    done: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return self.spent + sum(self.estimates.values())

    def reduced(self) -> list[str]:
        """What the plan lowers, one phrase each, in the order of sacrifice."""
        return _reduced(self.full, self.settings, _active(self.work))

    def to_json(self) -> dict[str, Any]:
        return {
            "budget_seconds": round(self.budget, 1),
            "spent_seconds": round(self.spent, 1),
            "step_seconds": round(self.work.step_seconds, 3),
            "reference": self.work.reference,
            "correction": round(self.correction, 3),
            "fits": self.fits,
            "estimated_seconds": round(self.total, 1),
            "minimum_seconds": round(self.minimum, 1),
            "full_seconds": round(self.full_total, 1),
            "stages": {k: round(v, 1) for k, v in self.estimates.items()},
            "settings": asdict(self.settings),
            "full": asdict(self.full),
            "reduced": self.reduced(),
            "done": list(self.done),
        }


def train_floor(full_steps: int) -> int:
    """The fewest steps a training stage is cut to: a fifth of ``full_steps``, at least
    :data:`MIN_TRAIN_STEPS`, never more than ``full_steps`` (module docstring)."""
    return min(full_steps, max(MIN_TRAIN_STEPS, math.ceil(TRAIN_FLOOR_FRACTION * full_steps)))


def floor_settings(full: Settings) -> Settings:
    """Every setting at its floor (never above its full value)."""
    values = {name: min(getattr(full, name), FLOORS[name]) for name in FLOORS}
    return replace(
        full, train_steps=train_floor(full.train_steps), distil_steps=train_floor(full.distil_steps), **values
    )


def _probes(bands: int) -> int:
    return _ROLES * bands + 1


def estimate(work: Work, s: Settings, correction: float = 1.0) -> dict[str, float]:
    """Seconds each stage is expected to take with settings ``s`` (every stage, done or not).

    The training stage costs its steps at the measured ``step_seconds`` plus its overhead; every other
    stage its :data:`REFERENCE` cost in steps, times ``correction`` (:func:`correction`)."""
    u, r = work.step_seconds, REFERENCE[work.reference]
    ref = u * correction
    out = {"train": work.train_overhead + s.train_steps * u}
    if work.student:
        samples = min(s.prune_samples, work.train_conversations or s.prune_samples)
        out["prune"] = ref * r.prune_pass * samples * work.prune_passes
        out["distil"] = ref * (r.distil_fixed + r.distil_step * s.distil_steps)
    if work.autoquants:
        val = work.val_conversations or s.aq_limit
        limit = min(s.aq_limit, val)
        probe = min(s.aq_probe_conversations, limit)
        share = (
            _AQ_FIXED
            + _AQ_IMATRIX * s.aq_imatrix_tokens / AQ_FULL["imatrix_tokens"]
            + _AQ_CALIBRATION * limit / min(AQ_FULL["limit"], val)
            + _AQ_PROBES
            * _probes(s.aq_bands)
            / _probes(AQ_FULL["bands"])
            * (0.2 + 0.8 * probe / min(AQ_FULL["probe_conversations"], val))
        )
        out["autoquant"] = ref * r.autoquant * share * work.autoquants
    out["parity"] = ref * r.parity
    if work.quantize:
        out["other"] = ref * r.other
    replies = work.systems * (s.runs * s.n_prompts + s.max_quality)
    processes = work.systems * s.runs + (s.runs if work.lstm else 0)
    out["measure"] = (
        ref
        * (
            (r.lstm if work.lstm else 0.0)
            + r.generation * replies
            + r.bits_per_byte * work.systems
            + r.load * processes
        )
        + PROCESS_SECONDS * processes
    )
    return out


_CORRECTED = ("prune", "distil", "autoquant")
"""The heavy stages estimated from :data:`REFERENCE` (the small ones are mostly constant overheads)."""


def correction(planned: dict[str, float], actual: dict[str, float]) -> float:
    """How far off the reference costs were on this machine: actual over planned seconds of the heavy
    stages estimated from :data:`REFERENCE` that have run (pruning, distillation, auto-quant; the training
    stage is measured), within [0.25, 4]; 1 before any has run."""
    keys = [k for k in actual if k in planned and k in _CORRECTED and planned[k] > 0]
    p, a = sum(planned[k] for k in keys), sum(actual[k] for k in keys)
    if p < 1e-9 or a <= 0:
        return 1.0
    return min(4.0, max(0.25, a / p))


def _remaining(work: Work, s: Settings, done: tuple[str, ...], c: float) -> dict[str, float]:
    return {k: v for k, v in estimate(work, s, c).items() if k not in done}


def plan_budget(
    budget: float,
    spent: float,
    work: Work,
    full: Settings,
    *,
    current: Settings | None = None,
    done: tuple[str, ...] = (),
    correction: float = 1.0,
) -> BudgetPlan:
    """The settings that fit ``budget`` seconds (``spent`` already gone) with the least sacrifice.

    ``full``: the settings of the full recipes; ``done``: stages already run (their settings stay those of
    ``current``, their time is in ``spent``); ``correction``: :func:`correction`. Settings are lowered in
    the order of :data:`SACRIFICE`, one rung at a time (halving, down to :data:`FLOORS`), then training
    steps (the same fraction of each training stage still to run, down to :func:`train_floor`). A plan
    that does not fit even at the floors has ``fits=False`` and every setting at its floor."""
    floor = floor_settings(full)
    current = current or full
    fixed = {n: getattr(current, n) for n, st in _STAGE_OF.items() if st in done}
    s = replace(full, **fixed)
    lowest = replace(floor, **fixed)
    active = _active(work)

    def total(x: Settings) -> float:
        return spent + sum(_remaining(work, x, done, correction).values())

    for name in SACRIFICE:
        if _STAGE_OF[name] in done or _STAGE_OF[name] not in active:
            continue
        for value in _ladder(getattr(full, name), getattr(floor, name)):
            if total(s) <= budget:
                break
            s = replace(s, **{name: value})
    training = [
        n for n in ("train_steps", "distil_steps") if _STAGE_OF[n] not in done and _STAGE_OF[n] in active
    ]
    if total(s) > budget and training:
        s = _fit_training(s, training, floor, budget, total)
    fits = total(s) <= budget
    if not fits:
        s = lowest
    return BudgetPlan(
        budget=budget, spent=spent, work=work, full=full, settings=s,
        estimates=_remaining(work, s, done, correction), fits=fits, minimum=total(lowest),
        full_total=total(replace(full, **fixed)), correction=correction, done=tuple(done),
    )  # fmt: skip


def _active(work: Work) -> set[str]:
    stages = {"train", "parity", "measure", "other"}
    if work.student:
        stages |= {"prune", "distil"}
    if work.autoquants:
        stages.add("autoquant")
    return stages


def _ladder(full: int, floor: int) -> list[int]:
    """The rungs below ``full``: halving, down to ``floor`` (e.g. 40 -> 20, 10; 3 -> 2, 1)."""
    out, v = [], full
    while v > floor:
        v = max(floor, math.ceil(v / 2))
        out.append(v)
    return out


def _fit_training(s: Settings, names: list[str], floor: Settings, budget: float, total: Any) -> Settings:
    """The largest common fraction of the training steps ``names`` that fits (each at least its floor):
    bisection on the fraction (the estimate grows with it)."""

    def at(f: float) -> Settings:
        return replace(s, **{n: max(getattr(floor, n), math.floor(f * getattr(s, n))) for n in names})

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if total(at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return at(lo)


# --------------------------------------------------------------------------------------------- durations

_UNITS = {
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
}  # fmt: skip
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.I)


def parse_duration(text: str | int | float, what: str = "--time-budget") -> float:
    """Seconds from ``25`` (minutes), ``25m``, ``90s``, ``1h``, ``1h30m``, ``1.5h``; an
    :class:`~gguf_factory.errors.InputError` naming ``what`` otherwise."""
    example = "(examples: 25 = 25 minutes, 25m, 90s, 1h30m)"
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        s, pos, seconds, parts = str(text).strip(), 0, 0.0, []
        while pos < len(s):
            m = _PART.match(s, pos)
            if not m or m.end() == pos:
                raise InputError(f"{what}: cannot read {text!r} as a duration {example}")
            parts.append((float(m.group(1)), m.group(2).lower()))
            pos = m.end()
        if not parts or (len(parts) > 1 and any(not unit for _, unit in parts)):
            raise InputError(f"{what}: cannot read {text!r} as a duration {example}")
        for value, unit in parts:
            if unit and unit not in _UNITS:
                raise InputError(f"{what}: unknown unit {unit!r} in {text!r} {example}")
            seconds += value * _UNITS[unit or "m"]
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"{what} must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``1 h 05 min``, ``25 min 00 s``, ``42 s``."""
    x = int(round(max(0.0, seconds)))
    if x >= 3600:
        return f"{x // 3600} h {x % 3600 // 60:02d} min"
    if x >= 60:
        return f"{x // 60} min {x % 60:02d} s"
    return f"{x} s"


@dataclass
class BudgetLog:
    """The plans of one budgeted demo run and the seconds each stage really took (for the report)."""

    budget: float
    calibration: dict[str, Any] = field(default_factory=dict)
    plans: list[tuple[str, BudgetPlan]] = field(default_factory=list)
    """``(when, plan)``: ``start``, then ``after <stage>``."""
    actual: dict[str, float] = field(default_factory=dict)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per training stage: the steps it ran and its learning-rate schedule's total (``training.json``)."""

    @property
    def first(self) -> BudgetPlan:
        return self.plans[0][1]

    @property
    def last(self) -> BudgetPlan:
        return self.plans[-1][1]

    def planned(self) -> dict[str, float]:
        """Each stage's seconds as the plan made just before it ran expected them."""
        out: dict[str, float] = {}
        for _, plan in self.plans:
            for stage, sec in plan.estimates.items():
                out[stage] = sec  # later plans (made before the stage ran) win
        return out

    def to_json(self) -> dict[str, Any]:
        first, last = self.first, self.last
        return {
            "budget_seconds": round(self.budget, 1),
            "calibration": self.calibration,
            "reference": first.work.reference,
            "reference_machine": REFERENCE[first.work.reference].machine,
            "step_seconds": round(first.work.step_seconds, 3),
            "full": asdict(first.full),
            "applied": asdict(last.settings),
            "reduced": _reduced(first.full, last.settings, _active(last.work)),
            "planned_seconds": {k: round(v, 1) for k, v in self.planned().items()},
            "actual_seconds": {k: round(v, 1) for k, v in self.actual.items()},
            "first_estimate_seconds": round(first.total, 1),
            "minimum_seconds": round(first.minimum, 1),
            "full_seconds": round(first.full_total, 1),
            "schedules": self.schedules,
            "plans": [{"when": when, **plan.to_json()} for when, plan in self.plans],
        }


def _reduced(full: Settings, applied: Settings, active: set[str]) -> list[str]:
    out = []
    for name in ("train_steps", "distil_steps", *SACRIFICE):
        a, b = getattr(full, name), getattr(applied, name)
        if b < a and _STAGE_OF[name] in active:
            out.append(f"{LABELS[name]} {a:,} -> {b:,}")
    return out
