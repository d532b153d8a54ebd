"""``gguf-factory demo --time-budget``: the planner on plain numbers, the training schedule planned for the
cut step count, the option's parsing through the real command, and one real budgeted demo on the tiny
model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.demo_budget import (
    AQ_FULL,
    FLOORS,
    SACRIFICE,
    BudgetError,
    Settings,
    Work,
    correction,
    estimate,
    format_duration,
    parse_duration,
    plan_budget,
    train_floor,
)
from gguf_factory.errors import FactoryError, InputError

# the demo's full recipes on SmolLM2-135M and the chatterbot corpus
FULL = Settings(
    train_steps=90, distil_steps=90, prune_samples=256, aq_limit=64, aq_imatrix_tokens=16384,
    aq_probe_conversations=16, aq_bands=3, runs=3, n_prompts=5, max_quality=40,
)  # fmt: skip
# the slow reference machine (2-core AMD EPYC, AVX2): 12.42 s per fine-tune step
SLOW = Work(
    step_seconds=12.42, reference="fp32", train_overhead=30.0, prune_passes=31, train_conversations=718,
    val_conversations=90, student=True, autoquants=1, systems=7, lstm=True,
)  # fmt: skip


def test_the_reference_run_is_reproduced_by_the_cost_model() -> None:
    # benchmarks/results/demo.json: 5055 s in all on that machine, fine-tune 1118, measure 937
    est = estimate(SLOW, FULL)
    assert sum(est.values()) == pytest.approx(5055, rel=0.05)
    assert est["prune"] == pytest.approx(965.5, rel=0.02) and est["distil"] == pytest.approx(1112, rel=0.02)
    assert est["autoquant"] == pytest.approx(850, rel=0.02) and est["measure"] == pytest.approx(937, rel=0.05)


def test_a_budget_the_full_recipes_fit_changes_nothing() -> None:
    plan = plan_budget(100 * 60, 30.0, SLOW, FULL)
    assert plan.fits and plan.settings == FULL and plan.reduced() == []
    assert plan.total <= plan.budget


def test_25_minutes_on_the_slow_machine_cuts_training_last_and_fits() -> None:
    plan = plan_budget(25 * 60, 50.0, SLOW, FULL)
    s = plan.settings
    assert plan.fits and plan.total <= 25 * 60
    # training was cut, so everything before it in the order of sacrifice is at its floor
    assert train_floor(90) <= s.train_steps < 90 and train_floor(90) <= s.distil_steps < 90
    for name in SACRIFICE:
        assert getattr(s, name) == FLOORS[name], name
    assert plan.reduced()[:2] == [
        f"training steps 90 -> {s.train_steps}",
        f"distillation steps 90 -> {s.distil_steps}",
    ]


def test_settings_are_lowered_in_the_order_of_sacrifice() -> None:
    order = list(SACRIFICE)
    for minutes in range(85, 20, -1):
        plan = plan_budget(minutes * 60, 50.0, SLOW, FULL)
        if not plan.fits:
            break
        s = plan.settings
        lowered = [n for n in order if getattr(s, n) < getattr(FULL, n)]
        if lowered:  # every setting before the last one lowered is at its floor
            last = order.index(lowered[-1])
            assert all(getattr(s, n) == FLOORS[n] for n in order[:last]), (minutes, s)
        if s.train_steps < FULL.train_steps:
            assert all(getattr(s, n) == FLOORS[n] for n in order), (minutes, s)
    # a budget just below the full estimate only touches the measurement's repeats
    first = plan_budget(estimate_total(SLOW, FULL) + 50.0 - 40, 50.0, SLOW, FULL)
    assert first.fits and first.settings == replace(FULL, runs=2)


def estimate_total(work: Work, s: Settings) -> float:
    return sum(estimate(work, s).values())


def test_below_the_floors_it_does_not_fit_and_names_the_minimum() -> None:
    plan = plan_budget(10 * 60, 50.0, SLOW, FULL)
    assert not plan.fits
    assert plan.minimum > 10 * 60 and plan.full_total > plan.minimum
    assert plan.settings.train_steps == train_floor(90) == 18
    assert all(getattr(plan.settings, n) == FLOORS[n] for n in SACRIFICE)
    assert plan.minimum == pytest.approx(plan.total)


def test_a_stage_that_ran_long_shrinks_the_later_ones() -> None:
    start = plan_budget(30 * 60, 50.0, SLOW, FULL)
    planned_train = start.estimates["train"]
    on_time = plan_budget(30 * 60, 50.0 + planned_train, SLOW, FULL, current=start.settings, done=("train",))
    late = plan_budget(
        30 * 60, 50.0 + 1.3 * planned_train, SLOW, FULL, current=start.settings, done=("train",)
    )
    # the fine-tune's steps stay what it trained; the distillation pays for the overrun
    assert on_time.settings.train_steps == late.settings.train_steps == start.settings.train_steps
    assert late.settings.distil_steps < on_time.settings.distil_steps
    assert late.total <= 30 * 60
    # a stage that ran short gives time back, up to the full recipe
    early = plan_budget(
        30 * 60, 50.0 + 0.2 * planned_train, SLOW, FULL, current=start.settings, done=("train",)
    )
    assert early.settings.distil_steps > on_time.settings.distil_steps


def test_the_correction_scales_the_reference_costs() -> None:
    assert correction({"prune": 100.0, "train": 50.0}, {"prune": 150.0, "train": 500.0}) == pytest.approx(1.5)
    assert correction({"prune": 100.0}, {}) == 1.0
    assert correction({"prune": 10.0}, {"prune": 1000.0}) == 4.0
    slower = plan_budget(30 * 60, 50.0, SLOW, FULL, correction=1.5)
    assert slower.settings.train_steps < plan_budget(30 * 60, 50.0, SLOW, FULL).settings.train_steps
    assert estimate(SLOW, FULL, 2.0)["train"] == estimate(SLOW, FULL)["train"]  # measured, not scaled


def test_no_student_no_pruning_or_distillation_costs() -> None:
    work = replace(SLOW, student=False, autoquants=0, systems=6)
    est = estimate(work, FULL)
    assert "prune" not in est and "distil" not in est and "autoquant" not in est
    plan = plan_budget(30 * 60, 50.0, work, FULL)
    assert plan.fits and plan.settings.distil_steps == FULL.distil_steps  # not a stage: nothing to cut
    assert not any("distillation" in r for r in plan.reduced())


def test_train_floor() -> None:
    assert train_floor(90) == 18 and train_floor(30) == 8 and train_floor(5) == 5 and train_floor(1000) == 200


def test_full_autoquant_settings_are_autoquants_own() -> None:
    import importlib
    import inspect

    from gguf_factory.prune import DEFAULT_SAMPLES

    aq = importlib.import_module("gguf_factory.autoquant")
    assert AQ_FULL == {
        "limit": inspect.signature(aq.autoquant).parameters["limit"].default,
        "imatrix_tokens": aq.FAST_IMATRIX_TOKENS,
        "probe_conversations": aq.FAST_PROBE_CONVERSATIONS,
        "bands": aq.FAST_BANDS,
    }
    assert DEFAULT_SAMPLES == 256


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("25", 1500),
        ("25m", 1500),
        ("25 min", 1500),
        ("1h", 3600),
        ("1h30m", 5400),
        ("90s", 90),
        ("1.5h", 5400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "0", "-5", "5x", "1h 30", "", "m"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(InputError, match="--time-budget"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(42) == "42 s" and format_duration(1500) == "25 min 00 s"
    assert format_duration(3900) == "1 h 05 min"


def test_budget_error_is_a_usage_error() -> None:
    assert issubclass(BudgetError, FactoryError) and BudgetError.exit_code == 2


@pytest.mark.parametrize("value", ["soon", "0"])
def test_cli_refuses_a_bad_time_budget_in_one_line(tmp_path: Path, value: str) -> None:
    proc = run_cli("demo", "-o", str(tmp_path / "out"), "--time-budget", value)
    assert_one_line_error(proc, "--time-budget")
    assert not (tmp_path / "out").exists()


def test_api_refuses_a_bad_time_budget_before_any_work(tmp_path: Path) -> None:
    from gguf_factory.demo import run_demo

    for bad in (0, -1.0, float("nan"), "25m"):
        with pytest.raises(InputError, match="time_budget"):
            run_demo(tmp_path / "out", time_budget=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_max_steps_plans_the_schedule_for_the_cut_run(tmp_path: Path) -> None:
    """``max_steps`` below the epochs' steps: the scheduler's total is max_steps (warm-up and cosine decay
    over the cut run, ending at the floor learning rate), and training stops there."""
    from gguf_factory.train import train
    from test_train import write_dataset
    from test_train_engine import TINY

    data = write_dataset(tmp_path / "ds")  # 48 conversations: 12 steps of 4 per epoch, 36 in 3 epochs
    r = train(data, tmp_path / "m", preset=TINY, epochs=3, max_steps=7, threads=1, progress=False)
    record = json.loads((tmp_path / "m" / "training.json").read_text())
    sched = record["schedule"]
    assert r.steps == record["steps"] == 7 and record["settings"]["max_steps"] == 7
    assert sched["steps_per_epoch"] == 12 and sched["total_steps"] == 7
    assert sched["warmup_steps"] == 1  # 5 % of 7, at least one
    assert sched["final_lr"] == pytest.approx(TINY.lr * 0.1)  # decayed to the floor: not cut mid-way
    whole = train(data, tmp_path / "w", preset=TINY, epochs=3, threads=1, progress=False)
    assert json.loads((tmp_path / "w" / "training.json").read_text())["schedule"]["total_steps"] == 36
    assert whole.steps == 36


@pytest.mark.slow
def test_budgeted_demo_applies_its_plan(tiny_hf_model: Path, tmp_path: Path) -> None:
    """The real demo on the tiny model: a budget below the least it can do is refused before the heavy
    work, naming the minimum; a budget between that and the full recipes' estimate trains fewer steps with
    a schedule planned for them, and the report says so."""
    from conftest import TINY_CATEGORIES
    from gguf_factory.demo import FinetuneRecipe, StudentRecipe, run_demo

    out = tmp_path / "out"
    kw = dict(
        base=str(tiny_hf_model), categories=TINY_CATEGORIES, runs=1, n_prompts=2, max_quality=4,
        max_size="10MB", lstm=False,
        # many small steps: training is most of the time the plan can cut
        finetune=FinetuneRecipe(epochs=30, lr=1e-3, batch_size=2),
        student=StudentRecipe(vocab_size=400, ffn=0.5, layers=0.0, epochs=1, lr=1e-3, always=True),
    )  # fmt: skip
    with pytest.raises(BudgetError, match=r"--time-budget.*the least it can do is estimated at") as e:
        run_demo(out, time_budget=1.0, **kw)
    err = e.value
    assert err.minimum > 1.0 and err.full > err.minimum
    assert not (out / "sub-ai-tiny-hf").exists() and not list(out.glob("*.gguf"))  # no heavy work done
    full_steps = err.plan.full.train_steps
    n_train = len((out / "data" / "train.jsonl").read_text().splitlines())
    assert full_steps == 30 * -(-n_train // 2) and err.plan.settings.train_steps == train_floor(full_steps)

    # halfway between the floor and the whole recipe of training steps
    u = err.plan.work.step_seconds
    budget = err.minimum + 0.5 * (full_steps - train_floor(full_steps)) * u
    r = run_demo(out, time_budget=budget, **kw)
    b = r.budget
    assert b is not None and b["budget_seconds"] == pytest.approx(budget, abs=0.1)
    trained = b["applied"]["train_steps"]
    assert train_floor(full_steps) <= trained < full_steps
    assert b["reduced"][0] == f"training steps {full_steps:,} -> {trained:,}"
    record = json.loads((r.model_dir / "training.json").read_text())
    assert record["settings"]["max_steps"] == trained
    assert record["schedule"]["total_steps"] == trained  # the schedule was planned for the cut run
    assert record["steps"] <= trained  # early stopping (the recipe's patience) may end it sooner
    if record["steps"] == trained:
        assert record["schedule"]["final_lr"] == pytest.approx(1e-3 * 0.1)
    assert b["schedules"]["train"]["total_steps"] == trained
    assert [w for w, *_ in [(p["when"],) for p in b["plans"]]][0] == "start" and len(b["plans"]) >= 4
    assert {"train", "measure", "parity"} <= set(b["actual_seconds"]) and "calibrate" in b["actual_seconds"]
    report = json.loads((r.out_dir / "demo-report.json").read_text())
    assert report["time_budget"]["applied"]["train_steps"] == trained
    md = (r.out_dir / "demo-report.md").read_text()
    assert "## Time budget" in md and f"training steps {full_steps:,} -> {trained:,}" in md
    assert "| fine-tune (or train) |" in md
