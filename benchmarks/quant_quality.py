"""Quantization quality: llama.cpp's stock presets vs the same presets with our importance matrix vs our
imatrix + auto-quant recipe at the same (or smaller) size, on the `small` chat model; plus the pipeline's
time overhead over a bare `llama_model_quantize` call.

Every figure comes from one run: the stock ladder (Q2_K … Q8_0), the imatrix variants and the auto-quant
variants are evaluated side by side on the held-out test conversations (never used to choose anything:
the imatrix comes from train.jsonl, auto-quant's sensitivities from val.jsonl), with KLD and top-1
against the F16 model.

    python benchmarks/quant_quality.py [--f16 small-F16.gguf --data data] [--work benchmarks/work/qq]
        [--mode fast|exhaustive]

Without --f16, the model is made in --work: `prepare` (bundled chatterbot corpus), `train --preset small`
(about 11 minutes on 2 cores), `convert` to F16. Writes benchmarks/results/quant_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gguf_factory.autoquant import AutoQuantizer
from gguf_factory.evaluate import evaluate_many
from gguf_factory.files import human_size
from gguf_factory.imatrix import compute_imatrix
from gguf_factory.ladder import LADDER_TYPES, LadderResult, Rung, monotonicity_problems, rung_of, write_plot
from gguf_factory.quantize import QUANT_TYPES, quantize, read_gguf_info

sys.path.insert(0, str(Path(__file__).parent))
from stamp import git_commit, machine, portable  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMPARED = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M")


def make_model(work: Path, threads: int | None) -> tuple[Path, Path]:
    from gguf_factory.convert import convert
    from gguf_factory.data import prepare
    from gguf_factory.train import train

    data, hf, f16 = work / "data", work / "small", work / "small-F16.gguf"
    if not (data / "test.jsonl").is_file():
        prepare(None, data)
    if not (hf / "config.json").is_file():
        train(data, hf, preset="small", threads=threads)
    if not f16.is_file():
        convert(hf, f16, outtype="f16")
    return f16, data


def bare_quantize(src: Path, dst: Path, qtype: str, threads: int) -> float:
    """llama.cpp's quantizer called directly, default parameters: the baseline for our overhead."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    params.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"bare llama_model_quantize failed ({rc})")
    return seconds


def _ours_quantize(src: Path, dst: Path, qtype: str, threads: int) -> float:
    t0 = time.perf_counter()
    quantize(src, dst, qtype, threads=threads)
    return time.perf_counter() - t0


def overhead(
    src: Path,
    work: Path,
    runs: int,
    threads: int,
    *,
    bare: Callable[..., float] | None = None,
    ours: Callable[..., float] | None = None,
) -> dict[str, Any]:
    """Wall time of our `quantize` (checks, metadata, atomic rename) vs the bare call, in pairs whose order
    alternates (pair 0: bare first, pair 1: ours first, ...), so that neither side always runs on a warm
    page cache or a cooled CPU. Every run is reported with the order of its pair; the figure is the ratio
    of the medians. ``bare``/``ours``: the timed calls ``(src, dst, qtype, threads) -> seconds``."""
    timed = {"bare": bare or bare_quantize, "ours": ours or _ours_quantize}
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    orders = []
    for i in range(runs):
        order = ("bare", "ours") if i % 2 == 0 else ("ours", "bare")
        orders.append("-".join(order))
        for side in order:
            dst = work / f"overhead-{side}.gguf"
            times[side].append(timed[side](src, dst, "Q4_K_M", threads))
            dst.unlink(missing_ok=True)
    o, b = statistics.median(times["ours"]), statistics.median(times["bare"])
    return {
        "ours_s": o, "bare_s": b, "overhead": o / b - 1.0, "runs": runs,
        "ours_min_s": min(times["ours"]), "ours_max_s": max(times["ours"]),
        "bare_min_s": min(times["bare"]), "bare_max_s": max(times["bare"]),
        "pairs": [
            {"order": order, "ours_s": t_o, "bare_s": t_b}
            for order, t_o, t_b in zip(orders, times["ours"], times["bare"], strict=True)
        ],
    }  # fmt: skip


def goal_met(stock: Rung, auto: Rung) -> bool:
    """Auto-quant's file is no larger than the stock preset's and has a lower mean KLD; a missing KLD (on
    either side) is a failure, never a pass."""
    if stock.kld_mean is None or auto.kld_mean is None:
        return False
    return auto.size_bytes <= stock.size_bytes and auto.kld_mean < stock.kld_mean


def kld_ratio(stock: Rung, auto: Rung) -> float | None:
    """auto / stock mean KLD; None when either is missing (or the stock KLD is 0)."""
    if stock.kld_mean is None or auto.kld_mean is None or stock.kld_mean == 0:
        return None
    return auto.kld_mean / stock.kld_mean


def _num(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _figures(r: Rung) -> dict[str, float | int | None]:
    return {"size": r.size_bytes, "kld": r.kld_mean, "ppl": r.perplexity, "top1": r.top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", type=Path, help="F16 GGUF of the model (default: train `small` in --work)")
    ap.add_argument("--data", type=Path, help="its `prepare` folder (train/val/test.jsonl)")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "quant_quality")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--overhead-runs", type=int, default=5)
    ap.add_argument("--mode", choices=("fast", "exhaustive"), default="fast", help="auto-quant's mode")
    args = ap.parse_args()
    console = Console()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if args.f16 is None:
        f16, data = make_model(work, args.threads)
    else:
        if args.data is None:
            raise SystemExit("--f16 needs --data (the model's prepare folder)")
        f16, data = args.f16, args.data
    ref_bytes = f16.stat().st_size
    info = read_gguf_info(f16)
    console.print(f"model {f16} ({human_size(ref_bytes)}, {info.n_layers} blocks)")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stock = {}
    for qt in LADDER_TYPES:
        stock[qt] = quantize(f16, work / f"stock-{qt}.gguf", qt, threads=args.threads).path
    timings["stock_ladder_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    imat = compute_imatrix(f16, data, work / "imatrix.gguf", threads=args.threads)
    timings["imatrix_s"] = time.perf_counter() - t0
    with_imat = {
        qt: quantize(f16, work / f"imatrix-{qt}.gguf", qt, imatrix=imat.path, threads=args.threads).path
        for qt in COMPARED
    }

    t0 = time.perf_counter()
    auto = {}
    with AutoQuantizer(
        f16, data=data, imatrix=imat.path, threads=args.threads, work_dir=work, mode=args.mode
    ) as aq:
        timings["autoquant_measure_s"] = time.perf_counter() - t0
        probes = aq.probes
        for qt in COMPARED:
            r = aq.build(work / f"auto-{qt}.gguf", max_size=stock[qt].stat().st_size)
            auto[qt] = r
    timings["autoquant_total_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    paths = [*stock.values(), *with_imat.values(), *(r.path for r in auto.values())]
    labels = [*stock, *(f"{q}+imatrix" for q in with_imat), *(f"auto≤{q}" for q in auto)]
    ev = evaluate_many(paths, data, ref=f16, threads=args.threads, labels=labels)
    timings["evaluation_s"] = time.perf_counter() - t0
    assert ev.reference is not None

    def rung(label: str, path: Path) -> Rung:
        r = rung_of(label, Path(path), ref_bytes)
        s = next(m for m in ev.models if m.path == str(path))
        r.perplexity, r.delta_ppl, r.kld_mean, r.kld_p99, r.top1 = (
            s.perplexity, s.delta_ppl, s.kld_mean, s.kld_p99, s.top1,
        )  # fmt: skip
        return r

    reference = rung_of("F16", f16, ref_bytes)
    reference.perplexity, reference.delta_ppl, reference.kld_mean, reference.kld_p99, reference.top1 = (
        ev.reference.perplexity, 0.0, 0.0, 0.0, 1.0,
    )  # fmt: skip
    stock_rungs = [rung(q, p) for q, p in stock.items()]
    imat_rungs = [rung(q, p) for q, p in with_imat.items()]
    auto_rungs = [rung(q, r.path) for q, r in auto.items()]
    ladder_result = LadderResult(reference=reference, rungs=stock_rungs, evaluation=ev)
    ladder_result.non_monotone = monotonicity_problems(stock_rungs)

    t0 = time.perf_counter()
    oh = overhead(f16, work, args.overhead_runs, args.threads)
    timings["overhead_s"] = time.perf_counter() - t0

    comparison = []
    for q, s_r, i_r, a_r in zip(COMPARED, stock_rungs, imat_rungs, auto_rungs, strict=False):
        comparison.append(
            {
                "level": q,
                "stock": _figures(s_r),
                "imatrix": _figures(i_r),
                "auto": {
                    **_figures(a_r),
                    "kld_calibration": auto[q].kld_mean, "kld_predicted": auto[q].kld_predicted,
                    "types": auto[q].type_counts,
                },
                "kld_ratio_auto_vs_stock": kld_ratio(s_r, a_r),
                "goal_met": goal_met(s_r, a_r),
            }
        )  # fmt: skip

    table = Table(title=f"{f16.name}: stock vs imatrix vs imatrix + auto-quant (same size), test set")
    for col in (
        "level",
        "stock size",
        "stock KLD",
        "+imatrix KLD",
        "auto size",
        "auto KLD",
        "auto/stock",
        "goal",
    ):
        table.add_column(col, justify="right")
    for c in comparison:
        table.add_row(
            c["level"], human_size(c["stock"]["size"]), _num(c["stock"]["kld"], ".4g"),
            _num(c["imatrix"]["kld"], ".4g"), human_size(c["auto"]["size"]), _num(c["auto"]["kld"], ".4g"),
            _num(c["kld_ratio_auto_vs_stock"], ".2f"),
            "✅" if c["goal_met"] else "❌",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"pipeline overhead (Q4_K_M, median of {oh['runs']}): ours {oh['ours_s']:.3f} s vs bare "
        f"llama_model_quantize {oh['bare_s']:.3f} s = {100 * oh['overhead']:+.1f} %"
    )

    RESULTS.mkdir(exist_ok=True)
    plot = write_plot(
        stock_rungs, RESULTS / "quant_quality.png", title=f16.stem, label="stock presets",
        others={"stock + imatrix": imat_rungs, "imatrix + auto-quant (same size)": auto_rungs},
    )  # fmt: skip
    result = {
        "model": str(f16.name),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "data": {"test": ev.data_path, "conversations": ev.n_conversations, "tokens": ev.n_tokens},
        "imatrix": {"entries": imat.entries, "tokens": imat.tokens},
        "autoquant": {
            "mode": args.mode,
            "probes": probes,
            "calibration_tokens": next(iter(auto.values())).calibration_tokens,
        },
        "comparison": comparison,
        "ladder": ladder_result.to_json(),
        "imatrix_rungs": [asdict(r) for r in imat_rungs],
        "auto_rungs": [asdict(r) for r in auto_rungs],
        "overhead": oh,
        "timings": timings,
        "total_s": time.perf_counter() - t_start,
    }
    result = portable(json.loads(json.dumps(result, default=str)))
    (RESULTS / "quant_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    ev.data_path = portable(ev.data_path)  # the ladder's markdown names it

    md = [
        "# Quantization quality: stock presets vs imatrix vs imatrix + auto-quant",
        "",
        f"Model: `{f16.name}` (the foundation's `small` preset, {info.n_layers} blocks, "
        f"{human_size(ref_bytes)} in F16), trained on the bundled chatterbot corpus. Quality on the held-out "
        f"test conversations ({ev.n_conversations} conversations, {ev.n_tokens} assistant tokens), against "
        "the F16 model's token distributions, all files evaluated side by side in one run. The importance "
        f"matrix comes from train.jsonl ({imat.tokens} tokens); auto-quant's per-tensor sensitivities from "
        f"val.jsonl ({probes} probes, {args.mode} mode); neither saw the test set.",
        "",
        "## Stock preset vs ours at equal or smaller size",
        "",
        "| level | stock size | stock KLD | stock + imatrix KLD | auto-quant size | auto-quant KLD | "
        "auto / stock KLD | goal |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for c in comparison:
        md.append(
            f"| {c['level']} | {human_size(c['stock']['size'])} | {_num(c['stock']['kld'], '.4g')} | "
            f"{_num(c['imatrix']['kld'], '.4g')} | {human_size(c['auto']['size'])} | "
            f"{_num(c['auto']['kld'], '.4g')} | {_num(c['kld_ratio_auto_vs_stock'], '.2f')} | "
            f"{'✅' if c['goal_met'] else '❌'} |"
        )
    md += [
        "",
        "Goal: at equal or smaller size, lower mean KLD than the stock preset (a missing KLD fails). "
        "Auto-quant's chosen types:",
        "",
    ]
    md += [
        f"- ≤ {c['level']}: " + ", ".join(f"{t}×{n}" for t, n in c["auto"]["types"].items())
        for c in comparison
    ]
    md += [
        "",
        f"![size vs KLD]({plot.name})",
        "",
        ladder_result.to_markdown("The stock ladder (compression results)").replace("# The", "## The", 1),
        "## Pipeline overhead",
        "",
        f"Our `quantize` (input checks, metadata overrides, atomic rename) vs a bare `llama_model_quantize` "
        f"call on the same file, Q4_K_M, {args.threads} threads, medians of {oh['runs']} pairs whose order "
        f"alternates (bare first, then ours first, ...): {oh['ours_s']:.3f} s "
        f"({oh['ours_min_s']:.3f}–{oh['ours_max_s']:.3f}) vs {oh['bare_s']:.3f} s "
        f"({oh['bare_min_s']:.3f}–{oh['bare_max_s']:.3f}), **{100 * oh['overhead']:+.1f} %** (goal ≤ 5 %).",
        "",
        "| pair | order | ours (s) | bare (s) |",
        "|---:|---|---:|---:|",
        *(
            f"| {i + 1} | {p['order']} | {p['ours_s']:.3f} | {p['bare_s']:.3f} |"
            for i, p in enumerate(oh["pairs"])
        ),
        "",
        "## Time",
        "",
        *(f"- {k.removesuffix('_s').replace('_', ' ')}: {v:.1f} s" for k, v in timings.items()),
        "",
        f"Machine: {os.cpu_count()} CPU cores ({result['machine']['cpu']['model']}), {platform.platform()}; "
        f"{result['date']}, commit {result['commit']}; `{result['command']}`.",
    ]
    (RESULTS / "quant_quality.md").write_text(portable("\n".join(md) + "\n"))
    console.print(f"wrote {RESULTS / 'quant_quality.md'}, .json and {plot.name}")


if __name__ == "__main__":
    main()
