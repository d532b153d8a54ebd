"""`gguf-factory serve` overhead and behaviour under load.

1. Latency of one chat completion through the server (a separate `gguf-factory serve` process, over HTTP
   with the official `openai` client) against calling llama-cpp-python directly on the same GGUF in this
   process, in the same run: the two are interleaved prompt by prompt, medians of --rounds rounds.
2. --clients concurrent clients (default 8) for --duration seconds (default 60): requests, errors,
   throughput, p50/p95/p99 latency (a quarter of the requests stream).

Writes benchmarks/results/serve.json and serve.md. Side by side with llama-cpp-python's own server
(`python -m llama_cpp.server`), in one run: benchmarks/serve_peer.py.

    python benchmarks/serve.py [--model gguf-factory-out/sub-ai-smollm2-135m-Q4_K_M.gguf] [--rounds 20]
                               [--clients 8] [--duration 60] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
from rich.console import Console

from gguf_factory.demo import held_out_prompts
from gguf_factory.files import atomic_write_json, atomic_write_text
from gguf_factory.runtime import ChatModel, GenerationSettings, load

DEMO_MODEL = Path("gguf-factory-out/sub-ai-smollm2-135m-Q4_K_M.gguf")
RESULTS = Path(__file__).parent / "results"
FALLBACK_PROMPTS = ["Hello", "How are you?", "Tell me a joke.", "What is your favorite food?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, threads: int | None, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "gguf_factory.cli", "serve", str(model), "--port", str(port)]
    cmd += ["--max-tokens-limit", "4096", "--queue-timeout", "120"]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(log_path, "wb")  # noqa: SIM115 - the server process owns it until the end
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"the server did not come up; see {log_path}")
        time.sleep(0.1)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def overhead(
    m: ChatModel,
    client: openai.OpenAI,
    model_id: str,
    prompts: list[str],
    *,
    rounds: int,
    max_tokens: int,
    ban_end: bool = False,
) -> dict:
    """Interleaved direct / server chat completions; ``ban_end`` forbids the end-of-generation tokens
    (logit bias -100, both paths) so that every reply is ``max_tokens`` long."""
    settings = GenerationSettings(max_tokens=max_tokens)
    bias = {t: -100.0 for t in range(m.llm.n_vocab()) if m.is_end_of_generation(t)} if ban_end else None
    direct_ms: list[float] = []
    server_ms: list[float] = []
    mismatches = 0
    tokens = 0
    for p in prompts:  # warm both paths (model load in the server, caches here)
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}])
        m.llm.create_chat_completion(messages=[{"role": "user", "content": p}], max_tokens=4)

    def run_direct(messages: list[dict[str, str]]) -> str:
        t0 = time.perf_counter()
        out = m.llm.create_chat_completion(
            messages=messages,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repeat_penalty=settings.repeat_penalty,
            logit_bias=bias,
        )
        direct_ms.append((time.perf_counter() - t0) * 1000)
        return out["choices"][0]["message"]["content"]

    def run_server(messages: list[dict[str, str]]) -> str:
        nonlocal tokens
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=settings.max_tokens,
            temperature=0,
            logit_bias={str(k): v for k, v in bias.items()} if bias else openai.NOT_GIVEN,
        )
        server_ms.append((time.perf_counter() - t0) * 1000)
        tokens += r.usage.completion_tokens
        return r.choices[0].message.content

    raw_ms: list[float] = []
    http = httpx.Client(base_url=str(client.base_url).rstrip("/"), timeout=120)

    def run_raw(messages: list[dict[str, str]]) -> str:
        body: dict[str, Any] = {"model": model_id, "messages": messages, "max_tokens": max_tokens}
        if bias:
            body["logit_bias"] = {str(k): v for k, v in bias.items()}
        t0 = time.perf_counter()
        r = http.post("/chat/completions", json=body)
        raw_ms.append((time.perf_counter() - t0) * 1000)
        return r.json()["choices"][0]["message"]["content"]

    for i in range(rounds):
        for p in prompts:
            messages = [{"role": "user", "content": p}]
            runs = [run_direct, run_server, run_raw]
            runs = runs[i % 3 :] + runs[: i % 3]  # rotate which path goes first
            texts = {f.__name__: f(messages) for f in runs}
            mismatches += len(set(texts.values())) != 1
    http.close()
    d, s, raw = statistics.median(direct_ms), statistics.median(server_ms), statistics.median(raw_ms)
    return {
        "requests_each": len(direct_ms),
        "direct_median_ms": d,
        "server_median_ms": s,
        "overhead_ms": s - d,
        "overhead_pct": (s - d) / d * 100,
        "raw_http_median_ms": raw,
        "raw_http_overhead_ms": raw - d,
        "raw_http_overhead_pct": (raw - d) / d * 100,
        "direct_p95_ms": percentile(direct_ms, 0.95),
        "server_p95_ms": percentile(server_ms, 0.95),
        "mean_completion_tokens": tokens / len(server_ms),
        "replies_differing": mismatches,
    }


def load_test(base_url: str, model_id: str, prompts: list[str], args: Any) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    completion_tokens = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + args.duration

    def client_loop(i: int) -> None:
        nonlocal completion_tokens
        n = 0
        with httpx.Client(base_url=base_url, timeout=180) as c:
            while time.monotonic() < stop_at:
                p = prompts[(i + n) % len(prompts)]
                stream = n % 4 == 3
                body = {
                    "model": model_id,
                    "messages": [{"role": "user", "content": p}],
                    "max_tokens": args.max_tokens,
                    "stream": stream,
                }
                t0 = time.perf_counter()
                err, toks = None, 0
                try:
                    if stream:
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = [x for x in r.iter_lines() if x]
                            if r.status_code != 200 or lines[-1] != "data: [DONE]":
                                err = f"stream: HTTP {r.status_code}"
                    else:
                        r = c.post("/v1/chat/completions", json=body)
                        if r.status_code != 200:
                            err = f"HTTP {r.status_code}: {r.text[:200]}"
                        else:
                            toks = r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError as e:
                    err = f"{type(e).__name__}: {e}"
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    if err:
                        errors.append(err)
                    else:
                        latencies.append(ms)
                        completion_tokens += toks
                n += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {
        "clients": args.clients,
        "duration_s": wall,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 0.5),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else float("nan"),
        "completion_tokens_per_s_non_streamed": completion_tokens / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="GGUF (default: the demo's Q4_K_M)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=200, help="reply length of the long-reply pass")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    console = Console()
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}: run `gguf-factory demo` first, or pass --model X.gguf")

    test_jsonl = args.model.parent / "data" / "test.jsonl"
    prompts = FALLBACK_PROMPTS
    if test_jsonl.is_file():
        prompts = [p for p, _ in held_out_prompts(test_jsonl, args.prompts)]
    model_id = args.model.stem
    port = free_port()
    RESULTS.mkdir(exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"gguf-factory-serve-bench-{port}.log"
    server = start_server(args.model, port, args.threads, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        console.print(f"[bold]overhead[/]: {args.rounds} rounds x {len(prompts)} prompts, {model_id}")
        with load(args.model, n_threads=args.threads) as m:
            ov = overhead(m, client, model_id, prompts, rounds=args.rounds, max_tokens=args.max_tokens)
            show(console, "natural replies", ov)
            ov_long = overhead(
                m,
                client,
                model_id,
                prompts,
                rounds=max(1, args.rounds // 2),
                max_tokens=args.long_tokens,
                ban_end=True,
            )
            show(console, f"{args.long_tokens}-token replies", ov_long)
        console.print(f"[bold]load[/]: {args.clients} clients for {args.duration:.0f} s")
        lt = load_test(base_url, model_id, prompts, args)
        console.print(
            f"{lt['requests']} requests, {lt['errors']} errors, {lt['requests_per_s']:.1f} req/s, "
            f"p50 {lt['p50_ms']:.1f} ms, p95 {lt['p95_ms']:.1f} ms"
        )
        health = httpx.get(f"{base_url}/health").json()
    finally:
        server.terminate()
        server.wait(30)
    log_path.unlink(missing_ok=True)

    result = {
        "model": model_id,
        "model_bytes": args.model.stat().st_size,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "max_tokens": args.max_tokens,
            "prompts": len(prompts),
            "rounds": args.rounds,
            "threads": args.threads,
        },
        "overhead": ov,
        "overhead_long": ov_long,
        "load": lt,
        "server_health_after": health,
    }
    atomic_write_json(RESULTS / "serve.json", result)
    atomic_write_text(RESULTS / "serve.md", render_md(result))
    console.print(f"wrote {RESULTS / 'serve.md'} and serve.json")


def show(console: Console, label: str, ov: dict) -> None:
    console.print(
        f"{label}: direct {ov['direct_median_ms']:.2f} ms, "
        f"openai client {ov['server_median_ms']:.2f} ms ({ov['overhead_pct']:+.1f} %), "
        f"raw HTTP {ov['raw_http_median_ms']:.2f} ms ({ov['raw_http_overhead_pct']:+.1f} %), "
        f"mean {ov['mean_completion_tokens']:.0f} tokens, replies differing: {ov['replies_differing']}"
    )


def overhead_rows(label: str, ov: dict) -> list[str]:
    head = (
        f"| {label} | {ov['mean_completion_tokens']:.0f} | {ov['requests_each']} "
        f"| {ov['direct_median_ms']:.2f} ms"
    )
    return [
        f"{head} | `openai` client | {ov['server_median_ms']:.2f} ms "
        f"| {ov['overhead_ms']:+.2f} ms | {ov['overhead_pct']:+.1f} % | {ov['replies_differing']} |",
        f"{head} | raw HTTP (httpx) | {ov['raw_http_median_ms']:.2f} ms "
        f"| {ov['raw_http_overhead_ms']:+.2f} ms | {ov['raw_http_overhead_pct']:+.1f} % | |",
    ]


def render_md(r: dict) -> str:
    ov, lt = r["overhead"], r["load"]
    return "\n".join(
        [
            f"# `gguf-factory serve`: {r['model']}",
            "",
            f"{r['date']}, {r['machine']['cpus']} CPU cores ({r['machine']['platform']}), "
            f"model {r['model_bytes'] / 1e6:.2f} MB, greedy, max_tokens {r['settings']['max_tokens']}, "
            f"{r['settings']['prompts']} held-out prompts, llama.cpp threads: "
            f"{r['settings']['threads'] or 'all cores'} (server and direct alike).",
            "",
            "## Server vs llama-cpp-python directly (same model, same run, interleaved)",
            "",
            f"Medians of {ov['requests_each']} chat completions per path; the server is a separate "
            "`gguf-factory serve` process, reached over HTTP with the official `openai` client and with "
            "plain httpx (the client library's own parsing is part of the first figure).",
            "",
            "| replies | mean tokens | requests each | direct (median) | server via | server (median) "
            "| overhead | overhead % | replies differing |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
            *overhead_rows("natural (end at EOS)", ov),
            *overhead_rows("long (EOS banned by logit_bias)", r["overhead_long"]),
            "",
            "The server's overhead (raw HTTP rows) is a fixed cost per request (HTTP, JSON, the prompt "
            "token count, thread hand-offs), so its share shrinks as replies get longer or models bigger; "
            "most of the difference in the `openai` rows is the client library's own request building and "
            "response parsing, which any OpenAI-compatible server pays.",
            "",
            f"## {lt['clients']} concurrent clients for {lt['duration_s']:.0f} s",
            "",
            "One model, one request at a time (the others queue); every fourth request streams.",
            "",
            "| requests | errors | req/s | p50 | p95 | p99 | max |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {lt['requests']} | {lt['errors']} | {lt['requests_per_s']:.1f} | {lt['p50_ms']:.1f} ms "
            f"| {lt['p95_ms']:.1f} ms | {lt['p99_ms']:.1f} ms | {lt['max_ms']:.1f} ms |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
