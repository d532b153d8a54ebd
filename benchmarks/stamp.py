"""What every results file is stamped with (commit, machine) and a timed fresh process, shared by the
benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The short commit, ``+dirty`` when the tree has uncommitted changes outside benchmarks/results
    (``GGUF_FACTORY_COMMIT`` when set: a copy of the tree without its git folder, e.g. on a GPU machine,
    names the commit it was made from)."""
    if os.environ.get("GGUF_FACTORY_COMMIT"):
        return os.environ["GGUF_FACTORY_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        # results files written by an earlier benchmark of the same run are not code: they do not count
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def cpu() -> dict[str, Any]:
    """The CPU's model name and the vector extensions that decide llama.cpp's and torch's speed on it
    (figures from machines with and without AVX-512 / AMX differ several times over)."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not flags:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return {"model": model, "simd": [f for f in simd if f in flags]}


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def run_timed(cmd: list[str], log: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process (output to ``log``, else inherited); its wall time and peak RSS
    (wait4's rusage). A non-zero exit is a SystemExit naming the command."""
    t0 = time.perf_counter()
    fh = log.open("w") if log is not None else None
    try:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT if fh else None)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if fh is not None:
            fh.close()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code})" + (f"; see {log}" if log else ""))
    return {"seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def portable(value: Any) -> Any:
    """``value`` (JSON-like) with every absolute path in it made relative to the repository, or cut to its
    file name when outside it: results carry no machine paths."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if os.path.isabs(value) and "\n" not in value:
            p = Path(value)
            try:
                return p.resolve().relative_to(ROOT).as_posix()
            except (ValueError, OSError):
                return p.name
        return value.replace(str(ROOT) + os.sep, "")
    return value


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Terminate ``proc`` (a server under measurement) and wait for it; kill it if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
