"""Measure GGUF models in llama.cpp: file size, load time, first-token latency, tokens/s, peak RSS.

Each measurement runs in a fresh Python process that imports only llama-cpp-python (no torch), so the
peak RSS is what a chat process needs, not what this tool has loaded.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from rich.table import Table

from .errors import FactoryError
from .files import human_size, require_file

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


def _measure_in_this_process(path: str, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """Runs in the child: load, then answer each prompt greedily token by token with exact timing."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from .runtime import GenerationSettings, load

    t0 = time.perf_counter()
    model = load(path, n_threads=threads)
    load_s = time.perf_counter() - t0
    llm = model.llm
    template = model.chat_template
    formatter = None
    if template:
        eos = model.detokenize([llm.token_eos()]) if llm.token_eos() >= 0 else ""
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token="")
    first_ms: list[float] = []
    rates: list[float] = []
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        text = formatter(messages=messages).prompt if formatter else prompt
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        out: list[int] = []
        start = time.perf_counter()
        t_first = t_last = start
        # greedy, with the repeat penalty `chat` uses, so the answers shown are the ones a user gets
        penalty = GenerationSettings.repeat_penalty
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=penalty):
            now = time.perf_counter()
            if not out:
                t_first = now
            t_last = now
            if model.is_end_of_generation(tok):
                break
            out.append(tok)
            if len(out) >= max_tokens:
                break
        first_ms.append((t_first - start) * 1000)
        if len(out) > 1 and t_last > t_first:
            rates.append((len(out) - 1) / (t_last - t_first))
        answers.append({"prompt": prompt, "reply": model.detokenize(out).strip()})
    rss = peak_rss_bytes()
    model.close()
    return {
        "load_s": load_s,
        "first_token_ms": statistics.median(first_ms),
        "tokens_per_s": statistics.median(rates) if rates else 0.0,
        "peak_rss_mb": rss / 2**20,
        "answers": answers,
    }


def measure(
    path: str | os.PathLike[str],
    prompts: Sequence[str],
    *,
    runs: int = 3,
    max_tokens: int = 48,
    threads: int | None = None,
    name: str | None = None,
) -> BenchRow:
    """Run ``runs`` fresh processes on ``path`` and return the medians."""
    p = require_file(path, "model file")
    if not prompts:
        raise FactoryError("bench needs at least one prompt")
    threads = threads or os.cpu_count() or 1
    payload = json.dumps(
        {"path": str(p), "prompts": list(prompts), "max_tokens": max_tokens, "threads": threads}
    )
    results = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-m", "gguf_factory.bench", payload],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise FactoryError(f"benchmark of {p} failed: {proc.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = ("load_s", "first_token_ms", "tokens_per_s", "peak_rss_mb")
    samples = {k: [r[k] for r in results] for k in keys}
    return BenchRow(
        name=name or p.stem,
        path=str(p),
        size_bytes=p.stat().st_size,
        runs=runs,
        answers=results[0]["answers"],
        samples=samples,
        **{k: statistics.median(v) for k, v in samples.items()},
    )


def render_table(rows: Sequence[BenchRow], title: str = "GGUF models in llama.cpp") -> Table:
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


if __name__ == "__main__":  # the child process of measure()
    args = json.loads(sys.argv[1])
    result = _measure_in_this_process(args["path"], args["prompts"], args["max_tokens"], args["threads"])
    print(json.dumps(result))
