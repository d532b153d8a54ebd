"""Doctor figures: the corrupted-file corpus (detected, repaired, loaded by llama.cpp), gguf-py's
GGUFReader on the same hostile files, and a mutation fuzz run of the safe reader.

Fuzzing is hypothesis-free: seeded random byte flips, bit flips, "interesting" integers written over
header fields, truncations, insertions, deletions and splices of a valid tiny GGUF, mostly aimed at the
header. Each mutated file goes through the reader and the structure + metadata checks in memory; every
``--full-every``-th case is also written to disk and run through the whole ``validate`` (data + template).
Only :class:`GGUFFormatError` may escape; anything else is recorded with the seed that reproduces it.
The fuzz loop runs under a 2 GiB address-space limit.

    python benchmarks/doctor_fuzz.py [--base tiny.gguf] [--cases 100000] [--seed 1] [--work DIR]

Writes benchmarks/results/doctor.json and doctor.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gguf_factory.doctor import GGUFFormatError, Severity, read_gguf, validate
from gguf_factory.doctor.reader import read_gguf_bytes
from gguf_factory.doctor.repair import RepairError, repair
from gguf_factory.doctor.validate import check_metadata, check_structure
from gguf_factory.errors import InputError
from gguf_factory.quantize import scan_gguf_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from corrupt_corpus import CASES, KV, VT, Raw, load_model, make_corpus, serialize  # noqa: E402
from stamp import git_commit, machine  # noqa: E402

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 64, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip
LIMIT_AS = 2 << 30


def build_base(work: Path) -> Path:
    """The tiny chat model of tests/conftest.py (trained, converted to F16), reused when present."""
    out = work / "tiny-F16.gguf"
    if out.exists():
        return out
    from gguf_factory.convert import convert
    from gguf_factory.data import prepare
    from gguf_factory.train import train
    from gguf_factory.train.scratch import ModelPreset

    prepare(
        None, work / "data", categories=["greetings", "humor", "food"], val_fraction=0.15, test_fraction=0.2
    )
    preset = ModelPreset(
        name="test-tiny",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=512,
        max_seq_len=128,
        epochs=4,
        lr=3e-3,
        batch_size=16,
    )
    train(work / "data", work / "model-hf", preset=preset, progress=False, seed=7)
    convert(work / "model-hf", out, outtype="f16")
    return out


# --------------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------------


def corpus_figures(base: Path, work: Path) -> dict[str, Any]:
    files = make_corpus(base, work / "corpus")
    fixed_dir = work / "repaired"
    fixed_dir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    repaired: list[str] = []
    for case in CASES:
        t0 = time.perf_counter()
        r = validate(files[case.name], smoke=False)
        secs = time.perf_counter() - t0
        codes = {f.code for f in r.at_least(Severity.WARNING)}
        detected = case.expect in codes and codes <= {case.expect} | case.also and r.unusable == case.unusable
        row: dict[str, Any] = {
            "case": case.name,
            "kind": case.kind,
            "expect": case.expect,
            "detected": detected,
            "exit_code": r.exit_code,
            "seconds": round(secs, 4),
        }
        out = fixed_dir / f"{case.name}.gguf"
        try:
            rep = repair(files[case.name], out)
            row["repair"] = "fixed" if rep.after.exit_code == 0 else "partly"
            if rep.after.exit_code == 0:
                repaired.append(str(out))
        except RepairError:
            row["repair"] = "refused"
        row["repair_expected"] = case.repairable
        rows.append(row)
    script = (
        "import json, sys\n"
        "from gguf_factory.doctor.smoke import _run_in_child\n"
        "print(json.dumps({p: _run_in_child(p, 4, 128)['ok'] for p in sys.argv[1:]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *repaired], capture_output=True, text=True, check=False
    )
    loaded = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    for row in rows:
        row["llama_cpp_loads_repaired"] = loaded.get(str(fixed_dir / f"{row['case']}.gguf"))
    clean = validate(files["clean"])
    return {
        "cases": rows,
        "n_cases": len(rows),
        "n_kinds": len({c.expect for c in CASES}),
        "detected": sum(r["detected"] for r in rows),
        "repairable": sum(c.repairable for c in CASES),
        "repaired": sum(r["repair"] == "fixed" for r in rows),
        "repaired_and_loaded": sum(bool(r["llama_cpp_loads_repaired"]) for r in rows),
        "clean_exit_code": clean.exit_code,
        "clean_smoke_ok": bool(clean.smoke and clean.smoke.ok),
        "slowest_case": max(rows, key=lambda r: r["seconds"]),
    }


SOURCE_CASES = ("nan", "inf", "all-zero", "truncated-data", "overlapping-tensors", "offset-out-of-bounds")


def _same_tensor_bytes(a: Path, b: Path) -> bool:
    from gguf_factory.doctor.reader import tensor_data

    ga, gb = read_gguf(a), read_gguf(b)
    for t in ga.tensors:
        u = gb.tensor(t.name)
        x, y = tensor_data(ga, t), None if u is None else tensor_data(gb, u)
        if x is None or y is None or bytes(x) != bytes(y):
            return False
    return len(ga.tensors) == len(gb.tensors)


def source_figures(work: Path, hf_dir: Path | None) -> list[dict[str, Any]]:
    """Damaged tensor data rebuilt with ``repair --source``: from the good GGUF, and from the Hugging Face
    folder (converted by our converter into a temporary GGUF beside the output)."""
    files = {p.stem: p for p in (work / "corpus").glob("*.gguf")}
    out_dir = work / "rebuilt"
    out_dir.mkdir(exist_ok=True)
    sources: list[tuple[str, Path]] = [("GGUF", files["clean"])]
    if hf_dir is not None and (hf_dir / "config.json").is_file():
        sources.append(("HF folder", hf_dir))
    rows = []
    for case in SOURCE_CASES:
        for label, src in sources:
            out = out_dir / f"{case}-{label.split()[0]}.gguf"
            t0 = time.perf_counter()
            try:
                rep = repair(files[case], out, source=src, smoke=True)
                outcome = "fixed" if rep.after.exit_code == 0 else "partly"
                smoke_ok = bool(rep.after.smoke and rep.after.smoke.ok)
                same = _same_tensor_bytes(files["clean"], out)
            except RepairError as e:
                outcome, smoke_ok, same = f"refused: {e}"[:100], False, False
            rows.append(
                {
                    "case": case,
                    "source": label,
                    "outcome": outcome,
                    "identical_to_undamaged": same,
                    "llama_cpp_smoke_ok": smoke_ok,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------------
# gguf-py's GGUFReader on the same files
# --------------------------------------------------------------------------------------------------

GGUFPY_PROBE = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (@LIMIT@, @LIMIT@))
import gguf
t = time.perf_counter()
try:
    r = gguf.GGUFReader(sys.argv[1])
    out = {"outcome": "parsed"}
except BaseException as e:
    out = {"outcome": type(e).__name__, "message": str(e)[:120]}
out["seconds"] = round(time.perf_counter() - t, 3)
out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps(out))
""".replace("@LIMIT@", str(LIMIT_AS))


def hostile_extras(base: Path, work: Path) -> dict[str, Path]:
    """Arrays that claim millions of numeric elements in a small file (the length check that matters)."""
    m = load_model(base)
    kvs = list(m.kvs)
    out: dict[str, Path] = {}
    for n in (10**6, 10**7, 10**9):
        m.kvs = [KV("x.big", VT.ARRAY, Raw(struct.pack("<IIQ", VT.ARRAY, VT.UINT8, n))), *kvs]
        p = work / f"hostile-u8-array-{n}.gguf"
        p.write_bytes(serialize(m))
        out[p.stem] = p
    return out


def ggufpy_figures(files: dict[str, Path], timeout: float) -> list[dict[str, Any]]:
    rows = []
    for name, path in files.items():
        try:
            proc = subprocess.run([sys.executable, "-c", GGUFPY_PROBE, str(path)], capture_output=True,
                                  text=True, timeout=timeout, check=False)  # fmt: skip
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if lines:
                theirs = json.loads(lines[-1])
            else:  # killed by the memory limit while building its result
                tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
                theirs = {"outcome": f"died (exit {proc.returncode}): {tail[0][:60]}"}
        except subprocess.TimeoutExpired:
            theirs = {"outcome": f"timeout ({timeout:g} s)"}
        t0 = time.perf_counter()
        try:
            read_gguf(path)
            ours = "parsed"
        except GGUFFormatError as e:
            ours = f"GGUFFormatError({e.code})"
        rows.append(
            {
                "file": name,
                "gguf_py": theirs,
                "ours": ours,
                "ours_seconds": round(time.perf_counter() - t0, 4),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# fuzz
# --------------------------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random, header_end: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        n = len(b)
        if n == 0:
            break
        hot = min(n, header_end) if rng.random() < 0.9 else n
        pos = rng.randrange(hot)
        op = rng.randrange(7)
        if op == 0:  # random bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(hot)] = rng.randrange(256)
        elif op == 1:  # one bit
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 2:  # an interesting integer over a field
            width = rng.choice((1, 2, 4, 8))
            v = rng.choice([*INTERESTING, n, n + 1, n - pos, rng.randrange(1 << 16)]) % (1 << (8 * width))
            b[pos : pos + width] = v.to_bytes(width, "little")
        elif op == 3:  # truncate
            del b[rng.randrange(n) if rng.random() < 0.5 else pos :]
        elif op == 4:  # insert
            b[pos:pos] = rng.randbytes(rng.randint(1, 64))
        elif op == 5:  # delete
            del b[pos : pos + rng.randint(1, 64)]
        else:  # splice a copy of another header range
            src = rng.randrange(hot)
            b[pos:pos] = b[src : src + rng.randint(1, 256)]
    return bytes(b)


def fuzz(base: Path, cases: int, seed: int, full_every: int, work: Path) -> dict[str, Any]:
    data = base.read_bytes()
    header_end = read_gguf(base).data_offset
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, hard))
    outcomes: Counter[str] = Counter()
    scan_outcomes: Counter[str] = Counter()
    escaped: list[dict[str, Any]] = []
    times: list[float] = []
    slowest = {"seconds": 0.0}
    full_runs = 0
    target = work / "fuzz-case.gguf"
    t_all = time.perf_counter()
    for i in range(cases):
        case_seed = seed * 1_000_003 + i
        rng = random.Random(case_seed)
        m = mutate(data, rng, header_end)
        t0 = time.perf_counter()
        try:  # the header scan that quantize, runtime, serve and verify use: only InputError may escape
            scan_gguf_bytes(m, f"case-{case_seed}")
            scan_outcomes["parsed"] += 1
        except InputError:
            scan_outcomes["refused"] += 1
        except BaseException as e:  # noqa: BLE001 - recorded like the doctor's escapes
            scan_outcomes["ESCAPED"] += 1
            escaped.append({"seed": case_seed, "reader": "scan_gguf_header", "type": type(e).__name__,
                            "message": str(e)[:200]})  # fmt: skip
        try:
            g = read_gguf_bytes(m, f"case-{case_seed}")
            check_structure(g)
            check_metadata(g)
            outcomes["parsed"] += 1
            if full_every and i % full_every == 0:
                target.write_bytes(m)
                validate(target, smoke=False, template_timeout=1.0)
                full_runs += 1
        except GGUFFormatError as e:
            outcomes[e.code] += 1
        except BaseException as e:  # noqa: BLE001 - the point: record anything that escapes
            outcomes["ESCAPED"] += 1
            escaped.append(
                {"seed": case_seed, "reader": "doctor", "type": type(e).__name__, "message": str(e)[:200]}
            )
        dt = time.perf_counter() - t0
        times.append(dt)
        if dt > slowest["seconds"]:
            slowest = {"seconds": dt, "seed": case_seed, "size": len(m)}
        if (i + 1) % 10000 == 0:
            n_out = outcomes["ESCAPED"] + scan_outcomes["ESCAPED"]
            print(f"  {i + 1}/{cases} cases, {n_out} escaped", flush=True)
    total = time.perf_counter() - t_all
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    times.sort()
    return {
        "cases": cases,
        "seed": seed,
        "full_validate_runs": full_runs,
        "outcomes": dict(outcomes.most_common()),
        "header_scan_outcomes": dict(scan_outcomes.most_common()),
        "escaped": escaped[:20],
        "n_escaped": outcomes["ESCAPED"] + scan_outcomes["ESCAPED"],
        "mean_ms": round(statistics.fmean(times) * 1000, 3),
        "p99_ms": round(times[int(0.99 * (len(times) - 1))] * 1000, 3),
        "slowest": {**slowest, "seconds": round(slowest["seconds"], 4)},
        "total_seconds": round(total, 1),
        "address_space_limit_gib": LIMIT_AS / 2**30,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


# --------------------------------------------------------------------------------------------------


def source_bullet(rows: list[dict[str, Any]]) -> list[str]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    parts = [
        f"{sum(r['outcome'] == 'fixed' and r['identical_to_undamaged'] for r in rs)}/{len(rs)} from "
        + ("a good GGUF" if src == "GGUF" else "the Hugging Face folder")
        for src, rs in by.items()
    ]
    if not parts:
        return []
    return [
        f"- With `repair --source`, the data-damage cases ({', '.join(sorted({r['case'] for r in rows}))}) "
        f"are rebuilt to the undamaged file's exact bytes: {', '.join(parts)} (table below)."
    ]


def ggufpy_summary(rows: list[dict[str, Any]]) -> list[str]:
    """What the comparison shows to be unsafe in gguf-py's reader, in figures from this run."""
    g = [r["gguf_py"] for r in rows]
    raised = Counter(o["outcome"] for o in g if o["outcome"] != "parsed" and "seconds" in o)
    died = [r["file"] for r in rows if "seconds" not in r["gguf_py"]]
    timed = [r for r in rows if "seconds" in r["gguf_py"]]
    slow = max(timed, key=lambda r: r["gguf_py"]["seconds"]) if timed else None
    fat = max(timed, key=lambda r: r["gguf_py"].get("max_rss_mb", 0)) if timed else None
    ours_slow = max(rows, key=lambda r: r["ours_seconds"]) if rows else None
    out = [
        "What this shows to be unsafe in gguf-py's `GGUFReader` (why `validate` uses its own reader and "
        "takes only gguf-py's constants, and gguf-py's writer for `repair`):",
        "",
        "- it has no error type of its own: corrupt files raise "
        + ", ".join(f"{k} ({v} file{'s' * (v > 1)})" for k, v in raised.most_common())
        + ", indistinguishable from bugs;",
        "- it trusts the counts and lengths in the header: arrays that claim millions of elements are "
        "walked element by element (a Python object per element) before the file's end stops it"
        + (
            f" — `{slow['file']}` took {slow['gguf_py']['seconds']} s and "
            f"{fat['gguf_py'].get('max_rss_mb')} MB peak RSS (`{fat['file']}`)"
            if slow and fat
            else ""
        )
        + ";",
    ]
    if died:
        out.append(f"- {len(died)} file(s) killed the process under the 2 GiB limit: {', '.join(died)};")
    out.append(
        "- it stops at defects a validator must report and read past (duplicate keys or tensor names, bad "
        "alignment, out-of-bounds or unknown-type tensors), so nothing else in those files gets checked."
    )
    if ours_slow:
        out.append(
            f"\nOur reader: every file above in at most {ours_slow['ours_seconds'] * 1000:.1f} ms "
            f"(`{ours_slow['file']}`), only GGUFFormatError raised."
        )
    return out


def markdown(res: dict[str, Any]) -> str:
    c, f = res["corpus"], res["fuzz"]
    lines = [
        "# Doctor: corrupted-file corpus, gguf-py comparison, reader fuzzing",
        "",
        f"Measured {res['date']}, commit {res['commit']}, on {res['machine']['cpus']} CPU cores "
        f"({res['machine']['cpu']['model']}, Python {res['python']}). Regenerate: `{res['command']}`.",
        "",
        "## Corpus (tests/corrupt_corpus.py, one defect per file)",
        "",
        f"- {c['n_cases']} corrupted files covering {c['n_kinds']} finding kinds; `validate` names "
        f"exactly the expected defect in **{c['detected']}/{c['n_cases']}**.",
        f"- `repair` fixes **{c['repaired']}/{c['repairable']}** repairable files "
        "(validate exit 0 afterwards); "
        f"llama.cpp loads and produces finite logits for {c['repaired_and_loaded']} of them; the others are "
        "refused with a reason (or keep their warning).",
        *source_bullet(res.get("source_rebuild") or []),
        f"- The clean file: exit code {c['clean_exit_code']}, llama.cpp smoke test "
        f"{'passed' if c['clean_smoke_ok'] else 'FAILED'}.",
        f"- Slowest corpus file: `{c['slowest_case']['case']}` {c['slowest_case']['seconds']:.2f} s "
        "(the template render timeout).",
        "",
        "| case | kind | expected finding | detected | exit | repair | llama.cpp loads repaired |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in c["cases"]:
        loads = {True: "yes", False: "no", None: "–"}[r["llama_cpp_loads_repaired"]]
        lines.append(
            f"| {r['case']} | {r['kind']} | `{r['expect']}` | {'yes' if r['detected'] else 'NO'} | "
            f"{r['exit_code']} | {r['repair']} | {loads} |"
        )
    if res.get("source_rebuild"):
        lines += [
            "",
            "## Rebuilding damaged tensors with `repair --source`",
            "",
            "From the good GGUF, and from the model's Hugging Face folder (converted by our `convert` into "
            "a temporary GGUF beside the output, removed afterwards); seconds include the llama.cpp smoke "
            "test.",
            "",
            "| case | source | outcome | tensors identical to the undamaged | llama.cpp smoke | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["source_rebuild"]:
            lines.append(
                f"| {r['case']} | {r['source']} | {r['outcome']} | "
                f"{'yes' if r['identical_to_undamaged'] else 'NO'} | "
                f"{'passed' if r['llama_cpp_smoke_ok'] else 'FAILED'} | {r['seconds']} |"
            )
    lines += [
        "",
        "## gguf-py's GGUFReader on the same files (2 GiB address-space limit)",
        "",
        *ggufpy_summary(res["gguf_py"]),
        "",
        "| file | gguf-py GGUFReader | seconds | peak RSS MB | our reader | our seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["gguf_py"]:
        g = r["gguf_py"]
        lines.append(
            f"| {r['file']} | {g['outcome']} | {g.get('seconds', '–')} | {g.get('max_rss_mb', '–')} | "
            f"{r['ours']} | {r['ours_seconds']} |"
        )
    lines += [
        "",
        "## Fuzz (mutations of the valid tiny GGUF, 2 GiB address-space limit)",
        "",
        f"- {f['cases']:,} mutated inputs (seed {f['seed']}), {f['full_validate_runs']} of them also "
        "through the full `validate` (data + template).",
        f"- Exceptions other than GGUFFormatError (the doctor's reader) or InputError (the header scan of "
        f"quantize, runtime, serve and verify) that escaped: **{f['n_escaped']}**. Header scan: "
        + ", ".join(f"{k} {v:,}" for k, v in f.get("header_scan_outcomes", {}).items())
        + ".",
        f"- Per case: mean {f['mean_ms']} ms, p99 {f['p99_ms']} ms, "
        f"slowest {f['slowest']['seconds'] * 1000:.1f} ms "
        f"(seed {f['slowest'].get('seed')}); total {f['total_seconds']} s; peak RSS {f['max_rss_mb']} MB.",
        "",
        "| outcome | cases |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:,} |" for k, v in f["outcomes"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base", type=Path, help="a valid GGUF (default: train and convert the tests' tiny model)"
    )
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--full-every", type=int, default=100)
    ap.add_argument("--ggufpy-timeout", type=float, default=60.0)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--hf", type=Path, help="the base model's HF folder (default: WORK/model-hf when trained here)"
    )
    ap.add_argument("--no-write", action="store_true", help="print the figures, do not write results/")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="doctor-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    base = args.base or build_base(work)
    print(f"base {base}; corpus ...", flush=True)
    corpus = corpus_figures(base, work)
    print(
        f"corpus: {corpus['detected']}/{corpus['n_cases']} detected, {corpus['repaired']} repaired",
        flush=True,
    )
    files = {p.stem: p for p in sorted((work / "corpus").glob("*.gguf"))}
    files.update(hostile_extras(base, work))
    print("gguf-py comparison ...", flush=True)
    ggufpy = ggufpy_figures(files, args.ggufpy_timeout)
    print(f"fuzz: {args.cases} cases ...", flush=True)
    fz = fuzz(base, args.cases, args.seed, args.full_every, work)
    # last: converting the HF folder imports torch, which would inflate the RSS figures above (and the
    # gguf-py probes' ru_maxrss, inherited through fork)
    print("repair --source ...", flush=True)
    rebuilt = source_figures(work, args.hf or (work / "model-hf"))
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "python": platform.python_version(),
        "corpus": corpus,
        "source_rebuild": rebuilt,
        "gguf_py": ggufpy,
        "fuzz": fz,
    }
    md = markdown(res)
    print(md)
    if not args.no_write:
        from gguf_factory.files import atomic_write_json, atomic_write_text

        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / "doctor.json", res)
        atomic_write_text(RESULTS / "doctor.md", md)
        print(f"wrote {RESULTS / 'doctor.json'} and {RESULTS / 'doctor.md'}")
    if fz["n_escaped"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
