"""The README's measured figures, generated from the results files (never typed in by hand).

The block between ``<!-- measured:start -->`` and ``<!-- measured:end -->`` in README.md is what
:func:`render` makes of ``benchmarks/results/*.json``; ``tests/test_readme_figures.py`` fails when the two
differ, so a figure in the README is always the one its results file holds.

    python benchmarks/readme_figures.py           # rewrite the README's block from the results files
    python benchmarks/readme_figures.py --check   # exit 1 if the README's block is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def _yes(ok: bool) -> str:
    return "✅" if ok else "❌"


def demo(d: dict[str, Any]) -> list[str]:
    t = d["targets"]
    lines = [
        f"- `gguf-factory demo` on an empty folder ([results](benchmarks/results/demo.md), "
        f"`{d['command']}`, {d['date'][:10]}, commit {d['commit']}): **{d['seconds'] / 60:.1f} min** to the "
        f"report (target ≤ 25 {_yes(t['demo_minutes']['met'])}), starting from {d['base']}. Each system "
        "in fresh processes (medians); bits per reply byte on the held-out test conversations (lower is "
        "better), on topic over 40 of them answered:",
        "",
        "| system | engine | size | first token | 32-token reply | tokens/s | peak RSS | bits/byte "
        "| on topic |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    engine = {"gguf": "llama.cpp", "hf": "transformers", "lstm": "PyTorch"}
    for r in d["rows"]:
        lines.append(
            f"| {r['name']} | {engine.get(r['kind'], r['kind'])} | {r['size_mb']:.1f} MB "
            f"| {_f(r['first_token_ms'], '{:.1f} ms')} | {_f(r['reply_32_ms'], '{:.0f} ms')} "
            f"| {_f(r['tokens_per_s'], '{:.0f}')} | {_f(r['peak_rss_mb'], '{:.0f} MB')}"
            f"{f' (ctx {ctx})' if (ctx := r.get('context')) and r['kind'] == 'gguf' else ''} "
            f"| {_f(r['bits_per_byte'], '{:.3f}')} | {_f(r['on_topic'], '{:.0%}')} |"
        )
    names = {
        "finetuned_hf_bpb": "fine-tuned, transformers: bits/byte ≤ 0.65 and below the Bi-LSTM",
        "finetuned_q4_k_m_bpb": "its Q4_K_M: bits/byte ≤ 0.68 and below the Bi-LSTM",
        "small_file_bpb": "the ≤ 50 MB file: bits/byte ≤ 0.85 and below the untouched base",
        "small_file_mb": "the small file's size ≤ 50 MB",
        "q4_k_m_first_token_ms": "Q4_K_M first token < 100 ms",
        "q4_k_m_32_token_reply_ms": "Q4_K_M 32-token reply < 1 s",
        "q4_k_m_peak_rss_mb": "Q4_K_M peak RSS < 200 MB",
    }
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for k, label in names.items():
        v = t[k]
        lines.append(f"| {label} | {_f(v['value'], '{}')} | {_yes(v['met'])} |")
    small = d.get("small_file")
    if small:
        lines += [""] + [f"  {n}." if not n.endswith(".") else f"  {n}" for n in small["notes"]]
    return lines


def _demo_recipe() -> str:
    """The recipe the demo's code uses (gguf_factory.demo.FINETUNE), in the benchmark's naming."""
    from gguf_factory.demo import FINETUNE as r

    lr = f"{r.lr:.0e}".replace("e-0", "e-")  # 1e-4, as the benchmark's recipe names write it
    return f"{'lora' if r.lora else 'full'}-e{r.epochs}-lr{lr}"


def demo_budget(d: dict[str, Any]) -> list[str]:
    t, b = d["targets"], d.get("time_budget") or {}
    full = _load("demo") or {}
    ft = full.get("targets", {})

    def vs(key: str) -> str:
        here = t[key]["value"]
        there = (ft.get(key) or {}).get("value")
        return f"{_f(here, '{}')}" + (f" ({there} with the full recipes)" if there is not None else "")

    return [
        f"- `gguf-factory demo --time-budget {b.get('budget_seconds', 0) / 60:.0f}m` on an empty folder "
        f"([results](benchmarks/results/demo_budget.md), `{d['command']}`, {d['date'][:10]}, commit "
        f"{d['commit']}): **{d['seconds'] / 60:.1f} min** (target ≤ 25 {_yes(t['demo_minutes']['met'])}); "
        f"{_f(b.get('step_seconds'), '{:.2f}')} s per training step measured first; reduced: "
        f"{', '.join(b.get('reduced') or []) or 'nothing'}. Bits per reply byte: fine-tuned in transformers "
        f"{vs('finetuned_hf_bpb')}, its Q4_K_M {vs('finetuned_q4_k_m_bpb')}, the ≤ 50 MB file "
        f"{vs('small_file_bpb')}; Q4_K_M first token {vs('q4_k_m_first_token_ms')} ms."
    ]


def demo_finetune(d: dict[str, Any]) -> list[str]:
    lines = [
        f"- How the demo fine-tunes ([results](benchmarks/results/demo_finetune.md), `{d['command']}`, "
        f"{d['date'][:10]}): held-out bits per reply byte on all 90 test conversations. Lowest for the "
        f"Q4_K_M: **{d['best']}**; the demo uses {_demo_recipe()} (see `FinetuneRecipe` for why).",
        "",
        "| recipe | train wall | tokens/s | peak RSS | bits/byte (transformers) | bits/byte (Q4_K_M) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['recipe']} | {_f(r.get('seconds'), '{:.0f} s')} "
            f"| {_f(r.get('tokens_per_second'), '{:.0f}')} "
            f"| {_f(r.get('peak_rss_mb'), '{:.0f} MB')} | {r['bpb_hf']:.3f} | {r['bpb_q4_k_m']:.3f} |"
        )
    return lines


def demo_student(d: dict[str, Any]) -> list[str]:
    lines = [
        f"- How the demo makes its ≤ {d['budget']} student ([results](benchmarks/results/demo_student.md), "
        f"`{d['command']}`, {d['date'][:10]}): from the vocabulary-trimmed fine-tuned model, pruned, "
        "distilled from it and auto-quantized to the budget; bits per reply byte on the 90 test "
        f"conversations (target {d['target_bpb']} for the ≤ {d['budget']} file):",
        "",
        "| recipe | layers | FFN | parameters | distil wall | size | bits/byte F16 | bits/byte ≤ budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['recipe']} | {_f(r.get('layers_kept'), '{}')} | {_f(r.get('ffn_kept'), '{}')} "
            f"| {_f(r.get('params_m'), '{} M')} | {_f((r.get('distil') or {}).get('seconds'), '{:.0f} s')} "
            f"| {_f(r.get('size_mb'), '{:.1f} MB')} | {_f(r.get('bpb_f16'), '{:.3f}')} "
            f"| {_f(r.get('bpb_small'), '{:.3f}')} |"
        )
    return lines


def autoquant_scale(d: dict[str, Any], stem: str = "autoquant_scale", what: str = "") -> list[str]:
    s = d["smollm2"]
    e2e = s["end_to_end_s"]
    lines = [
        f"- Auto-quant at the 135M scale{what} ([results](benchmarks/results/{stem}.md), "
        f"`{d['command']}`, {d['date'][:10]}) on {s['model']}: `--max-size 50MB` refused in "
        f"{s['refusal']['seconds']} s (smallest possible {s['bounds']['smallest'] / 1e6:.1f} MB); "
        f"{s['fast']['probes']} probes for {s['fast']['tensors']} tensors, measured in "
        f"{s['fast']['measure_s']:.0f} s, one budget end to end in {min(e2e.values()):.0f}–"
        f"{max(e2e.values()):.0f} s (target ≤ 600 s). Mean KLD against the F16 at equal size:",
        "",
        "| rung | size | stock KLD | auto-quant KLD | stock / auto |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
        st, au = r["stock"], r["fast"]
        lines.append(
            f"| {r['rung']} | {st['size'] / 1e6:.1f} MB | {st['kld']:.4f} | {au['kld']:.4f} "
            f"| {au['ratio_stock_over_auto']:.1f}× |"
        )
    return lines


def autoquant_scale_finetuned(d: dict[str, Any]) -> list[str]:
    return autoquant_scale(d, "autoquant_scale_finetuned", ", on the demo's fine-tuned model")


def train_throughput(d: dict[str, Any]) -> list[str]:
    s = d["summary"]

    def tps(row: str) -> str:
        v = s[row]["tokens_per_second"]
        return f"{v['median']:.1f} ({v['min']:.1f}–{v['max']:.1f})"

    la = d.get("load_average") or {}
    load = f", load {la['min']:.1f}–{la['max']:.1f}" if "min" in la else ""
    return [
        f"- Fine-tuning throughput vs transformers' `Trainer` ([results](benchmarks/results/"
        f"train_throughput.md), `{d['command']}`, {d['date'][:10]}{load}): tokens/s median (min–max) "
        f"`gguf-factory train --base` {tps('ours')}, `--pack` {tps('ours-pack')}, `Trainer` "
        f"{tps('trainer')}, `Trainer` with length grouping and our threads {tps('trainer-grouped')}: "
        f"**{d['speedup_ours_vs_trainer']:.2f}×** the plain `Trainer` (target {d['target']}×)."
    ]


def convert(d: dict[str, Any]) -> list[str]:
    sp = d["speed"]
    ours, peer = sp["rows"]["gguf-factory"], sp["rows"]["llama.cpp"]
    m = sp["model"]
    return [
        f"- Converting a {m['parameters'] / 1e6:.0f} M-parameter {m['source_dtype']} checkpoint with a "
        f"{m['vocab_size'] // 1024} k-token vocabulary to F16 ([results](benchmarks/results/convert.md), "
        f"`{d['command']}`): {ours['seconds']['median']:.1f} s ({ours['seconds']['min']:.1f}–"
        f"{ours['seconds']['max']:.1f}) and {ours['peak_rss_mb']['median']:.0f} MB peak RSS; llama.cpp's "
        f"`convert_hf_to_gguf.py` in the same run {peer['seconds']['median']:.1f} s "
        f"({peer['seconds']['min']:.1f}–{peer['seconds']['max']:.1f}) and "
        f"{peer['peak_rss_mb']['median']:.0f} MB; {len(d['families'])} families verified in llama.cpp."
    ]


def from_gguf(d: dict[str, Any]) -> list[str]:
    t, f32, q = d["tokenizer_parity"], d["vs_f32_gguf"], d["vs_q4_1_gguf"]
    return [
        f"- SmolLM2-135M-Instruct rebuilt from its Q4_1 GGUF as a Hugging Face checkpoint "
        f"([results](benchmarks/results/from_gguf.md), `{d['command']}`): {d['median_wall_seconds']:.0f} s, "
        f"{d['median_peak_rss_mb']:.0f} MB peak RSS; tokenizer {t['mismatches']} mismatches on {t['texts']} "
        f"texts in {t['languages']} languages; against llama.cpp on an F32 GGUF of the same weights greedy "
        f"{f32['greedy_identical']} identical, top-1 {f32['top1_agreement']:.1%}; against the Q4_1 GGUF "
        f"itself top-1 {q['top1_agreement']:.1%}."
    ]


def serve(d: dict[str, Any]) -> list[str]:
    o, lo, ld = d["overhead"], d["overhead_long"], d["load"]

    def row(label: str, x: dict[str, Any], via: str, key: str) -> str:
        ms, pct = x[f"{key}overhead_ms"], x[f"{key}overhead_pct"]
        return f"{label} via {via} {ms:+.2f} ms ({pct:+.1f} %)"

    return [
        f"- `gguf-factory serve` vs llama-cpp-python called directly on {d['model']} "
        f"([results](benchmarks/results/serve.md), {d['date']}; every row): overhead per request on "
        f"~{o['mean_completion_tokens']:.0f}-token replies {row('', o, 'the `openai` client', '')}, "
        f"{row('', o, 'raw HTTP', 'raw_http_')}; on {lo['mean_completion_tokens']:.0f}-token replies "
        f"{row('', lo, 'the `openai` client', '')}, {row('', lo, 'raw HTTP', 'raw_http_')}. "
        f"{ld['clients']} clients for {ld['duration_s']:.0f} s: {ld['requests']} requests, {ld['errors']} "
        f"errors, p99 {ld['p99_ms']:.0f} ms.".replace("  ", " ")
    ]


def serve_peer(d: dict[str, Any]) -> list[str]:
    rows = "; ".join(
        f"{t['target']}: {'–' if t['value'] is None else t['value']} {_yes(t['met'])}" for t in d["targets"]
    )
    return [
        f"- `gguf-factory serve` vs `python -m llama_cpp.server` on {d['model']}, same GGUF, threads and "
        f"context, one run ([results](benchmarks/results/serve_peer.md), `{d['command']}`, "
        f"{d['date'][:10]}; every row of its targets table, the peer's own rows included): {rows}."
    ]


def serve_adapters(d: dict[str, Any]) -> list[str]:
    shared = next(x for x in d["targets"] if x["target"].startswith("shared base"))
    replies = next(x for x in d["targets"] if x["target"].startswith("each domain"))
    rows = {r["name"]: r for r in d["configs"]}
    lines = [
        f"- One base, many adapters: `gguf-factory serve router.yaml` with {len(d['adapter_bytes'])} domains "
        f"sharing {d['model']} ({d['model_bytes'] / 1e6:.0f} MB), each with its LoRA adapter, against one "
        f"model alone, the same domains on separate copies of the base, and `python -m llama_cpp.server` "
        f"with the four models in its config file ([results](benchmarks/results/serve_adapters.md), "
        f"`{d['command']}`, {d['date'][:10]}, commit {d['commit']}; {d['settings']['repeats']} fresh "
        "processes each, medians): "
        f"the shared base holds **{shared['value']:.2f}×** one model's RSS (target ≤ 1.3 "
        f"{_yes(shared['met'])}); replies identical to base + adapter loaded alone {replies['value']} "
        f"{_yes(replies['met'])}. The peer keeps one model loaded at a time (a reload on every switch).",
        "",
        "| configuration | bases loaded | RSS, median (min–max) | × one model of the same server |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        rss = r["rss_mb"]
        lines.append(
            f"| {name} | {r['bases_loaded'] or '1 at a time'} | {rss['median']:.0f} MB "
            f"({rss['min']:.0f}–{rss['max']:.0f}) | {_f(r['rss_ratio'], '{:.2f}×')} |"
        )
    return lines


def build_domains_smollm2(d: dict[str, Any]) -> list[str]:
    r = d["routing"]
    per = ", ".join(f"{k} {v['accuracy']:.0%} of {v['prompts']}" for k, v in r.get("domains", {}).items())
    ggufs = [a for a in d["artifacts"] if a.endswith(".gguf")]
    return [
        f"- Multi-domain build of `examples/domains-smollm2.yaml` on SmolLM2-135M-Instruct "
        f"([results](benchmarks/results/build_domains_smollm2.md), `{d['command']}`, {d['date']}): "
        f"{d['steps']} steps cold in {d['cold_s'] / 60:.1f} min (the universal fine-tune "
        f"{d['universal_part_s'] / 60:.1f} min of it), a cached re-run in {d['cached_s']:.2f} s; "
        f"{len(ggufs)} GGUFs (parents and adapters); the router on held-out prompts: {per} "
        f"({r.get('accuracy', 0):.1%} overall)."
    ]


def quant_quality(d: dict[str, Any]) -> list[str]:
    oh = d["overhead"]
    lines = [
        f"- Quantization quality on the `small` model ({d['model']}; [results and plot]"
        f"(benchmarks/results/quant_quality.md), `{d['command']}`, {d['date']}, commit {d['commit']}): "
        f"held-out test conversations ({d['data']['tokens']} assistant tokens), mean KL divergence against "
        "the F16; the importance matrix from train.jsonl, auto-quant's sensitivities from val.jsonl. Our "
        "`quantize` vs a "
        f"bare `llama_model_quantize` on Q4_K_M, medians of {oh['runs']} alternating pairs: "
        f"{oh['ours_s']:.3f} s ({oh['ours_min_s']:.3f}–{oh['ours_max_s']:.3f}) vs {oh['bare_s']:.3f} s "
        f"({oh['bare_min_s']:.3f}–{oh['bare_max_s']:.3f}), {100 * oh['overhead']:+.1f} %.",
        "",
        "| level | stock size | stock KLD | + imatrix KLD | auto-quant size | auto-quant KLD "
        "| auto / stock |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in d["comparison"]:
        st, im, au = c["stock"], c["imatrix"], c["auto"]
        lines.append(
            f"| {c['level']} | {st['size'] / 1e6:.1f} MB | {_f(st['kld'], '{:.5f}')} "
            f"| {_f(im['kld'], '{:.5f}')} "
            f"| {au['size'] / 1e6:.1f} MB | {_f(au['kld'], '{:.5f}')} "
            f"| {_f(c['kld_ratio_auto_vs_stock'], '{:.2f}')} {_yes(c['goal_met'])} |"
        )
    return lines


def seed_targets(d: dict[str, Any]) -> list[str]:
    f, t, ok = d["figures"], d["targets"], d["pass"]
    return [
        f"- `gguf-factory demo --from-scratch` (the nano preset trained from nothing, "
        f"{d['demo_seconds'] / 60:.1f} min; [results](benchmarks/results/seed_targets.md), `{d['command']}`, "
        f"{d['date']}, commit {d['commit']}), its Q4_K_M in fresh processes, medians of {d['runs']}: "
        f"{f['size_mb']:.2f} MB (target < {t['size_mb']:.0f} {_yes(ok['size_mb'])}), first token "
        f"{f['first_token_ms']:.1f} ms (< {t['first_token_ms']:.0f} {_yes(ok['first_token_ms'])}), peak RSS "
        f"{f['peak_rss_mb']:.0f} MB (< {t['peak_rss_mb']:.0f} {_yes(ok['peak_rss_mb'])})."
    ]


def build(d: dict[str, Any]) -> list[str]:
    steps, wall = d.get("ray_steps_s", {}), d.get("ray_wall_s", {})

    def mm(x: dict[str, float] | None) -> str:
        return "–" if not x else f"{x['median']:.1f} s ({x['min']:.1f}–{x['max']:.1f})"

    ray = ""
    if d.get("repeats"):
        ray = (
            f" The {d['parallel_steps']} per-domain steps: local executor "
            f"{d['local_per_domain_steps_s']:.1f} s; "
            f"Ray 1 worker {mm(steps.get('1'))}, 2 workers {mm(steps.get('2'))} (medians of {d['repeats']} "
            f"alternating runs): 2 workers **{d['ray_speedup_steps']:.2f}×** 1 worker (target ≥ 1.7 "
            f"{_yes(d['ray_speedup_steps'] >= 1.7)}) and {d['ray_2_workers_vs_local']:.2f}× the local "
            f"executor; whole Ray runs with start-up {mm(wall.get('1'))} vs {mm(wall.get('2'))} "
            f"({d['ray_speedup_wall']:.2f}×)."
        )
    return [
        f"- Multi-domain build of `{d['manifest']}` (nano models; [results](benchmarks/results/build.md), "
        f"`{d['command']}`, {d['date']}, commit {d['commit']}): {d['steps']} steps cold in "
        f"{d['cold_s']:.0f} s (the universal model {d['universal_part_s']:.0f} s of it), a cached re-run in "
        f"{d['cached_s']:.2f} s "
        f"({100 * d['cached_ratio']:.2f} % of cold, target ≤ 10 % {_yes(d['cached_ratio'] <= 0.1)}).{ray}"
    ]


def serve_routing(d: dict[str, Any]) -> list[str]:
    per = ", ".join(f"{k} {v['accuracy']:.0%} of {v['prompts']}" for k, v in d["domains"].items())
    return [
        f'- `gguf-factory serve router.yaml` on that build with `"model": "auto"` '
        f"([results](benchmarks/results/serve_routing.md), `{d['command']}`, {d['date']}, commit "
        f"{d['commit']}): {d['accuracy']:.1%} of {d['requests']} held-out prompts routed to their own domain "
        f"({per}); p50 {d['latency_p50_ms']:.0f} ms, p95 {d['latency_p95_ms']:.0f} ms per routed request; "
        f"{len(d['loaded'])} of {len(d['models'])} models loaded at the end."
    ]


def doctor(d: dict[str, Any]) -> list[str]:
    c, f = d["corpus"], d["fuzz"]
    return [
        f"- GGUF doctor ([results](benchmarks/results/doctor.md), `{d['command']}`, {d['date'][:10]}, commit "
        f"{d['commit']}): {c['n_cases']} corrupted files ({c['n_kinds']} defect kinds), the expected defect "
        f"named in {c['detected']}/{c['n_cases']}; {c['repaired']}/{c['repairable']} repairable ones "
        f"repaired ({c['repaired_and_loaded']} then load in llama.cpp); {f['cases']} fuzzed files, "
        f"{f['n_escaped']} exceptions other than our format error, p99 {f['p99_ms']:.1f} ms per file."
    ]


def doctor_hypothesis(d: dict[str, Any]) -> list[str]:
    return [
        f"- The GGUF reader under hypothesis ([results](benchmarks/results/doctor_hypothesis.md), "
        f"`{d['command']}`, {d['date'][:10]}, commit {d['commit']}): {d['examples']} generated mutation "
        "lists, "
        f"{d['parsed']} parsed, {d['rejected']} rejected with our format error, "
        f"{sum(d['escaped'].values())} other exceptions, slowest case {d['max_ms']:.0f} ms."
    ]


SECTIONS = (
    ("demo", demo),
    ("demo_finetune", demo_finetune),
    ("demo_student", demo_student),
    ("autoquant_scale", autoquant_scale),
    ("autoquant_scale_finetuned", autoquant_scale_finetuned),
    ("train_throughput", train_throughput),
    ("convert", convert),
    ("from_gguf", from_gguf),
    ("serve", serve),
    ("serve_peer", serve_peer),
    ("build_domains_smollm2", build_domains_smollm2),
    ("serve_adapters", serve_adapters),
    ("quant_quality", quant_quality),
    ("seed_targets", seed_targets),
    ("build", build),
    ("serve_routing", serve_routing),
    ("doctor", doctor),
    ("doctor_hypothesis", doctor_hypothesis),
)


def render() -> str:
    out: list[str] = [START, ""]
    for name, fn in SECTIONS:
        d = _load(name)
        if d is not None:
            out += fn(d) + [""]
    out.append(END)
    return "\n".join(out)


def current() -> str:
    text = README.read_text(encoding="utf-8")
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{README}: no {START} ... {END} block")
    return text[i : j + len(END)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    block, now = render(), current()
    if args.check:
        if block != now:
            print("README.md's measured figures differ from benchmarks/results: run readme_figures.py")
            sys.exit(1)
        print("README.md's measured figures match benchmarks/results")
        return
    README.write_text(README.read_text(encoding="utf-8").replace(now, block), encoding="utf-8")
    print(f"rewrote the measured block of {README}")


if __name__ == "__main__":
    main()
