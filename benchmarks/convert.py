"""Benchmark: time and peak RSS of ``gguf-factory convert --outtype f16`` on a ~270 M-parameter bf16
checkpoint with a 256 k-token vocabulary (the shape of Gemma 3 270M: 18 layers, hidden 640, vocab 262144).

The checkpoint is built once from a transformers config with random weights and a programmatically
generated SentencePiece-style BPE ``tokenizer.json`` of 262144 tokens (specials, the 256 byte-fallback
tokens, then 1-, 2- and 3-character pieces with their merges; every split of a piece is a merge, ranked in
vocabulary order, so Hugging Face's merge-rank BPE and llama.cpp's score-based SentencePiece agree), and
cached under ``--work``. Each measurement runs the real CLI in a fresh subprocess; its peak RSS comes from
``os.wait4`` (that child only). Results: ``benchmarks/results/convert.json`` and ``convert.md``.

    python benchmarks/convert.py [--work /tmp/gguf-factory-bench] [--runs 3] [--verify]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SPM_SPACE = "\u2581"
VOCAB_SIZE = 262144
# llama.cpp's convert_hf_to_gguf.py on such a model, measured on this machine kind (issue 3).
REFERENCE = {"tool": "llama.cpp convert_hf_to_gguf.py", "seconds": 25.0, "peak_rss_mb": 1550.0}
TARGET = {"seconds": 8.0, "peak_rss_mb": 600.0}
# Our converter before the streaming work (one run, same machine; same weights, a first tokenizer build with
# half the merges): torch-backed memory-mapped safetensors reads, each tensor converted whole through
# float32, gguf-py's per-item metadata packing.
BEFORE = {"seconds": 8.81, "peak_rss_mb": 1930.0}


def _tokenizer_json(out: Path) -> None:
    """A Gemma-style BPE tokenizer (byte fallback, "▁" for spaces) with exactly ``VOCAB_SIZE`` tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chat = ["<start_of_turn>", "<end_of_turn>"]
    alphabet = [
        SPM_SPACE,
        *"abcdefghijklmnopqrstuvwxyz",
        *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        *"0123456789",
        ".",
        ",",
    ]
    vocab: dict[str, int] = {}
    for t in [*specials, *chat, *(f"<0x{b:02X}>" for b in range(256)), *alphabet]:
        vocab[t] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a, b in itertools.product(alphabet, repeat=2):
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    for a, b, c in itertools.product(alphabet, repeat=3):
        if len(vocab) >= VOCAB_SIZE:
            break
        vocab[a + b + c] = len(vocab)
        merges += [(a + b, c), (a, b + c)]  # both splits, adjacent ranks: BPE and SentencePiece agree
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials + chat])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<end_of_turn>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 32768,
            }
        )
    )


def build_model(work: Path) -> Path:
    """The cached benchmark checkpoint (built on first use: about a minute)."""
    out = work / "gemma3-270m-random-v2"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tmp = work / "gemma3-270m-random-v2.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        query_pre_attn_scalar=256,
        sliding_window=512,
        pad_token_id=0,
        eos_token_id=5,
        bos_token_id=2,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    config.architectures = ["Gemma3ForCausalLM"]
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name.endswith("norm.weight"):
            t = torch.zeros(p.shape, dtype=torch.float32)
        else:
            t = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
        state[name] = t.to(torch.bfloat16)
    n_params = sum(t.numel() for t in state.values())
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del state
    config.save_pretrained(tmp)
    _tokenizer_json(tmp)
    (tmp / "params.txt").write_text(f"{n_params}\n")
    tmp.rename(out)
    return out


def measure(model_dir: Path, out: Path, outtype: str) -> dict[str, float]:
    """One run of the CLI in a fresh process: wall seconds and that process's peak RSS (MB)."""
    cmd = [
        sys.executable,
        "-m",
        "gguf_factory.cli",
        "convert",
        str(model_dir),
        "-o",
        str(out),
        "--outtype",
        outtype,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"convert failed (exit {proc.returncode}):\n{err}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-factory-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--verify", action="store_true", help="Also run `verify` on the output (about a minute).")
    args = ap.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = build_model(args.work)
    print(f"model: {model_dir} (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.build_only:
        return 0
    n_params = int((model_dir / "params.txt").read_text())
    out = args.work / f"bench-{args.outtype.upper()}.gguf"
    runs = []
    for i in range(args.runs):
        out.unlink(missing_ok=True)
        r = measure(model_dir, out, args.outtype)
        runs.append(r)
        print(f"run {i + 1}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    seconds = statistics.median(r["seconds"] for r in runs)
    rss = statistics.median(r["peak_rss_mb"] for r in runs)
    result = {
        "model": {
            "architecture": "Gemma3ForCausalLM (random weights)",
            "parameters": n_params,
            "vocab_size": VOCAB_SIZE,
            "source_dtype": "bf16",
            "safetensors_mb": round((model_dir / "model.safetensors").stat().st_size / 1e6, 1),
        },
        "command": f"gguf-factory convert MODEL -o OUT.gguf --outtype {args.outtype}",
        "runs": runs,
        "median_seconds": round(seconds, 2),
        "median_peak_rss_mb": round(rss, 1),
        "output_mb": round(out.stat().st_size / 1e6, 1),
        "reference": REFERENCE,
        "before_streaming": BEFORE,
        "target": TARGET,
        "meets_target": seconds <= TARGET["seconds"] and rss <= TARGET["peak_rss_mb"],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "shared machine: other jobs ran at the same time, so timings are noisy",
        },
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if args.verify:
        from gguf_factory.verify import verify

        v = verify(out, model_dir)
        result["verify"] = {
            "ok": v.ok,
            "tokenizer_mismatches": len(v.tokenizer.mismatches),
            "tokenizer_texts": v.tokenizer.n_texts,
            "greedy_identical": f"{v.greedy.n_prompts - len(v.greedy.mismatches)}/{v.greedy.n_prompts}",
            "top1_agreement": v.logits.top1_agreement,
            "positions": v.logits.n_positions,
            "max_abs_logprob_diff": v.logits.max_abs_logprob_diff,
        }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "convert.md").write_text(render_md(result))
    print(render_md(result))
    out.unlink(missing_ok=True)
    return 0


def render_md(r: dict[str, Any]) -> str:
    m = r["model"]
    ref, tgt = r["reference"], r["target"]
    runs = ", ".join(f"{x['seconds']:.2f} s / {x['peak_rss_mb']:.0f} MB" for x in r["runs"])
    return (
        "# convert benchmark\n\n"
        f"`{r['command']}` on a {m['parameters'] / 1e6:.0f} M-parameter {m['source_dtype']} checkpoint "
        f"({m['architecture']}, vocabulary {m['vocab_size']:,} tokens, "
        f"safetensors {m['safetensors_mb']:.0f} MB), "
        f"each run a fresh process; medians of {len(r['runs'])} runs ({runs}). Peak RSS is the converting "
        "process's own `ru_maxrss` (os.wait4).\n\n"
        "| | time | peak RSS |\n|---|---:|---:|\n"
        f"| gguf-factory convert | {r['median_seconds']:.2f} s | {r['median_peak_rss_mb']:.0f} MB |\n"
        f"| gguf-factory convert before the streaming work (1 run, same weights) "
        f"| {r['before_streaming']['seconds']:.2f} s | {r['before_streaming']['peak_rss_mb']:.0f} MB |\n"
        f"| {ref['tool']} (reference, issue 3) | {ref['seconds']:.0f} s | {ref['peak_rss_mb']:.0f} MB |\n"
        f"| target | ≤ {tgt['seconds']:.0f} s | ≤ {tgt['peak_rss_mb']:.0f} MB |\n\n"
        f"Output: {r['output_mb']:.0f} MB. Meets target: **{'yes' if r['meets_target'] else 'no'}**.\n\n"
        + _verify_md(r.get("verify"))
        + "What made the difference: safetensors headers parsed and tensors read with `readinto` (no torch "
        "import, no memory map whose touched pages count as resident), bf16 widened to float32 by a bit "
        "shift, tensors of 8 M+ elements that the architecture leaves unchanged (the 262144 x 640 "
        "embedding) converted and written in row chunks of 4 M elements, and metadata arrays (262 k "
        "tokens, scores, types) packed in one go instead of item by item; the bytes written are identical "
        "to the unchunked path.\n\n"
        f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, {r['machine']['platform']}; "
        f"{r['machine']['note']}. Measured {r['date_utc']} UTC.\n\n"
        "Reproduce: `python benchmarks/convert.py --verify` (builds the random checkpoint once under "
        "`/tmp/gguf-factory-bench`).\n"
    )


def _verify_md(v: dict[str, Any] | None) -> str:
    if not v:
        return ""
    return (
        f"`gguf-factory verify` on the F16 output: **{'pass' if v['ok'] else 'FAIL'}**: "
        f"{v['tokenizer_mismatches']} tokenizer mismatches on {v['tokenizer_texts']} texts (built-in + 27 "
        f"chatterbot-corpus languages), greedy identical on {v['greedy_identical']} prompts, top-1 agreement "
        f"{v['top1_agreement']:.2%} over {v['positions']} positions, max |Δ log-softmax| "
        f"{v['max_abs_logprob_diff']:.2g}.\n\n"
    )


if __name__ == "__main__":
    sys.exit(main())
