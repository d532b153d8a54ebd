"""Hardening figures (issue 13): hostile chat templates, request bodies, crafted headers and YAML.

1. Hostile templates through `gguf-factory generate` (a fresh process each): a template that loops, one
   that multiplies a string to 2 GB, a sandbox escape. Exit code, wall time, peak RSS of the largest
   process (the CLI or its template worker).
2. `gguf-factory serve` on a router manifest of two models, one of them with a template that passes the
   load check but loops on a crafted message: time to the error, the same model's and the other model's
   next requests, then SIGTERM while a hostile request is in flight (time to exit).
3. A 12 MB request body: time to the 413 and the server's RSS before and after.
4. `validate --no-smoke` and `inspect` on crafted headers: 1 M empty tensor infos, 40 k tensors.
5. A YAML alias bomb (7 levels x 10) as factory.yaml: `gguf-factory build` exit, time, peak RSS.
6. What bounding costs: one render through the template worker vs Jinja in-process; the load-time check.

Wall times on a shared machine stretch with its load (the 1-minute load average is recorded before and
after); CPU seconds (user + system, of the process and its children) do much less.

    python benchmarks/hardening.py [--base tiny.gguf] [--work DIR] [--no-write]

Writes benchmarks/results/hardening.json and hardening.md, stamped with the date, git commit, machine
and this exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from corrupt_corpus import KV, VT, load_model, serialize  # noqa: E402
from stamp import git_commit  # noqa: E402

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {
    "loop (10^10 iterations)": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}" + CHATML,
    "'x' * 2000000000": "{{ 'x' * 2000000000 }}" + CHATML,
    "string doubled 40 times": "{% set ns = namespace(x='ab') %}{% for i in range(40) %}"
    "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x|length }}" + CHATML,
    "sandbox escape": "{{ cycler.__init__.__globals__.os.system('true') }}" + CHATML,
}
TRIGGER = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% endif %}{% endfor %}" + CHATML
)
CLI = [sys.executable, "-m", "gguf_factory.cli"]


def with_template(src: Path, out: Path, template: str) -> Path:
    m = load_model(src)
    m.drop_kv("tokenizer.chat_template")
    m.kvs.append(KV("tokenizer.chat_template", VT.STRING, template))
    out.write_bytes(serialize(m))
    return out


_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "try:\n"
    "    p = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=float(sys.argv[1]))\n"
    "    code, err = p.returncode, p.stderr\n"
    "except subprocess.TimeoutExpired:\n"
    "    code, err = 'timeout', ''\n"
    "wall = time.perf_counter() - t0\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'exit_code': code, 'seconds': wall, 'cpu_seconds': u.ru_utime + u.ru_stime,\n"
    "                  'peak_rss_mb': u.ru_maxrss / 1024, 'stderr': err}))\n"
)


def timed_run(cmd: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run ``cmd`` under a small measuring parent: wall seconds, CPU seconds of the command and everything
    it waited for, the peak RSS of the largest of those processes (the CLI or its template worker)."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(timeout), *cmd], capture_output=True, text=True, check=True
    )
    r = json.loads(proc.stdout)
    err = r.pop("stderr").strip().splitlines()
    return {
        "exit_code": r["exit_code"],
        "seconds": round(r["seconds"], 2),
        "cpu_seconds": round(r["cpu_seconds"], 2),
        "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "stderr_lines": len(err),
        "message": err[-1][:300] if err else "",
        "traceback": any("Traceback" in line for line in err),
    }


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 1. hostile templates through generate ----------------------------------------------------------
def templates_figures(base: Path, work: Path) -> list[dict[str, Any]]:
    rows = []
    for name, template in TEMPLATES.items():
        f = with_template(base, work / f"hostile-{len(rows)}.gguf", template)
        r = timed_run([*CLI, "generate", str(f), "hello", "--max-tokens", "4", "--threads", "1"])
        rows.append({"template": name, **r})
        print(f"  generate, {name}: exit {r['exit_code']} in {r['seconds']} s", flush=True)
    f = with_template(base, work / "trigger.gguf", TRIGGER)
    r = timed_run([*CLI, "generate", str(f), "boom", "--max-tokens", "4", "--threads", "1"])
    rows.append({"template": "passes the load check, loops on the message 'boom'", **r})
    print(f"  generate, trigger: exit {r['exit_code']} in {r['seconds']} s", flush=True)
    return rows


# --- 2 and 3. the server -----------------------------------------------------------------------------
def start_server(manifest: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [*CLI, "serve", str(manifest), "--port", str(port), "--no-web-ui", "--max-tokens-limit", "16"]
    cmd += ["--threads", "1"]  # two llama.cpp threads on a busy 2-core machine wait on each other
    env = {k: v for k, v in os.environ.items() if k != "GGUF_FACTORY_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not come up; see {log}")
        time.sleep(0.1)


def chat(url: str, model: str, content: str) -> tuple[int, float, str]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    dt = time.perf_counter() - t0
    msg = r.json()["error"]["message"] if r.status_code != 200 else ""
    return r.status_code, round(dt * 1000, 1), msg[:200]


def big_body(port: int, size: int) -> tuple[str, float]:
    """POST a ``size``-byte body over a raw socket: the status line and the ms until it arrived (the body
    is sent from another thread; the server may answer before reading it)."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(60)

    def send_body() -> None:
        chunk = b"x" * (1 << 16)
        with contextlib.suppress(OSError):
            for _ in range(size // len(chunk)):
                s.sendall(chunk)

    t0 = time.perf_counter()
    s.sendall(head)
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    data = b""
    while b"\r\n" not in data:
        got = s.recv(4096)
        if not got:
            break
        data += got
    dt = time.perf_counter() - t0
    s.close()
    return data.split(b"\r\n", 1)[0].decode(errors="replace"), round(dt * 1000, 1)


def serve_figures(base: Path, work: Path) -> dict[str, Any]:
    trigger = with_template(base, work / "serve-trigger.gguf", TRIGGER)
    good = work / "serve-good.gguf"
    good.write_bytes(base.read_bytes())
    manifest = work / "router.yaml"
    manifest.write_text(f"domains:\n  good: {{model: {good.name}}}\n  hostile: {{model: {trigger.name}}}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(manifest, port, work / "serve.log")
    out: dict[str, Any] = {}
    try:
        out["warm"] = [chat(url, "good", "hello"), chat(url, "hostile", "hello")]
        out["hostile_request"] = chat(url, "hostile", "boom")
        out["same_model_next"] = chat(url, "hostile", "hello")
        out["other_model_next"] = chat(url, "good", "hello")
        rss0 = rss_mb(proc.pid)
        status, ms = big_body(port, 12 << 20)
        out["body_12mb"] = {
            "status": status,
            "ms_to_response": ms,
            "rss_before_mb": round(rss0, 1),
            "rss_after_mb": round(rss_mb(proc.pid), 1),
        }
        out["after_body"] = chat(url, "good", "hello")
        print(f"  serve: {out}", flush=True)

        # SIGTERM while a hostile request is in flight
        def in_flight() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server goes away under it
                chat(url, "hostile", "boom")

        hostile = threading.Thread(target=in_flight, daemon=True)
        hostile.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
            out["sigterm_exit_s"] = round(time.perf_counter() - t0, 2)
        except subprocess.TimeoutExpired:
            out["sigterm_exit_s"] = "did not exit within 60 s"
        out["exit_code"] = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (work / "serve.log").read_text(errors="replace")
    out["traceback_in_log"] = "Traceback" in log
    return out


# --- 4. crafted headers --------------------------------------------------------------------------------
def many_tensors(path: Path, n: int, named: bool) -> Path:
    """``n`` tensor infos; ``named``: distinct llama names, 32 F32 values each, packed; else all empty
    names at offset 0 (the issue's "1 M empty tensor infos")."""
    with open(path, "wb") as f:
        head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, n, 1))
        key, val = b"general.architecture", b"llama"
        head += struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(val)) + val
        f.write(head)
        size = len(head)
        for i in range(n):
            name = f"blk.{i}.attn_q.weight".encode() if named else b""
            rec = struct.pack("<Q", len(name)) + name + struct.pack("<IQ", 1, 32)
            rec += struct.pack("<IQ", 0, 128 * i if named else 0)
            f.write(rec)
            size += len(rec)
        f.write(b"\0" * (-size % 32) + b"\0" * (128 * n if named else 128))
    return path


def header_figures(work: Path) -> list[dict[str, Any]]:
    rows = []
    for label, n, named in (("1 M empty tensor infos", 1_000_000, False), ("40 k tensors", 40_000, True)):
        f = many_tensors(work / f"tensors-{n}.gguf", n, named)
        for verb in (["validate", "--no-smoke"], ["inspect"]):
            r = timed_run([*CLI, *verb, str(f)])
            rows.append(
                {"file": label, "size_mb": round(f.stat().st_size / 1e6, 1), "command": " ".join(verb), **r}
            )
            print(f"  {' '.join(verb)} {label}: {r['seconds']} s, {r['cpu_seconds']} CPU s", flush=True)
    return rows


# --- 5. YAML ---------------------------------------------------------------------------------------------
def yaml_figures(work: Path) -> dict[str, Any]:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    text = "\n".join(lines) + "\ndomains: *g\n"
    f = work / "factory.yaml"
    f.write_text(text)
    r = timed_run([*CLI, "build", str(f)])
    import tracemalloc

    from gguf_factory.errors import InputError
    from gguf_factory.schema import safe_yaml

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        safe_yaml(text, f)
        refused = False
    except InputError:
        refused = True
    ms = (time.perf_counter() - t0) * 1000
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "bytes": len(text.encode()),
        "cli": r,
        "in_process": {"refused": refused, "ms": round(ms, 2), "peak_alloc_mb": round(peak / 1e6, 2)},
    }


# --- 6. cost of bounding --------------------------------------------------------------------------------
def overhead_figures(base: Path, work: Path) -> dict[str, Any]:
    import statistics

    from gguf_factory.runtime import load, templates
    from gguf_factory.runtime.template_worker import make_environment, render

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there, how are you?"},
    ]
    variables = {"messages": msgs, "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"}
    templates.render_chat(CHATML, msgs)  # the worker is started
    worker = []
    for i in range(300):
        t0 = time.perf_counter()
        templates.render_chat(CHATML, [*msgs, {"role": "user", "content": f"n{i}"}])
        worker.append(time.perf_counter() - t0)
    tmpl = make_environment().from_string(CHATML)
    inproc = []
    for _ in range(300):
        t0 = time.perf_counter()
        render(tmpl, variables, 10**6)
        inproc.append(time.perf_counter() - t0)
    checks = []
    for i in range(20):
        t0 = time.perf_counter()
        templates.check_template(CHATML + f"{{# {i} #}}")  # a new text each time: no cache
        checks.append(time.perf_counter() - t0)
    import llama_cpp

    from gguf_factory.runtime import _quiet_stderr

    bare, checked = [], []
    for i in range(5):  # a new template text each time: the check is not cached
        f = with_template(base, work / f"load-{i}.gguf", CHATML + f"{{# {i} #}}")
        t0 = time.perf_counter()
        with _quiet_stderr():
            llama_cpp.Llama(model_path=str(f), n_ctx=128, n_threads=1, verbose=False).close()
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load(f, threads=1, n_ctx=128).close()
        checked.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with load(base, threads=1) as m:
        load_s = time.perf_counter() - t0
        chats = []
        for i in range(20):
            t0 = time.perf_counter()
            m.chat([{"role": "user", "content": f"hello {i}"}], max_tokens=1)
            chats.append(time.perf_counter() - t0)
    return {
        "render_via_worker_ms_median": round(statistics.median(worker) * 1000, 3),
        "render_in_process_ms_median": round(statistics.median(inproc) * 1000, 3),
        "load_check_ms_median": round(statistics.median(checks) * 1000, 2),
        "load_gguf_s_with_check": round(load_s, 3),
        "llama_alone_ms_median": round(statistics.median(bare) * 1000, 1),
        "runtime_load_ms_median": round(statistics.median(checked) * 1000, 1),
        "chat_1_token_ms_median": round(statistics.median(chats) * 1000, 2),
        "workers_started": templates.worker_pool().started,
    }


# --- report -----------------------------------------------------------------------------------------------


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Hardening (issue 13)",
        "",
        f"Measured {r['date_utc']} UTC at commit `{r['commit']}`: `{r['command']}`. Machine: "
        f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}; 1-minute load average "
        f"{r['load_before']} before, {r['load_after']} after (a shared machine: wall times stretch with "
        "the load, CPU seconds much less).",
        "",
        "## Hostile chat templates (`gguf-factory generate`, a fresh process each)",
        "",
        "| template | exit | wall s | CPU s | peak RSS MB | stderr lines | traceback | message |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for t in r["templates"]:
        lines.append(
            f"| {t['template']} | {t['exit_code']} | {t['seconds']} | {t['cpu_seconds']} | "
            f"{t['peak_rss_mb']} | {t['stderr_lines']} | {t['traceback']} | "
            f"{t['message'].replace('|', '/')[:140]} |"
        )
    s = r["serve"]
    b = s["body_12mb"]
    lines += [
        "",
        "Peak RSS: the largest single process of the command (the CLI or its template worker, whose "
        "address space is capped), from `getrusage(RUSAGE_CHILDREN)` of a small measuring parent.",
        "",
        "## `gguf-factory serve` (router manifest: a clean model and one whose template loops on 'boom')",
        "",
        "| request | status | ms | error |",
        "|---|---:|---:|---|",
    ]
    for label, key in (
        ("hostile message", "hostile_request"),
        ("same model, next request", "same_model_next"),
        ("other model, next request", "other_model_next"),
        ("after the 12 MB body", "after_body"),
    ):
        st, ms, msg = s[key]
        lines.append(f"| {label} | {st} | {ms} | {msg.replace('|', '/')} |")
    lines += [
        "",
        f"- 12 MB body: `{b['status']}` after {b['ms_to_response']} ms; server RSS {b['rss_before_mb']} → "
        f"{b['rss_after_mb']} MB.",
        f"- SIGTERM with a hostile request in flight: exited in {s['sigterm_exit_s']} s (exit code "
        f"{s['exit_code']}); traceback in the server log: {s['traceback_in_log']}.",
        "",
        "## Crafted headers",
        "",
        "| file | size MB | command | exit | wall s | CPU s | peak RSS MB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for h in r["headers"]:
        lines.append(
            f"| {h['file']} | {h['size_mb']} | `{h['command']}` | {h['exit_code']} | {h['seconds']} | "
            f"{h['cpu_seconds']} | {h['peak_rss_mb']} |"
        )
    y = r["yaml"]
    o = r["overhead"]
    lines += [
        "",
        "## YAML alias bomb (7 levels x 10, as factory.yaml)",
        "",
        f"- {y['bytes']} bytes; `gguf-factory build`: exit {y['cli']['exit_code']} in "
        f"{y['cli']['seconds']} s ({y['cli']['cpu_seconds']} CPU s, interpreter start included): "
        f"{y['cli']['message']}",
        f"- the check alone, in process: refused {y['in_process']['refused']} in {y['in_process']['ms']} ms, "
        f"{y['in_process']['peak_alloc_mb']} MB allocated at peak.",
        "",
        "## What bounding costs",
        "",
        f"- one ChatML render through the template worker: {o['render_via_worker_ms_median']} ms "
        f"(median of 300) vs {o['render_in_process_ms_median']} ms with Jinja in this process;",
        f"- the load-time check (three probe conversations in the worker): {o['load_check_ms_median']} "
        f"ms (median of 20 new templates); `runtime.load` of the tiny GGUF with it: "
        f"{o['load_gguf_s_with_check']} s; a one-token chat reply through it: {o['chat_1_token_ms_median']} "
        f"ms (median of 20); workers started in this process: {o['workers_started']}.",
        f"- loading a GGUF with a template not seen before: `llama_cpp.Llama` alone "
        f"{o['llama_alone_ms_median']} ms, `runtime.load` (header scan + template check in the worker + "
        f"the same Llama) {o['runtime_load_ms_median']} ms (medians of 5).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="a valid chat GGUF (default: train the tests' tiny model)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write results/")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="hardening-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        from doctor_fuzz import build_base

        base = build_base(work)
    else:
        base = args.base
    load_before = round(os.getloadavg()[0], 2)
    print("templates ...", flush=True)
    tpl = templates_figures(base, work)
    print("serve ...", flush=True)
    srv = serve_figures(base, work)
    print("headers ...", flush=True)
    hdr = header_figures(work)
    print("yaml ...", flush=True)
    yml = yaml_figures(work)
    print("overhead ...", flush=True)
    ovh = overhead_figures(base, work)
    res = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": git_commit(),
        "command": "python benchmarks/hardening.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
        "templates": tpl,
        "serve": srv,
        "headers": hdr,
        "yaml": yml,
        "overhead": ovh,
    }
    md = markdown(res)
    print(md)
    if not args.no_write:
        from gguf_factory.files import atomic_write_json, atomic_write_text

        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / "hardening.json", res)
        atomic_write_text(RESULTS / "hardening.md", md)
        print(f"wrote {RESULTS / 'hardening.json'} and {RESULTS / 'hardening.md'}")


if __name__ == "__main__":
    main()
