"""The reader under hypothesis: 100 000 generated mutations of a valid GGUF (the property of
tests/test_doctor_fuzz.py, which CI runs with a few hundred), counting what came out.

    python benchmarks/doctor_hypothesis.py [--examples 100000] [--base tiny-F16.gguf] [--work DIR]

Writes benchmarks/results/doctor_hypothesis.json and .md. Exit 1 if any exception other than our
GGUFFormatError escaped the reader or the structure/metadata checks.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gguf_factory.doctor import GGUFFormatError
from gguf_factory.doctor.reader import read_gguf_bytes
from gguf_factory.doctor.validate import check_metadata, check_structure
from gguf_factory.files import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from doctor_fuzz import build_base  # noqa: E402
from stamp import git_commit, machine  # noqa: E402
from test_doctor_fuzz import MUTATION, mutate  # noqa: E402


def run(base: bytes, examples: int) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    escaped: Counter[str] = Counter()
    times: list[float] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
    def prop(mutations: list[tuple[str, float, bytes]]) -> None:
        data = mutate(base, mutations)
        t0 = time.perf_counter()
        try:
            g = read_gguf_bytes(data, "fuzzed.gguf")
            check_structure(g)
            check_metadata(g)
            outcomes["parsed"] += 1
        except GGUFFormatError as e:
            outcomes[f"rejected: {e.code}"] += 1
        except Exception as e:  # noqa: BLE001 - counted, reported, and the run fails
            escaped[f"{type(e).__name__}: {e}"[:200]] += 1
        times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    prop()
    return {
        "examples": len(times),
        "seconds": round(time.perf_counter() - t0, 1),
        "parsed": outcomes["parsed"],
        "rejected": sum(v for k, v in outcomes.items() if k.startswith("rejected")),
        "rejection_codes": dict(
            Counter({k[len("rejected: ") :]: v for k, v in outcomes.items() if k != "parsed"}).most_common()
        ),
        "escaped": dict(escaped),
        "mean_ms": round(statistics.fmean(times) * 1e3, 3) if times else None,
        "max_ms": round(max(times) * 1e3, 2) if times else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--base", type=Path, help="a valid GGUF (default: the tests' tiny model, built here)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="doctor-hypothesis-"))
    work.mkdir(parents=True, exist_ok=True)
    base = args.base or build_base(work)
    r = run(base.read_bytes(), args.examples)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "python": platform.python_version(),
        "base_bytes": base.stat().st_size,
        **r,
    }
    codes = ", ".join(f"`{k}` {v}" for k, v in list(r["rejection_codes"].items())[:12])
    md = "\n".join(
        [
            "# Doctor: the GGUF reader under hypothesis",
            "",
            f"{res['date']}, commit {res['commit']}, {res['machine']['cpus']} CPU cores "
            f"({res['machine']['cpu']['model']}), Python {res['python']}. Regenerate: `{res['command']}`.",
            "",
            f"- {r['examples']} generated mutation lists "
            "(overwrite / insert / delete / truncate / 64-bit value, "
            f"1-4 each, in the first 16 KiB of a {res['base_bytes']} B valid GGUF) in {r['seconds']} s.",
            f"- Parsed and checked: {r['parsed']}; rejected with our GGUFFormatError: {r['rejected']}; "
            f"**other exceptions: {sum(r['escaped'].values())}**.",
            f"- Per case: mean {r['mean_ms']} ms, slowest {r['max_ms']} ms.",
            f"- Most common rejection codes: {codes}.",
            "",
        ]
    )
    print(md)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "doctor_hypothesis.json", res)
    atomic_write_text(RESULTS / "doctor_hypothesis.md", md)
    if r["escaped"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
