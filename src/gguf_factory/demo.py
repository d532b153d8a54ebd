"""``gguf-factory demo``: the whole path on the bundled chatterbot English corpus.

prepare -> train nano -> convert F16 -> quantize Q8_0, Q5_K_M, Q4_K_M -> load each in llama.cpp, answer
held-out prompts, and report size, load time, first-token latency, tokens/s and peak RSS. Every step
writes its output atomically, so a finished step's output existing means it is complete: a re-run reuses it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bench import BenchRow, measure, rows_markdown
from .files import atomic_write_json, atomic_write_text, prepare_output_dir
from .replies import ReplyScores

log = logging.getLogger(__name__)

DEMO_NAME = "sub-ai"
DEMO_QUANTS = ("Q8_0", "Q5_K_M", "Q4_K_M")


@dataclass
class DemoResult:
    out_dir: Path
    model_dir: Path
    ggufs: dict[str, Path]
    rows: list[BenchRow]
    tokenizer_parity_ok: bool
    tokenizer_texts: int
    replies: ReplyScores | None = None
    """How the smallest GGUF's answers to every held-out prompt relate to the data (see ``replies``)."""
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0


def held_out_prompts(test_path: Path, n: int) -> list[tuple[str, str]]:
    """The first user turn and its reference answer of ``n`` held-out conversations, spread over domains."""
    from .data import load_split

    convs = load_split(test_path)
    by_domain: dict[str | None, list] = {}
    for c in convs:
        by_domain.setdefault(c.domain, []).append(c)
    picked = []
    while len(picked) < n and any(by_domain.values()):
        for domain in sorted(by_domain, key=str):
            if by_domain[domain] and len(picked) < n:
                picked.append(by_domain[domain].pop(0))
    pairs = []
    for c in picked:
        user = next(m.content for m in c.messages if m.role == "user")
        ref = next((m.content for m in c.messages if m.role == "assistant"), "")
        pairs.append((user, ref))
    return pairs


def run_demo(
    out_dir: str | Path = "gguf-factory-out",
    *,
    preset: str = "nano",
    runs: int = 3,
    n_prompts: int = 5,
    epochs: int | None = None,
    threads: int | None = None,
) -> DemoResult:
    from .convert import convert
    from .data import load_split, prepare
    from .quantize import quantize
    from .train import train
    from .verify import check_tokenizer_parity

    t0 = time.perf_counter()
    out = prepare_output_dir(out_dir)
    reused: list[str] = []
    data_dir = out / "data"
    if (data_dir / "stats.json").exists():
        reused.append("prepare")
    else:
        log.info("step 1/5: prepare the bundled chatterbot English corpus")
        prepare(None, data_dir)

    model_dir = out / f"{DEMO_NAME}-{preset}-hf"
    if (model_dir / "config.json").exists():
        reused.append("train")
    else:
        log.info("step 2/5: train the %s preset from scratch", preset)
        train(data_dir, model_dir, preset=preset, epochs=epochs, threads=threads)

    f16 = out / f"{DEMO_NAME}-{preset}-F16.gguf"
    if f16.exists():
        reused.append("convert")
    else:
        log.info("step 3/5: convert to GGUF F16")
        convert(model_dir, f16, outtype="f16", name=f"{DEMO_NAME}-{preset}")

    ggufs = {"F16": f16}
    for qtype in DEMO_QUANTS:
        q = out / f"{DEMO_NAME}-{preset}-{qtype}.gguf"
        if q.exists():
            reused.append(f"quantize {qtype}")
        else:
            log.info("step 4/5: quantize %s", qtype)
            quantize(f16, q, qtype, threads=threads)
        ggufs[qtype] = q

    log.info("step 5/5: check the tokenizer and measure each GGUF in llama.cpp")
    test_path = data_dir / "test.jsonl"
    held_out_texts = [m.content for c in load_split(test_path) for m in c.messages]
    parity = check_tokenizer_parity(f16, model_dir, held_out_texts)
    prompts = held_out_prompts(test_path, n_prompts)
    rows = [
        measure(path, [p for p, _ in prompts], runs=runs, threads=threads, name=path.stem)
        for path in ggufs.values()
    ]
    replies = score_held_out_replies(ggufs[DEMO_QUANTS[-1]], data_dir, threads=threads)
    result = DemoResult(
        out_dir=out,
        model_dir=model_dir,
        ggufs=ggufs,
        rows=rows,
        tokenizer_parity_ok=parity.ok,
        tokenizer_texts=parity.n_texts,
        replies=replies,
        reused=reused,
        seconds=time.perf_counter() - t0,
    )
    write_report(result, prompts)
    return result


def score_held_out_replies(gguf_path: Path, data_dir: Path, *, threads: int | None = None) -> ReplyScores:
    """Answer the first user turn of every held-out conversation (greedy, as `chat` does) and score it."""
    from .data import load_split
    from .replies import score_replies
    from .runtime import load

    train_convs = load_split(data_dir / "train.jsonl")
    test_convs = [c for c in load_split(data_dir / "test.jsonl") if any(m.role == "user" for m in c.messages)]
    with load(gguf_path, n_threads=threads) as model:
        replies = [
            model.chat([{"role": "user", "content": next(m.content for m in c.messages if m.role == "user")}],
                       max_tokens=48)
            for c in test_convs
        ]
    return score_replies(train_convs, test_convs, replies)


def write_report(result: DemoResult, prompts: list[tuple[str, str]]) -> None:
    report = {
        "seconds": result.seconds,
        "reused_steps": result.reused,
        "tokenizer_parity": {"ok": result.tokenizer_parity_ok, "texts": result.tokenizer_texts},
        "held_out_replies": result.replies.to_json() if result.replies else None,
        "models": [r.to_json() for r in result.rows],
        "references": [{"prompt": p, "reference": ref} for p, ref in prompts],
    }
    atomic_write_json(result.out_dir / "demo-report.json", report)
    md = ["# gguf-factory demo", "", rows_markdown(result.rows), ""]
    if result.replies:
        md += [f"## Answers to all {result.replies.n} held-out prompts ({result.rows[-1].name})", "",
               replies_summary(result.replies), ""]
    md += ["## Held-out prompts (greedy)", ""]
    smallest = result.rows[-1]
    for (prompt, ref), ans in zip(prompts, smallest.answers, strict=True):
        md.append(f"- **{prompt}** → {ans['reply']!s}  _(reference: {ref})_")
    atomic_write_text(result.out_dir / "demo-report.md", "\n".join(md) + "\n")
    log.debug("report: %s", json.dumps(report)[:200])


def replies_summary(r: ReplyScores) -> str:
    return (
        f"{r.known_word_rate:.0%} of the words are words of the training data; on topic (nearest "
        f"training answer from the prompt's domain): {r.domain_match:.0%} of replies, vs "
        f"{r.reference_domain_match:.0%} for the reference answers and {r.chance_domain_match:.0%} by chance."
    )
