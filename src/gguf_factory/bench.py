"""Measure chat models in fresh processes: file size, load time, first-token latency, tokens/s, peak RSS.

Each measurement runs in a fresh Python process that imports only what the system needs (llama-cpp-python
for a GGUF, no torch), so the peak RSS is what a chat process needs, not what this tool has loaded.
:func:`run_bench` compares the original Hugging Face model (transformers), its GGUFs (llama.cpp) and a
Bi-LSTM seq2seq baseline on the same held-out prompts, speed and reply quality, and writes a report. Its
one figure that compares any two of them whatever their tokenizers is bits per byte of the held-out
reference replies (:func:`gguf_factory.evaluate.bits_per_byte`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FactoryError
from .files import human_size, require_dir, require_file

if TYPE_CHECKING:  # not imported at run time: the measuring child imports only what a system needs
    from rich.table import Table

    from .data import Conversation
    from .scoring import BitsPerByte

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    """Medians over ``runs`` fresh processes (each answering every prompt)."""

    name: str
    path: str
    size_bytes: int
    load_s: float
    first_token_ms: float
    tokens_per_s: float
    peak_rss_mb: float
    runs: int
    answers: list[dict[str, str]] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    kind: str = "gguf"
    """``gguf`` (llama.cpp), ``hf`` (transformers) or ``lstm`` (the seq2seq baseline)."""
    quality_replies: list[str] = field(default_factory=list)
    """Greedy replies to the quality prompts, when :func:`measure` was given some."""
    n_ctx: int | None = None
    """The context the system was loaded with (GGUFs: the file's recommended context, else the default);
    llama.cpp's KV cache, a large part of the peak RSS, grows with it."""

    def to_json(self) -> dict:
        return asdict(self)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    On Linux it is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this program's own memory
    map, which starts afresh at exec. ``getrusage``'s ``ru_maxrss`` would not do there: Linux carries it
    over from the parent's forked copy, so a child of a big process (e.g. one that just trained a model)
    would report the parent's size. Elsewhere ``ru_maxrss`` (KiB on Linux/BSD, bytes on macOS).
    """
    import resource

    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


KINDS = ("gguf", "hf", "lstm")


class _Replier:
    """One system in the measuring child: prompt -> token ids as generated -> text."""

    def __init__(self, path: str, kind: str, threads: int):
        self.kind = kind
        if kind == "lstm":
            from .baseline.lstm import load_lstm

            self.model: Any = load_lstm(path, threads=threads)
        else:
            from .runtime import load

            backend = "transformers" if kind == "hf" else "llama.cpp"
            self.model = load(path, backend=backend, threads=threads)

    def prepare(self, prompt: str) -> Any:
        if self.kind == "lstm":
            return prompt
        return self.model.prompt_ids([{"role": "user", "content": prompt}])

    def tokens(self, prepared: Any, max_tokens: int) -> Iterator[int]:
        if self.kind == "lstm":
            return self.model.generate_tokens(prepared, max_tokens=max_tokens)
        from .runtime import GenerationSettings

        # greedy, with the repeat penalty `chat` uses, so the answers shown are the ones a user gets
        return self.model.generate_tokens(
            prepared, max_tokens=max_tokens, temperature=0.0, repeat_penalty=GenerationSettings.repeat_penalty
        )

    def text(self, ids: list[int]) -> str:
        return self.model.detokenize(ids).strip()


def _measure_in_this_process(
    path: str,
    prompts: list[str],
    max_tokens: int,
    threads: int,
    kind: str = "gguf",
    quality_prompts: Sequence[str] = (),
) -> dict:
    """Runs in the child: load, then answer each prompt greedily token by token with exact timing."""
    t0 = time.perf_counter()
    system = _Replier(path, kind, threads)
    load_s = time.perf_counter() - t0
    first_ms: list[float] = []
    rates: list[float] = []
    answers = []
    for prompt in prompts:
        prepared = system.prepare(prompt)
        out: list[int] = []
        start = time.perf_counter()
        t_first = t_last = start
        for tok in system.tokens(prepared, max_tokens):
            now = time.perf_counter()
            if not out:
                t_first = now
            t_last = now
            out.append(tok)
        if not out:  # an immediate end of reply: its end token was the first token
            t_first = time.perf_counter()
        first_ms.append((t_first - start) * 1000)
        if len(out) > 1 and t_last > t_first:
            rates.append((len(out) - 1) / (t_last - t_first))
        answers.append({"prompt": prompt, "reply": system.text(out)})
    rss = peak_rss_bytes()
    quality = [system.text(list(system.tokens(system.prepare(p), max_tokens))) for p in quality_prompts]
    system.model.close()
    return {
        "load_s": load_s,
        "first_token_ms": statistics.median(first_ms),
        "tokens_per_s": statistics.median(rates) if rates else 0.0,
        "peak_rss_mb": rss / 2**20,
        "n_ctx": getattr(system.model, "n_ctx", None),
        "answers": answers,
        "quality_replies": quality,
    }


def system_size(path: Path) -> int:
    """Bytes on disk of what a system loads: the file, or every file of its folder (weights, tokenizer...)."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )


def measure(
    path: str | os.PathLike[str],
    prompts: Sequence[str],
    *,
    runs: int = 3,
    max_tokens: int = 48,
    threads: int | None = None,
    name: str | None = None,
    kind: str = "gguf",
    quality_prompts: Sequence[str] = (),
) -> BenchRow:
    """Run ``runs`` fresh processes on ``path`` and return the medians.

    ``kind``: ``gguf`` (a GGUF file in llama.cpp), ``hf`` (a Hugging Face model folder in transformers) or
    ``lstm`` (a folder written by :func:`gguf_factory.baseline.lstm.train_lstm`). The first run also
    answers ``quality_prompts`` (after the peak RSS is read), for :attr:`BenchRow.quality_replies`.
    """
    if kind not in KINDS:
        raise FactoryError(f"unknown system kind {kind!r}: choose one of {', '.join(KINDS)}")
    p = require_file(path, "model file") if kind == "gguf" else require_dir(path, "model folder")
    if not prompts:
        raise FactoryError("bench needs at least one prompt")
    if runs < 1:
        raise FactoryError(f"runs must be at least 1, got {runs}")
    threads = threads or os.cpu_count() or 1
    results = []
    for i in range(runs):
        payload = json.dumps(
            {
                "path": str(p),
                "prompts": list(prompts),
                "max_tokens": max_tokens,
                "threads": threads,
                "kind": kind,
                "quality_prompts": list(quality_prompts) if i == 0 else [],
            }
        )
        proc = subprocess.run(
            [sys.executable, "-m", "gguf_factory.bench", payload],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise FactoryError(f"benchmark of {p} failed: {last}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = ("load_s", "first_token_ms", "tokens_per_s", "peak_rss_mb")
    samples = {k: [r[k] for r in results] for k in keys}
    return BenchRow(
        name=name or (p.stem if kind == "gguf" else p.name),
        path=str(p),
        size_bytes=system_size(p),
        runs=runs,
        answers=results[0]["answers"],
        samples=samples,
        kind=kind,
        quality_replies=results[0]["quality_replies"],
        n_ctx=results[0].get("n_ctx"),
        **{k: statistics.median(v) for k, v in samples.items()},
    )


def render_table(rows: Sequence[BenchRow], title: str = "GGUF models in llama.cpp") -> Table:
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "file size", "load", "first token", "tokens/s", "peak RSS"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r.name,
            human_size(r.size_bytes),
            f"{r.load_s * 1000:.0f} ms",
            f"{r.first_token_ms:.1f} ms",
            f"{r.tokens_per_s:.0f}",
            f"{r.peak_rss_mb:.0f} MB",
        )
    return table


def rows_markdown(rows: Sequence[BenchRow]) -> str:
    lines = [
        "| model | file size | load | first token | tokens/s | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {human_size(r.size_bytes)} | {r.load_s * 1000:.0f} ms | {r.first_token_ms:.1f} ms "
            f"| {r.tokens_per_s:.0f} | {r.peak_rss_mb:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- comparison

SEED_TARGETS = {"size_mb": 50.0, "first_token_ms": 100.0, "peak_rss_mb": 200.0}
"""The seed's targets for a GGUF (benchmarks/seed_targets.py): file < 50 MB, first token < 100 ms,
peak RSS < 200 MB."""
KIND_LABELS = {"hf": "transformers", "gguf": "llama.cpp", "lstm": "Bi-LSTM seq2seq"}
REPORT_NAME = "bench-report"


@dataclass
class SystemScores:
    """One system of a comparison: its speed row, the quality of its held-out replies, its seed targets."""

    row: BenchRow
    known_word_rate: float
    on_topic: float
    similarity: float
    """Mean reply similarity to the reference answers (``evaluate.similarity``, 1.0 = identical)."""
    targets: dict[str, bool] | None = None
    """GGUFs only: figure -> below its :data:`SEED_TARGETS` value."""
    bits_per_byte: BitsPerByte | None = None
    """Bits per byte of the held-out reference replies, teacher-forced (lower is better)."""

    @property
    def bpb(self) -> float | None:
        return self.bits_per_byte.bpb if self.bits_per_byte is not None else None

    @property
    def figures(self) -> dict[str, float]:
        r = self.row
        return {
            "size_mb": r.size_bytes / 1e6,
            "first_token_ms": r.first_token_ms,
            "peak_rss_mb": r.peak_rss_mb,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.row.name, "kind": self.row.kind, "engine": KIND_LABELS[self.row.kind],
            "figures": self.figures, "known_word_rate": self.known_word_rate, "on_topic": self.on_topic,
            "similarity": self.similarity, "bits_per_byte": self.bpb,
            "bits_per_byte_detail": asdict(self.bits_per_byte) if self.bits_per_byte else None,
            "seed_targets": self.targets, "measurement": self.row.to_json(),
        }  # fmt: skip


@dataclass
class BenchReport:
    out_dir: Path
    json_path: Path
    md_path: Path
    png_path: Path
    systems: list[SystemScores]
    reference_on_topic: float
    chance_on_topic: float
    prompts: list[tuple[str, str]]
    """The timing prompts and their reference answers."""
    n_quality: int
    lstm_training: dict[str, Any] | None = None
    seconds: float = 0.0


def _check_gguf(path: Path) -> Path:
    from .errors import ModelError

    p = require_file(path, "GGUF file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"not a GGUF file: {p}")
    return p


def _check_hf_dir(path: Path) -> Path:
    from .errors import ModelError

    d = require_dir(path, "Hugging Face model folder")
    if not (d / "config.json").is_file():
        raise ModelError(f"{d} is not a Hugging Face model folder: no config.json")
    return d


def run_bench(
    ggufs: Sequence[str | os.PathLike[str]],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hf: str | os.PathLike[str] | None = None,
    others: Sequence[str | os.PathLike[str]] = (),
    lstm: str | os.PathLike[str] | None = None,
    train_lstm: bool = False,
    lstm_config: Any = None,
    runs: int = 3,
    n_prompts: int = 8,
    max_tokens: int = 48,
    max_quality: int | None = None,
    threads: int | None = None,
) -> BenchReport:
    """Measure the HF model, its GGUFs and an LSTM baseline on the same held-out prompts; write a report.

    Every system runs in fresh processes (``runs`` of them; medians) answering the same ``n_prompts``
    held-out prompts greedily, then answers the first user turn of every held-out conversation of
    ``data_dir``'s test split (at most ``max_quality``) for the quality figures of ``replies`` (known-word
    and on-topic rates) and the mean similarity to the reference answers; and scores the reference replies
    of every held-out conversation teacher-forced, in bits per byte
    (:func:`gguf_factory.evaluate.bits_per_byte`, in this process; the LSTM's charges fitted on
    ``data_dir``'s train split). ``train_lstm`` trains the
    baseline on ``data_dir`` into ``out_dir/lstm``; ``lstm`` uses an already trained one. ``others``: GGUFs
    of other models measured alongside (a base before fine-tuning, a student with its own vocabulary), which
    skip the check that ``ggufs`` share the HF model's tokenizer. Writes
    ``bench-report.json``, ``.md`` and ``.png`` into ``out_dir`` (created; its parent must exist).
    """
    from .files import prepare_output_dir
    from .replies import held_out_prompts

    t0 = time.perf_counter()
    hf_dir, gguf_paths, other_paths = _check_bench_inputs(
        ggufs, hf, others, lstm, train_lstm, out_dir, n_prompts, max_tokens
    )
    lstm_dir = Path(lstm) if lstm is not None else None
    if lstm_dir is not None:
        from .baseline.lstm import load_lstm

        load_lstm(lstm_dir, threads=1)  # a bad folder fails here, before any measurement
    splits, held_out = _held_out_conversations(data_dir, max_quality)
    test_path = Path(data_dir) / "test.jsonl"
    prompts = held_out_prompts(test_path, n_prompts)
    if hf_dir is not None and gguf_paths:  # every GGUF must be this model's: same tokenizer
        _check_same_tokenizer(hf_dir, gguf_paths, held_out)

    out = prepare_output_dir(out_dir)
    lstm_training = None
    if train_lstm:
        from .baseline.lstm import train_lstm as train_baseline

        log.info("training the Bi-LSTM seq2seq baseline on %s", data_dir)
        result = train_baseline(data_dir, out / "lstm", config=lstm_config, threads=threads)
        lstm_dir = result.path
        lstm_training = asdict(result) | {"path": str(result.path)}

    systems: list[tuple[Path, str]] = []
    if hf_dir is not None:
        systems.append((hf_dir, "hf"))
    systems += [(g, "gguf") for g in other_paths + gguf_paths]
    if lstm_dir is not None:
        systems.append((lstm_dir, "lstm"))
    scored, reference_rate, chance_rate = _score_systems(
        systems,
        splits["train"],
        held_out,
        prompts,
        test_path,
        runs=runs,
        max_tokens=max_tokens,
        threads=threads,
        trained_lstm=train_lstm,
    )

    report = BenchReport(
        out_dir=out,
        json_path=out / f"{REPORT_NAME}.json",
        md_path=out / f"{REPORT_NAME}.md",
        png_path=out / f"{REPORT_NAME}.png",
        systems=scored,
        reference_on_topic=reference_rate,
        chance_on_topic=chance_rate,
        prompts=prompts,
        n_quality=len(held_out),
        lstm_training=lstm_training,
    )
    report.seconds = time.perf_counter() - t0
    settings = {"runs": runs, "prompts": len(prompts), "max_tokens": max_tokens, "threads": threads}
    _write_report(report, data_dir, settings)
    return report


def _check_bench_inputs(
    ggufs: Sequence[str | os.PathLike[str]],
    hf: str | os.PathLike[str] | None,
    others: Sequence[str | os.PathLike[str]],
    lstm: str | os.PathLike[str] | None,
    train_lstm: bool,
    out_dir: str | os.PathLike[str],
    n_prompts: int,
    max_tokens: int,
) -> tuple[Path | None, list[Path], list[Path]]:
    """Refuse contradictory or empty settings and unusable inputs before any work; returns the HF model
    folder (if any), the GGUFs of that model and the other GGUFs."""
    from .bases import resolve_path
    from .errors import InputError
    from .files import check_output_dir

    if lstm is not None and train_lstm:
        raise InputError("give --lstm DIR or --train-lstm, not both")
    if hf is None and not ggufs and lstm is None and not train_lstm:
        raise InputError("nothing to benchmark: give a Hugging Face model (--hf), GGUF files or an LSTM")
    if n_prompts < 1 or max_tokens < 1:
        raise InputError("the number of prompts and max_tokens must be at least 1")
    check_output_dir(out_dir)
    hf_dir = _check_hf_dir(resolve_path(hf, what="--hf model")) if hf is not None else None
    gguf_paths = [_check_gguf(Path(g)) for g in ggufs]
    other_paths = [_check_gguf(Path(g)) for g in others]
    if len({p.resolve() for p in gguf_paths + other_paths}) != len(gguf_paths) + len(other_paths):
        raise InputError("the same GGUF is given twice")
    return hf_dir, gguf_paths, other_paths


def _held_out_conversations(
    data_dir: str | os.PathLike[str], max_quality: int | None
) -> tuple[dict[str, list[Conversation]], list[Conversation]]:
    """The dataset's splits and its held-out conversations with a user turn and an answer (the first
    ``max_quality`` of them)."""
    from .data import load_dataset
    from .errors import DataError

    splits = load_dataset(data_dir)
    held_out = [
        c
        for c in splits["test"]
        if any(m.role == "user" for m in c.messages) and any(m.role == "assistant" for m in c.messages)
    ]
    if not held_out:
        raise DataError(
            f"{Path(data_dir) / 'test.jsonl'}: no held-out conversation with a user turn and an answer"
        )
    if not splits["train"]:
        raise DataError(f"{Path(data_dir) / 'train.jsonl'}: empty training split")
    return splits, held_out[:max_quality] if max_quality else held_out


def _check_same_tokenizer(hf_dir: Path, gguf_paths: Sequence[Path], held_out: Sequence[Conversation]) -> None:
    """Refuse a GGUF whose tokenizer disagrees with the HF model's on the held-out texts: another model's."""
    from .errors import InputError
    from .verify import check_tokenizer_parity

    texts = [m.content for c in held_out[:20] for m in c.messages]
    verify_log = logging.getLogger("gguf_factory.verify")
    level = verify_log.level
    verify_log.setLevel(logging.ERROR)  # the error below says it in one line
    try:
        for g in gguf_paths:
            parity = check_tokenizer_parity(g, hf_dir, texts)
            if not parity.ok:
                raise InputError(
                    f"{g} is not a GGUF of {hf_dir}: their tokenizers disagree on "
                    f"{len(parity.mismatches)} of {parity.n_checks} held-out texts and chat prompts "
                    "(another model family?)"
                )
    finally:
        verify_log.setLevel(level)


def _score_systems(
    systems: Sequence[tuple[Path, str]],
    train: Sequence[Conversation],
    held_out: Sequence[Conversation],
    prompts: Sequence[tuple[str, str]],
    test_path: Path,
    *,
    runs: int,
    max_tokens: int,
    threads: int | None,
    trained_lstm: bool,
) -> tuple[list[SystemScores], float, float]:
    """Measure each ``(path, kind)`` system and score its replies to the held-out prompts; returns the
    scores and the on-topic rates of the reference answers and of chance."""
    from .evaluate import bits_per_byte, similarity
    from .replies import score_replies

    quality_prompts = [next(m.content for m in c.messages if m.role == "user") for c in held_out]
    references = [next(m.content for m in c.messages if m.role == "assistant") for c in held_out]
    scored: list[SystemScores] = []
    reference_rate = chance_rate = 0.0
    for path, kind in systems:
        log.info("measuring %s (%s)", path, KIND_LABELS[kind])
        row = measure(
            path,
            [p for p, _ in prompts],
            runs=runs,
            max_tokens=max_tokens,
            threads=threads,
            kind=kind,
            quality_prompts=quality_prompts,
            name="lstm-seq2seq" if kind == "lstm" and trained_lstm else None,
        )
        rs = score_replies(train, held_out, row.quality_replies)
        reference_rate, chance_rate = rs.reference_domain_match, rs.chance_domain_match
        sim = statistics.fmean(similarity(r, a) for r, a in zip(row.quality_replies, references, strict=True))
        s = SystemScores(row, rs.known_word_rate, rs.domain_match, sim)
        # teacher-forced scoring is cheap: every held-out conversation, not only the answered ones
        s.bits_per_byte = bits_per_byte(path, test_path, kind=kind, threads=threads)
        if kind == "gguf":
            s.targets = {k: s.figures[k] < v for k, v in SEED_TARGETS.items()}
        scored.append(s)
    return scored, reference_rate, chance_rate


def _write_report(report: BenchReport, data_dir: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Write the report's chart, JSON and Markdown."""
    from .files import atomic_write_json, atomic_write_text

    write_chart(report, report.png_path)
    atomic_write_json(
        report.json_path,
        {
            "data": str(data_dir), "settings": settings, "cpus": os.cpu_count(), "seed_targets": SEED_TARGETS,
            "quality_prompts": report.n_quality, "reference_on_topic": report.reference_on_topic,
            "chance_on_topic": report.chance_on_topic, "systems": [s.to_json() for s in report.systems],
            "prompts": [{"prompt": p, "reference": r} for p, r in report.prompts],
            "lstm_training": report.lstm_training, "seconds": report.seconds,
        },
    )  # fmt: skip
    atomic_write_text(report.md_path, report_markdown(report, settings))


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _bpb(s: SystemScores) -> str:
    return "–" if s.bpb is None else f"{s.bpb:.3f}"


def _bpb_notes(report: BenchReport) -> list[str]:
    scored = [s.bits_per_byte for s in report.systems if s.bits_per_byte is not None]
    if not scored:
        return []
    b = scored[0]
    notes = [
        f"Bits/byte = bits the system spends on the {b.n_replies} held-out reference replies ({b.bytes} "
        "UTF-8 bytes of text), teacher-forced under its own chat template and tokenizer, end of turn "
        "included, per byte of the replies' text: comparable whatever the tokenizer, lower is better.",
    ]
    if len({(x.bytes, x.n_replies) for x in scored}) > 1:
        notes[0] += (
            " Not every system scored the same replies (a context cut some): "
            + ", ".join(
                f"{s.row.name} {s.bits_per_byte.bytes} bytes" for s in report.systems if s.bits_per_byte
            )
            + "."
        )
    for s in report.systems:
        x = s.bits_per_byte
        if x is not None and x.kind == "lstm":
            notes[0] += (
                f" The LSTM ({s.row.name}) pays for what its lower-cased words leave out: "
                f"{x.n_oov} of its {x.n_words} reply words ({x.oov_rate:.0%}) are out of its vocabulary, "
                f"each charged p(<unk>) and then its spelling ({x.oov_bits:.0f} bits in all), and "
                f"letter case and whitespace cost {x.case_space_bits:.0f} bits (gguf_factory.baseline.lstm)."
            )
    return [*notes, ""]


def _ctx(r: BenchRow) -> str:
    return f" (ctx {r.n_ctx})" if r.kind == "gguf" and r.n_ctx else ""


def report_markdown(report: BenchReport, settings: dict[str, Any]) -> str:
    threads = settings.get("threads") or os.cpu_count()
    md = [
        "# gguf-factory bench",
        "",
        f"Medians of {settings['runs']} fresh process(es) per system ({os.cpu_count()} CPU cores, {threads} "
        f"threads), each answering the same {len(report.prompts)} held-out prompts greedily (at most "
        f"{settings['max_tokens']} tokens; first token = prompt evaluation + first token). Quality: greedy "
        f"replies to the first user turn of {report.n_quality} held-out conversations.",
        "",
        "| system | engine | size | load | first token | tokens/s | peak RSS | known words | on topic "
        "| similarity | bits/byte |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report.systems:
        r = s.row
        md.append(
            f"| {r.name} | {KIND_LABELS[r.kind]} | {human_size(r.size_bytes)} | {r.load_s * 1000:.0f} ms "
            f"| {r.first_token_ms:.1f} ms | {r.tokens_per_s:.0f} | {r.peak_rss_mb:.0f} MB{_ctx(r)} "
            f"| {_pct(s.known_word_rate)} | {_pct(s.on_topic)} | {s.similarity:.2f} | {_bpb(s)} |"
        )
    md += [
        "",
        f"On topic = the nearest training answer is from the prompt's domain (`replies.py`): "
        f"{_pct(report.reference_on_topic)} for the reference answers, {_pct(report.chance_on_topic)} by "
        "chance. Similarity = character-level similarity to the reference answer (1 = identical). "
        "Size = the GGUF file, or every file of the model folder. The LSTM's tokens are words. Peak RSS of "
        "a GGUF: at the context shown (its recommended one, else the default), whose KV cache llama.cpp "
        "allocates at load.",
        "",
        *_bpb_notes(report),
    ]
    gguf = [s for s in report.systems if s.targets is not None]
    if gguf:
        md += [
            "## Seed targets (GGUF)",
            "",
            f"| GGUF | file < {SEED_TARGETS['size_mb']:.0f} MB | first token < "
            f"{SEED_TARGETS['first_token_ms']:.0f} ms | peak RSS < {SEED_TARGETS['peak_rss_mb']:.0f} MB |",
            "|---|:---:|:---:|:---:|",
        ]
        for s in gguf:
            f, t = s.figures, s.targets or {}
            cells = [
                f"{'✅ pass' if t[key] else '❌ fail'} ({f[key]:.{digits}f} {unit})"
                for key, digits, unit in (
                    ("size_mb", 2, "MB"),
                    ("first_token_ms", 1, "ms"),
                    ("peak_rss_mb", 0, "MB"),
                )
            ]
            md.append(f"| {s.row.name} | {' | '.join(cells)} |")
        md.append("")
    if report.lstm_training:
        t = report.lstm_training
        md += [
            "## LSTM baseline",
            "",
            f"Word-level Bi-LSTM encoder + LSTM decoder with attention, {t['parameters']:,} parameters, "
            f"{t['vocab_size']:,} words; trained on {t['train_pairs']} pairs for {t['epochs']} epochs "
            f"(best validation loss {t['best_val_loss']:.3f} at epoch {t['best_epoch']}) in "
            f"{t['seconds']:.0f} s.",
            "",
        ]
    md += [f"![size, speed, memory and quality]({report.png_path.name})", "", "## Replies (greedy)", ""]
    for i, (prompt, ref) in enumerate(report.prompts):
        md.append(f"- **{prompt}** _(reference: {ref})_")
        for s in report.systems:
            md.append(f"  - {s.row.name}: {s.row.answers[i]['reply']}")
    return "\n".join(md) + "\n"


def write_chart(report: BenchReport, path: Path) -> Path:
    """Bars per system: size, first token, peak RSS (seed targets dashed), tokens/s, on topic, similarity,
    bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    names = [s.row.name for s in report.systems]
    colours = {"hf": "#7f7f7f", "gguf": "#1f77b4", "lstm": "#ff7f0e"}
    bar_colours = [colours[s.row.kind] for s in report.systems]
    panels = [
        ("file size (MB)", [s.figures["size_mb"] for s in report.systems], SEED_TARGETS["size_mb"]),
        ("first token (ms)", [s.row.first_token_ms for s in report.systems], SEED_TARGETS["first_token_ms"]),
        ("peak RSS (MB)", [s.row.peak_rss_mb for s in report.systems], SEED_TARGETS["peak_rss_mb"]),
        ("tokens/s", [s.row.tokens_per_s for s in report.systems], None),
        ("on topic (%)", [100 * s.on_topic for s in report.systems], None),
        ("similarity to reference", [s.similarity for s in report.systems], None),
        (
            "bits per byte of reference replies (lower is better)",
            [s.bpb or 0.0 for s in report.systems],
            None,
        ),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    axes.flat[-1].axis("off")
    for ax, (title, values, target) in zip(axes.flat, panels, strict=False):
        bars = ax.bar(range(len(names)), values, color=bar_colours)
        ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}", fontsize=7)
        ax.set_title(title if target is None else f"{title}, GGUF seed target < {target:g}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        if target is not None and target <= 3 * max(values, default=0.0):  # else it would flatten the bars
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"seed target < {target:g}")
            ax.legend(fontsize=8)
        if title.startswith("on topic"):
            ax.axhline(
                100 * report.reference_on_topic, color="green", linestyle=":", label="reference answers"
            )
            ax.axhline(100 * report.chance_on_topic, color="black", linestyle=":", label="chance")
            ax.legend(fontsize=8)
    fig.suptitle("transformers (grey) vs llama.cpp GGUFs (blue) vs Bi-LSTM seq2seq (orange)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def render_report_table(report: BenchReport) -> Table:
    from rich.table import Table

    table = Table(title=f"bench: {len(report.prompts)} prompts for speed, {report.n_quality} for quality")
    short = {"hf": "HF", "gguf": "GGUF", "lstm": "LSTM"}
    for col in ("system", "", "size", "1st token", "tok/s", "RSS", "on topic", "sim.", "bits/B", "targets"):
        table.add_column(col, justify="left" if col in ("system", "", "targets") else "right")
    for s in report.systems:
        r = s.row
        failed = [k.split("_")[0] for k, ok in (s.targets or {}).items() if not ok]
        verdict = "" if s.targets is None else ("fail: " + ", ".join(failed) if failed else "pass")
        table.add_row(
            r.name, short[r.kind], human_size(r.size_bytes), f"{r.first_token_ms:.1f} ms",
            f"{r.tokens_per_s:.0f}", f"{r.peak_rss_mb:.0f} MB", _pct(s.on_topic), f"{s.similarity:.2f}",
            _bpb(s), verdict,
        )  # fmt: skip
    return table


if __name__ == "__main__":  # the child process of measure()
    args = json.loads(sys.argv[1])
    result = _measure_in_this_process(
        args["path"],
        args["prompts"],
        args["max_tokens"],
        args["threads"],
        args.get("kind", "gguf"),
        args.get("quality_prompts", []),
    )
    print(json.dumps(result))
