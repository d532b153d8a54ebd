"""Benchmark `convert`: speed and memory side by side with llama.cpp's own converter, and parity per family.

1. Speed and peak RSS of ``gguf-factory convert --outtype f16`` and of llama.cpp's ``convert_hf_to_gguf.py``
   (from the llama-cpp-python sdist of the installed version: its vendored llama.cpp and gguf-py), measured in
   the same run on the same ~270 M-parameter bf16 checkpoint with a 262 k-token vocabulary (the shape of
   Gemma 3 270M: 18 layers, hidden 640). Each run is a fresh process; peak RSS is that process's own
   ``ru_maxrss`` (``os.wait4``); the order of the two tools alternates run by run; medians with min-max.
   The checkpoint is built once from transformers' Gemma3 config with random weights, a generated
   SentencePiece-style BPE ``tokenizer.json`` of 262144 tokens (what we read) and the same vocabulary as a
   SentencePiece ``tokenizer.model`` (what llama.cpp's converter reads for Gemma 3), cached under ``--work``.
   The two F16 files are then compared tensor by tensor.
2. Parity of every family in gguf_factory.convert.families (tests/model_builders.py's tiny checkpoints):
   tokenizer ids, greedy, top-1 (F32, F16) through llama.cpp, and GGUF -> HF (gguf_factory.convert.from_gguf)
   where that direction supports the architecture.

Results: ``benchmarks/results/convert.json`` and ``convert.md``.

    python benchmarks/convert.py [--work /tmp/gguf-factory-bench] [--runs 3] [--skip-speed] [--skip-families]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from stamp import git_commit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SPM_SPACE = "\u2581"
VOCAB_SIZE = 262144
TARGET = {"seconds": 8.0, "peak_rss_mb": 600.0}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHAT = ["<start_of_turn>", "<end_of_turn>"]


# ---------------------------------------------------------------------------------------------------
# The benchmark checkpoint
# ---------------------------------------------------------------------------------------------------


def _vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, the 256 byte-fallback tokens, then 1-, 2- and 3-character pieces with their merges (every
    split of a piece is a merge, ranked in vocabulary order, so Hugging Face's merge-rank BPE and llama.cpp's
    score-based SentencePiece agree)."""
    alphabet = [
        SPM_SPACE,
        *"abcdefghijklmnopqrstuvwxyz",
        *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        *"0123456789",
        ".",
        ",",
    ]
    vocab: dict[str, int] = {}
    for t in [*SPECIALS, *CHAT, *(f"<0x{b:02X}>" for b in range(256)), *alphabet]:
        vocab[t] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a, b in itertools.product(alphabet, repeat=2):
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    for a, b, c in itertools.product(alphabet, repeat=3):
        if len(vocab) >= VOCAB_SIZE:
            break
        vocab[a + b + c] = len(vocab)
        merges += [(a + b, c), (a, b + c)]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def _tokenizer_files(out: Path) -> None:
    """tokenizer.json (Gemma 3's layout), tokenizer.model (the same pieces as a SentencePiece BPE model) and
    tokenizer_config.json."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = _vocab()
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS + CHAT])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(out / "tokenizer.json"))

    proto = sp_pb2.ModelProto()
    kinds = {"<unk>": 2, **dict.fromkeys(["<pad>", "<eos>", "<bos>", *CHAT], 3)}
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        p = proto.pieces.add()
        p.piece = piece
        p.score = -float(i)
        p.type = kinds.get(piece, 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else 1)
    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = VOCAB_SIZE
    t.byte_fallback = True
    t.pad_id, t.eos_id, t.bos_id, t.unk_id = 0, 1, 2, 3
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
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
    out = work / "gemma3-270m-random-v3"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tmp = work / "gemma3-270m-random-v3.partial"
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
    _tokenizer_files(tmp)
    (tmp / "params.txt").write_text(f"{n_params}\n")
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------
# llama.cpp's converter, from the llama-cpp-python sdist of the installed version
# ---------------------------------------------------------------------------------------------------


def llama_cpp_converter(work: Path) -> tuple[Path, dict[str, str]]:
    """(convert_hf_to_gguf.py, version info), downloading and unpacking the sdist once (pip, PyPI)."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    root = work / f"llama_cpp_python-{ver}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        sdist = work / f"llama_cpp_python-{ver}.tar.gz"
        if not sdist.is_file():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-binary", ":all:",
                 "--no-deps", "-d", str(work), "-q"],
                check=True,
            )  # fmt: skip
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    changelog = (root / "CHANGELOG.md").read_text(encoding="utf-8")
    section = changelog.split(f"## [{ver}]", 1)[-1]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return script, {
        "tool": "llama.cpp convert_hf_to_gguf.py",
        "llama_cpp_python": ver,
        "llama_cpp_commit": m.group(1) if m else "unknown",
        "source": f"llama-cpp-python {ver} sdist (vendor/llama.cpp, its own gguf-py)",
    }


def run_measured(cmd: list[str], cwd: Path | None = None) -> dict[str, float]:
    """One fresh process: wall seconds and its peak RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {code}):\n{err[-3000:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # less sensitive to a busy shared machine
        "peak_rss_mb": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
    }


def compare_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Tensors of two GGUFs by name: how many have the same type, shape and bytes."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = [
        n
        for n in ta
        if n in tb
        and ta[n].tensor_type == tb[n].tensor_type
        and list(ta[n].shape) == list(tb[n].shape)
        and np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))
    ]
    return {
        "ours": len(ta),
        "llama_cpp": len(tb),
        "identical": len(same),
        "only_ours": sorted(set(ta) - set(tb)),
        "only_llama_cpp": sorted(set(tb) - set(ta)),
        "different": sorted(n for n in set(ta) & set(tb) if n not in same),
    }


def speed(work: Path, runs: int) -> dict[str, Any]:
    # Built in a child process: a child forked from a parent holding the model would count the parent's
    # pages in its own peak RSS.
    subprocess.run([sys.executable, __file__, "--work", str(work), "--build-only"], check=True)
    model_dir = build_model(work)
    script, ref = llama_cpp_converter(work)
    n_params = int((model_dir / "params.txt").read_text())
    outs = {"gguf-factory": work / "ours-F16.gguf", "llama.cpp": work / "llama-cpp-F16.gguf"}
    cmds = {
        "gguf-factory": [sys.executable, "-m", "gguf_factory.cli", "convert", str(model_dir), "-o",
                         str(outs["gguf-factory"]), "--outtype", "f16"],
        "llama.cpp": [sys.executable, str(script), str(model_dir), "--outfile", str(outs["llama.cpp"]),
                      "--outtype", "f16"],
    }  # fmt: skip
    measured: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
    for i in range(runs):
        order = list(cmds) if i % 2 == 0 else list(cmds)[::-1]
        for tool in order:
            outs[tool].unlink(missing_ok=True)
            r = run_measured(cmds[tool])
            r["order"] = order.index(tool)
            measured[tool].append(r)
            print(
                f"run {i + 1} {tool}: {r['seconds']:.2f} s ({r['cpu_seconds']:.1f} s CPU), peak RSS "
                f"{r['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    def summary(rs: list[dict[str, float]]) -> dict[str, Any]:
        return {
            key: {
                "median": round(statistics.median(r[key] for r in rs), 2),
                "min": round(min(r[key] for r in rs), 2),
                "max": round(max(r[key] for r in rs), 2),
            }
            for key in ("seconds", "cpu_seconds", "peak_rss_mb")
        }

    rows = {tool: {"runs": rs, **summary(rs), "output_mb": round(outs[tool].stat().st_size / 1e6, 1)}
            for tool, rs in measured.items()}  # fmt: skip
    ours = rows["gguf-factory"]
    result = {
        "model": {
            "architecture": "Gemma3ForCausalLM (random weights)",
            "parameters": n_params,
            "vocab_size": VOCAB_SIZE,
            "source_dtype": "bf16",
            "safetensors_mb": round((model_dir / "model.safetensors").stat().st_size / 1e6, 1),
        },
        "outtype": "f16",
        "commands": {
            k: " ".join(Path(c).name if j < 2 else c for j, c in enumerate(v)) for k, v in cmds.items()
        },
        "llama_cpp": ref,
        "rows": rows,
        "target": TARGET,
        "meets_target": ours["seconds"]["median"] <= TARGET["seconds"]
        and ours["peak_rss_mb"]["median"] <= TARGET["peak_rss_mb"],
        "tensors": compare_tensors(outs["gguf-factory"], outs["llama.cpp"]),
    }
    for p in outs.values():
        p.unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------------------------------------------
# Parity per family
# ---------------------------------------------------------------------------------------------------


def gguf_to_hf_check(name: str, f32: Path, hf_dir: Path, workdir: Path) -> dict[str, Any]:
    """The F32 GGUF rebuilt as a HF checkpoint: tokenizer ids = llama.cpp's, top-1 = the original's."""
    try:
        from gguf_factory.convert import from_gguf
    except ImportError:
        return {"status": "—", "why": "gguf_factory.convert.from_gguf is not there"}
    import gguf

    arch = gguf.GGUFReader(f32).get_field("general.architecture").contents()
    if arch not in from_gguf.supported_architectures():
        return {"status": "—", "why": f"from_gguf does not rebuild {arch!r}"}
    import numpy as np

    import model_builders as mb
    from gguf_factory.verify import check_tokenizer_parity

    out = workdir / f"rebuilt-{name}"
    try:
        if not out.exists():
            from_gguf.gguf_to_hf(f32, out)
        tok = check_tokenizer_parity(f32, out, mb.PARITY_TEXTS)
        hf, (rebuilt,) = mb.hf_position_logits([hf_dir, out], mb.prompts_for(name) + mb.LOGIT_TEXTS)
        top1 = float((hf.argmax(-1) == rebuilt.argmax(-1)).mean())
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"status": "❌", "why": f"{type(e).__name__}: {str(e)[:200]}"}
    ok = tok.ok and top1 >= 0.999
    return {
        "status": "✅" if ok else "❌",
        "tokenizer_mismatches": len(tok.mismatches),
        "top1_vs_original": round(top1, 5),
        "max_abs_logit_diff": float(np.abs(hf - rebuilt).max()),
    }


def families(work: Path, only: list[str] | None) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "tests"))
    import model_builders as mb
    from gguf_factory.convert.families import FAMILIES

    workdir = work / "families"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam in FAMILIES:
        if only and fam.key not in only:
            continue
        t0 = time.perf_counter()
        r = mb.run_parity(fam.key, workdir)
        tok_ok = not r.tokenizer_mismatches
        row: dict[str, Any] = {
            "key": fam.key,
            "family": fam.name,
            "arch": r.fields["general.architecture"],
            "vocab": f"{r.fields['tokenizer.ggml.model']}"
            + (f" / {r.fields['tokenizer.ggml.pre']}" if "tokenizer.ggml.pre" in r.fields else ""),
            "tokenizer_mismatches": len(r.tokenizer_mismatches),
            "tokenizer_checks": r.tokenizer_checks,
            "greedy_identical": not r.greedy_mismatches,
            "positions": r.positions,
            "top1_f32": r.top1_f32,
            "max_abs_logprob_diff_f32": round(r.max_diff_f32, 5),
            "f32_unexplained_flips": r.f32_unexplained_flips,
            "top1_f32_ggml_gelu": r.top1_f32_ggml_gelu,
            "max_abs_logprob_diff_f32_ggml_gelu": None
            if r.max_diff_f32_ggml_gelu is None
            else round(r.max_diff_f32_ggml_gelu, 5),
            "top1_f16": r.top1_f16 or 0.0,
            "f16_unexplained_flips": r.f16_unexplained_flips,
            "verified": list(fam.verified),
            "note": fam.note,
        }
        if not tok_ok and fam.tokenizer_exception == "llama-tokenizer-class":
            row["tokenizer_vs_tokenizer_json"] = _tokenizer_json_mismatches(r, workdir)
        row["gguf_to_hf"] = gguf_to_hf_check(fam.key, r.f32, r.hf_dir, workdir)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        shown = {k: row[k] for k in ("tokenizer_mismatches", "greedy_identical", "top1_f32", "top1_f16")}
        print(f"{fam.key}: {json.dumps(shown)} GGUF->HF {row['gguf_to_hf']['status']}", flush=True)
    return rows


def _tokenizer_json_mismatches(r: Any, workdir: Path) -> int:
    """Mismatches against transformers running the shipped tokenizer.json (not the LlamaTokenizer class)."""
    import shutil

    import model_builders as mb
    from gguf_factory.verify import check_tokenizer_parity

    d = workdir / f"{r.name}-tokenizer-json"
    if not d.exists():
        shutil.copytree(r.hf_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return len(check_tokenizer_parity(r.f32, d, mb.PARITY_TEXTS).mismatches)


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-factory-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-families", action="store_true")
    ap.add_argument("--families", help="Comma-separated family keys (default: all).")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build_model(args.work)
        return 0
    previous = {}
    json_path = args.results / "convert.json"
    if json_path.is_file():
        previous = json.loads(json_path.read_text())
    result: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": git_commit(),
        "command": "python benchmarks/convert.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "shared machine: other jobs ran at the same time, so timings are noisy",
        },
    }
    load_before = os.getloadavg()[0]
    result["speed"] = previous.get("speed") if args.skip_speed else speed(args.work, args.runs)
    if not args.skip_speed:
        result["speed"]["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        result["speed"]["date_utc"] = result["date_utc"]
        result["speed"]["run_command"] = result["command"]
    if args.skip_families:
        result["families"] = previous.get("families")
        result["families_date_utc"] = previous.get("families_date_utc") or previous.get("date_utc")
        result["families_command"] = previous.get("families_command")
    else:
        result["families_date_utc"] = result["date_utc"]
        result["families_command"] = result["command"]
        only = args.families.split(",") if args.families else None
        rows = families(args.work, only)
        if only and previous.get("families"):
            keep = {r["key"]: r for r in previous["families"]}
            keep.update({r["key"]: r for r in rows})
            rows = list(keep.values())
        result["families"] = rows
    args.results.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    md = render_md(result)
    (args.results / "convert.md").write_text(md)
    print(md)
    return 0


def _cell(stat: dict[str, float], unit: str, digits: int) -> str:
    return f"{stat['median']:.{digits}f} {unit} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def render_md(r: dict[str, Any]) -> str:
    out = [
        "# convert benchmark\n",
        f"Written {r['date_utc']} UTC at commit `{r['commit']}` (plus the working tree): `{r['command']}`. "
        "Machine: "
        f"{r['machine']['cpus']} CPUs, Python {r['machine']['python']}, {r['machine']['platform']}; "
        f"{r['machine']['note']}.\n",
    ]
    s = r.get("speed")
    if s:
        m, ref, tgt = s["model"], s["llama_cpp"], s["target"]
        n_runs = len(s["rows"]["gguf-factory"]["runs"])
        out += [
            "## Speed and memory, side by side\n",
            f"Measured {s.get('date_utc', r['date_utc'])} UTC: `{s.get('run_command', r['command'])}`.\n",
            f"F16 conversion of a {m['parameters'] / 1e6:.0f} M-parameter {m['source_dtype']} checkpoint "
            f"({m['architecture']}, vocabulary {m['vocab_size']:,} tokens, safetensors "
            f"{m['safetensors_mb']:.0f} MB). Each run is a fresh process, the two tools alternate which goes "
            f"first; {n_runs} runs each, medians (min–max). Peak RSS is the converting process's own "
            "`ru_maxrss`. llama.cpp's converter: "
            f"{ref['source']}, llama.cpp `{ref['llama_cpp_commit']}`. The machine's 1-minute load average "
            f"was {s.get('load_average', ['?', '?'])[0]} before and {s.get('load_average', ['?', '?'])[1]} "
            f"after ({r['machine']['cpus']} CPUs): wall times stretch with it, CPU times (user + system) "
            "much less.\n",
            "| converter | time | CPU time | peak RSS | output |\n|---|---:|---:|---:|---:|",
        ]
        for tool, row in s["rows"].items():
            label = "gguf-factory convert" if tool == "gguf-factory" else ref["tool"]
            cpu = _cell(row["cpu_seconds"], "s", 2) if "cpu_seconds" in row else "—"
            out.append(
                f"| {label} | {_cell(row['seconds'], 's', 2)} | {cpu} "
                f"| {_cell(row['peak_rss_mb'], 'MB', 0)} | {row['output_mb']:.0f} MB |"
            )
        out.append(f"| target (ours) | ≤ {tgt['seconds']:.0f} s | | ≤ {tgt['peak_rss_mb']:.0f} MB | |\n")
        t = s["tensors"]
        out.append(
            f"Meets target: **{'yes' if s['meets_target'] else 'no'}**. The two F16 files: "
            f"{t['identical']} of {t['ours']} tensors byte-identical"
            + (f"; differing: {', '.join(t['different'][:6])}" if t["different"] else "")
            + (f"; only in ours: {', '.join(t['only_ours'][:6])}" if t["only_ours"] else "")
            + (f"; only in llama.cpp's: {', '.join(t['only_llama_cpp'][:6])}" if t["only_llama_cpp"] else "")
            + ".\n"
        )
        out.append("Every run: " + "; ".join(
            f"{tool} {x['seconds']:.2f} s ({x['cpu_seconds']:.1f} s CPU) / {x['peak_rss_mb']:.0f} MB"
            for tool, row in s["rows"].items()
            for x in row["runs"]) + ".\n")  # fmt: skip
    fams = r.get("families")
    if fams:
        out += [
            "## Parity per family\n",
            f"Measured {r.get('families_date_utc') or r['date_utc']} UTC: "
            f"`{r.get('families_command') or r['command']}`.\n",
            "Tiny random-weight checkpoints from transformers' config classes with tokenizer.json in each "
            "family's real layout (tests/model_builders.py), converted and run in llama.cpp. tokenizer: 0 id "
            "mismatches (plain and chat-template renderings); greedy: identical continuations (F32); top-1: "
            "F32 ≥ 99.9 % over > 1000 positions, F16 with no flip that llama.cpp's half-precision error does "
            "not explain; GGUF→HF: gguf_factory.convert.from_gguf rebuilds the F32 GGUF, its tokenizer gives "
            "llama.cpp's ids and its top-1 matches the original (— where it does not take the "
            "architecture).\n",
            "| family | llama.cpp | vocab | tokenizer | greedy | top-1 F32 | top-1 F16 | GGUF→HF |",
            "|---|---|---|:-:|:-:|---:|---:|:-:|",
        ]
        notes = []
        for f in fams:
            tok = "✅" if f["tokenizer_mismatches"] == 0 else "❌"
            if f.get("tokenizer_vs_tokenizer_json") == 0:
                tok = "✅¹"
            greedy = "✅" if f["greedy_identical"] else "❌"
            top1 = f"{'✅' if f['top1_f32'] >= 0.999 else '❌'} {f['top1_f32']:.2%}"
            matched = f.get("top1_f32_ggml_gelu")
            if matched is not None and f["top1_f32"] < 0.999:
                top1 = f"{'✅' if matched >= 0.999 else '❌'} {f['top1_f32']:.2%} ({matched:.2%}²)"
            f16_ok = f["f16_unexplained_flips"] == 0
            top16 = f"{'✅' if f16_ok else '❌'} {f['top1_f16']:.2%}"
            g = f["gguf_to_hf"]["status"]
            out.append(
                f"| {f['family']} | {f['arch']} | {f['vocab']} | {tok} | {greedy} | {top1} | {top16} | {g} |"
            )
            if f["note"]:
                notes.append(f"- {f['family']}: {f['note']}.")
            if g == "❌":
                notes.append(f"- {f['family']} GGUF→HF: {f['gguf_to_hf'].get('why') or f['gguf_to_hf']}.")
        out.append("")
        out.append(
            "¹ 0 mismatches against transformers running the tokenizer.json the checkpoint ships; "
            "transformers' LlamaTokenizer(legacy=false) class, which it loads by default, differs from that "
            "file.\n"
        )
        if any(f.get("top1_f32_ggml_gelu") is not None and f["top1_f32"] < 0.999 for f in fams):
            out.append(
                "² against transformers computing GELU as ggml's CPU backend does (tanh approximation at the "
                "input rounded to fp16, result rounded to fp16: its lookup table; "
                "tests/model_builders.py `ggml_gelu_module`): what is left when llama.cpp's GELU arithmetic "
                "is taken out of the comparison. The figure before it is against transformers as is.\n"
            )
        out += notes
        out.append("")
    out.append(
        "Reproduce: `python benchmarks/convert.py` (checkpoints are built under `/tmp/gguf-factory-bench`).\n"
    )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
