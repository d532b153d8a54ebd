"""`gguf-factory serve` side by side with llama-cpp-python's own server (`python -m llama_cpp.server`), in
one run, on the same GGUF, with the same threads and context (issue 16's serving targets).

Three server processes on free loopback ports, started once and kept for the whole run:

- ``ours``: ``gguf-factory serve MODEL --threads T --ctx C`` (its defaults otherwise: prompt cache on);
- ``peer``: ``python -m llama_cpp.server --model MODEL --n_threads T --n_threads_batch T --n_ctx C
  --chat_format chat_template.default`` (the GGUF's own Jinja template, as ours uses), its defaults
  otherwise (prompt cache off) except ``--interrupt_requests false`` (by default a waiting request cuts
  the streamed reply in progress short: the load test would then compare different work) and
  ``--verbose false`` (no per-request timing printout);
- ``peer-cache``: the same with its prompt cache on (``--cache true``, RAM, its default size).

Phases (every request greedy with the same explicit sampling settings on every server):

1. Latency: short replies (natural end, at most --max-tokens) and long ones (--long-tokens, end of
   generation banned by logit_bias), each through the official ``openai`` client and raw HTTP (httpx),
   ours and peer interleaved prompt by prompt, the order of (server, client) rotating every prompt; medians
   with min-max; overhead % = ours vs peer. Replies that differ between the two servers are counted.
2. Structured output: --structured ``json_schema`` requests (a name/age/tags schema, every field required)
   to ours and to peer in OpenAI's format, and to peer in its own dialect (``{"type": "json_object",
   "schema": ...}``), interleaved; how many came back, parse as JSON and validate against the schema; plus
   one ``openai`` ``beta.chat.completions.parse`` call with a pydantic model against each server.
3. Prompt cache: --conversations conversations of --turns turns (each turn appends the previous reply and a
   new user message), streamed, time to first token per turn, against ours, peer and peer-cache. The
   conversations take turns on each server (conversation 1's turn t, conversation 2's turn t, ...), so a
   server's previous request is always another conversation: what the next turn reuses comes from the
   prompt cache, not from the prefix still in llama.cpp's context. Ratio turn N / turn 1 per server.
4. Load: --clients concurrent clients for --duration seconds against ours, then peer (every fourth request
   streams): requests, errors split into 503 / other HTTP status / transport / incomplete stream, req/s,
   p50/p95/p99.

Not compared: per-request LoRA adapters over one shared base (a router manifest) are ours only;
``llama_cpp.server`` applies one adapter (``--lora_path``) to every request of a model. Ours is measured
by benchmarks/serve_routing.py.

Writes benchmarks/results/serve_peer.json and serve_peer.md (or under --results), stamped with date,
commit, machine and the exact command.

    python benchmarks/serve_peer.py [--model gguf-factory-out/sub-ai-smollm2-135m-Q4_K_M.gguf]
        [--threads N] [--ctx 2048] [--rounds 20] [--prompts 8] [--structured 50] [--conversations 3]
        [--turns 10] [--clients 16] [--duration 60] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx2 as httpx
import openai
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).parent))
from gguf_factory.files import atomic_write_json, atomic_write_text  # noqa: E402
from gguf_factory.replies import held_out_prompts  # noqa: E402
from gguf_factory.runtime import GenerationSettings, load  # noqa: E402
from serve import DEMO_MODEL, FALLBACK_PROMPTS, free_port, percentile  # noqa: E402
from stamp import git_commit, machine, stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VIAS = ("openai", "raw")
VIA_LABEL = {"openai": "`openai` client", "raw": "raw HTTP (httpx)"}
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
TRAITS = [
    "a baker",
    "a pilot",
    "a gardener",
    "a chess player",
    "a nurse",
    "a painter",
    "a runner",
    "a teacher",
    "a chef",
    "a sailor",
]
PLACES = ["Lisbon", "Osaka", "Lagos", "Quito", "Oslo"]
OPENERS = [  # the first turn of each conversation: prompts no earlier phase sent
    "I would like to learn to cook. Where should I start?",
    "What is a good way to keep a small garden?",
    "How do I get better at running?",
    "Can you help me plan a weekend trip?",
    "I want to start reading more. Any advice?",
    "How should I prepare for a job interview?",
]
FOLLOW_UPS = [
    "Tell me more about that.",
    "Can you give me an example?",
    "Why is that?",
    "What else should I know?",
    "How would a beginner start?",
    "What is a common mistake?",
    "Give me one more tip.",
    "Can you say that more simply?",
    "Summarize what you said so far.",
    "Thanks! Anything to add?",
]


class Person(BaseModel):
    """The pydantic twin of PERSON_SCHEMA, for ``beta.chat.completions.parse``."""

    name: str = Field(max_length=40)
    age: int
    tags: list[Annotated[str, Field(max_length=24)]] = Field(max_length=4)


def sampling() -> dict[str, float]:
    """The same explicit sampling settings for every server: ours' defaults (greedy)."""
    s = GenerationSettings()
    return {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
    }


# --- the servers ----------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    ready_path: str
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fh = self.log.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()  # the child has its own copy

    def wait_ready(self, timeout: float = 180) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not come up in {timeout:.0f} s; see {self.log}")
            time.sleep(0.2)

    def memory(self) -> dict[str, float]:
        """Resident and peak resident memory (MB) of the server process, from /proc."""
        out: dict[str, float] = {}
        if self.proc is None:
            return out
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[{"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb"}[key]] = round(
                        int(value.split()[0]) / 1024, 1
                    )
        except OSError:
            pass
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def make_servers(model: Path, model_id: str, threads: int, ctx: int, logs: Path, peer_cache_size: int | None):
    ours = [sys.executable, "-m", "gguf_factory.cli", "serve", str(model), "--threads", str(threads)]
    ours += ["--ctx", str(ctx), "--max-tokens-limit", "4096", "--queue-timeout", "120"]
    peer = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", model_id]
    peer += ["--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    peer += ["--n_ctx", str(ctx), "--chat_format", "chat_template.default"]
    peer += ["--interrupt_requests", "false", "--verbose", "false"]
    cache = ["--cache", "true", "--cache_type", "ram"]
    if peer_cache_size is not None:
        cache += ["--cache_size", str(peer_cache_size)]
    out = []
    for name, cmd, ready in (
        ("ours", ours, "/health"),
        ("peer", peer, "/v1/models"),
        ("peer-cache", peer + cache, "/v1/models"),
    ):
        port = free_port()
        out.append(Server(name, [*cmd, "--port", str(port)], port, ready, logs / f"{name}.log"))
    return out


def shown_path(p: Path) -> str:
    """``p`` relative to the repository when inside it, else its file name: no machine paths in results."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def shown(cmd: Sequence[str], model: Path) -> str:
    """A server's command line as a reader would type it (``python -m ...``, the port left out)."""
    parts = [shown_path(model) if c == str(model) else c for c in cmd]
    if "--port" in parts:
        i = parts.index("--port")
        del parts[i : i + 2]
    return " ".join(["python", *parts[1:]])


# --- helpers --------------------------------------------------------------------------------------
def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` starting at position ``k`` (mod its length): who goes first changes every step."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def spread(xs: Sequence[float]) -> dict[str, float | int | None]:
    """Median with min, max and p95 of ``xs`` (milliseconds), and how many there were."""
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "p95": None}
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "p95": percentile(list(xs), 0.95),
    }


def pct(ours: float | None, peer: float | None) -> float | None:
    """Ours relative to peer in percent (negative: ours is faster)."""
    if ours is None or not peer:
        return None
    return (ours - peer) / peer * 100


def validate(doc: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Where ``doc`` breaks ``schema``: a minimal validator for the JSON Schema subset PERSON_SCHEMA uses
    (type object/array/string/integer/number/boolean, properties, required, additionalProperties false,
    items, maxItems/minItems, maxLength/minLength). Used when the ``jsonschema`` package is missing."""
    errors: list[str] = []
    t = schema.get("type")
    kinds = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
    }
    if t is not None:
        ok = isinstance(doc, kinds[t]) and (t in ("boolean",) or not isinstance(doc, bool))
        if not ok:
            return [f"{path}: not {t}"]
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: {k} missing" for k in schema.get("required", []) if k not in doc]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: {k} not allowed" for k in doc if k not in props]
        for k, sub in props.items():
            if k in doc:
                errors += validate(doc[k], sub, f"{path}.{k}")
    if isinstance(doc, list):
        if "maxItems" in schema and len(doc) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "minItems" in schema and len(doc) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, x in enumerate(doc):
                errors += validate(x, schema["items"], f"{path}[{i}]")
    if isinstance(doc, str):
        if "maxLength" in schema and len(doc) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(doc) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']}")
    return errors


def schema_checker() -> tuple[str, Callable[[Any], list[str]]]:
    """``jsonschema``'s Draft 2020-12 validator when installed, else :func:`validate`."""
    try:
        import jsonschema
    except ImportError:
        return "minimal (benchmarks/serve_peer.py)", lambda doc: validate(doc, PERSON_SCHEMA)
    v = jsonschema.Draft202012Validator(PERSON_SCHEMA)
    return f"jsonschema {importlib.metadata.version('jsonschema')}", lambda doc: [
        e.message for e in v.iter_errors(doc)
    ]


def clean_error(text: str, limit: int = 200) -> str:
    """An error message on one line, without a server's traceback (file paths of that machine)."""
    text = re.split(r'\s*File \\?"', text.replace("\\n", "\n"), maxsplit=1)[0]
    return " ".join(text.split())[:limit].strip()


def read_stream(lines: Any, t0: float) -> dict[str, Any]:
    """An SSE chat completion stream: its text, the time (ms from ``t0``) of the first non-empty content
    delta, the finish reason and whether it ended with ``[DONE]``."""
    text, first, finish, done = [], None, None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            break
        choice = (json.loads(data).get("choices") or [{}])[0]
        piece = (choice.get("delta") or {}).get("content") or ""
        if piece and first is None:
            first = (time.perf_counter() - t0) * 1000
        text.append(piece)
        finish = choice.get("finish_reason") or finish
    return {"text": "".join(text), "first_token_ms": first, "finish_reason": finish, "done": done}


# --- 1. latency -----------------------------------------------------------------------------------
def latency(
    servers: list[Server],
    model_id: str,
    prompts: list[str],
    *,
    rounds: int,
    max_tokens: int,
    bias: dict[int, float] | None,
) -> dict[str, Any]:
    """Interleaved chat completions, each (server, client) pair in turn, the order rotating every prompt."""
    extra = {k: v for k, v in sampling().items() if k not in ("temperature", "top_p")}
    s = sampling()
    bias_json = {str(k): v for k, v in bias.items()} if bias else None
    clients = {
        x.name: openai.OpenAI(base_url=f"{x.url}/v1", api_key="unused", max_retries=0, timeout=600)
        for x in servers
    }
    https = {x.name: httpx.Client(base_url=x.url, timeout=600) for x in servers}
    ms: dict[str, dict[str, list[float]]] = {x.name: {v: [] for v in VIAS} for x in servers}
    tokens: dict[str, list[int]] = {x.name: [] for x in servers}
    differing = {x.name: 0 for x in servers[1:]}

    def call(server: Server, via: str, messages: list[dict[str, str]], n: int) -> tuple[float, int, str]:
        if via == "openai":
            t0 = time.perf_counter()
            r = clients[server.name].chat.completions.create(
                model=model_id,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=n,
                temperature=s["temperature"],
                top_p=s["top_p"],
                logit_bias=bias_json if bias_json else openai.NOT_GIVEN,  # type: ignore[arg-type]
                extra_body=extra,
            )
            took = (time.perf_counter() - t0) * 1000
            return took, r.usage.completion_tokens if r.usage else 0, r.choices[0].message.content or ""
        body: dict[str, Any] = {"model": model_id, "messages": messages, "max_tokens": n, **s}
        if bias_json:
            body["logit_bias"] = bias_json
        t0 = time.perf_counter()
        r = https[server.name].post("/v1/chat/completions", json=body)
        took = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        doc = r.json()
        return took, doc["usage"]["completion_tokens"], doc["choices"][0]["message"]["content"] or ""

    for p in prompts:  # warm every path (ours loads its model on the first request)
        for x in servers:
            for via in VIAS:
                call(x, via, [{"role": "user", "content": p}], 4)
    combos = [(x, via) for x in servers for via in VIAS]
    step = 0
    for _ in range(rounds):
        for p in prompts:
            texts: dict[str, set[str]] = {x.name: set() for x in servers}
            for x, via in rotated(combos, step):
                took, n, text = call(x, via, [{"role": "user", "content": p}], max_tokens)
                ms[x.name][via].append(took)
                tokens[x.name].append(n)
                texts[x.name].add(text)
            for name in differing:
                differing[name] += texts[name] != texts[servers[0].name]
            step += 1
    for c in https.values():
        c.close()
    ours = servers[0].name
    rows = {
        x.name: {
            "mean_completion_tokens": statistics.fmean(tokens[x.name]),
            **{via: spread(ms[x.name][via]) for via in VIAS},
        }
        for x in servers
    }
    overhead = {
        x.name: {
            via: {
                "ours_ms": rows[ours][via]["median"],
                "peer_ms": rows[x.name][via]["median"],
                "overhead_ms": rows[ours][via]["median"] - rows[x.name][via]["median"],
                "overhead_pct": pct(rows[ours][via]["median"], rows[x.name][via]["median"]),
            }
            for via in VIAS
        }
        for x in servers[1:]
    }
    return {
        "rounds": rounds,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "end_banned": bool(bias),
        "servers": rows,
        "overhead_vs": overhead,
        "prompts_with_replies_differing_from_ours": differing,
        "samples_ms": ms,
    }


# --- 2. structured output -------------------------------------------------------------------------
def structured_prompts(n: int) -> list[str]:
    return [
        f"Make up a person: {TRAITS[i % len(TRAITS)]} from {PLACES[(i // len(TRAITS)) % len(PLACES)]}. "
        "Reply with their name, age and a few tags."
        for i in range(n)
    ]


def structured(servers: list[Server], model_id: str, n: int, max_tokens: int) -> dict[str, Any]:
    """``n`` schema-constrained requests per row, rows interleaved (the order rotating every prompt)."""
    checker_name, check = schema_checker()
    openai_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
    }
    peer_dialect = {"type": "json_object", "schema": PERSON_SCHEMA}
    by_name = {x.name: x for x in servers}
    rows_spec = [
        ("ours", "json_schema (OpenAI's format)", openai_format),
        ("peer", "json_schema (OpenAI's format)", openai_format),
        ("peer", 'json_object + "schema" (its own dialect)', peer_dialect),
    ]
    rows: list[dict[str, Any]] = [
        {
            "server": srv,
            "format": label,
            "requests": 0,
            "http_ok": 0,
            "finished": 0,
            "parsed": 0,
            "valid": 0,
            "ms": [],
            "statuses": {},
            "error_samples": [],
        }
        for srv, label, _ in rows_spec
    ]
    with httpx.Client(timeout=600) as http:
        for i, prompt in enumerate(structured_prompts(n)):
            for j in rotated(range(len(rows_spec)), i):
                srv, _, fmt = rows_spec[j]
                row = rows[j]
                body = {
                    "model": model_id,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "response_format": fmt,
                    **sampling(),
                }
                t0 = time.perf_counter()
                r = http.post(by_name[srv].url + "/v1/chat/completions", json=body)
                row["ms"].append((time.perf_counter() - t0) * 1000)
                row["requests"] += 1
                row["statuses"][str(r.status_code)] = row["statuses"].get(str(r.status_code), 0) + 1
                if r.status_code != 200:
                    if len(row["error_samples"]) < 2:
                        row["error_samples"].append(clean_error(f"HTTP {r.status_code}: {r.text}"))
                    continue
                row["http_ok"] += 1
                choice = r.json()["choices"][0]
                row["finished"] += choice.get("finish_reason") == "stop"
                try:
                    doc = json.loads(choice["message"]["content"] or "")
                except json.JSONDecodeError as e:
                    if len(row["error_samples"]) < 2:
                        row["error_samples"].append(f"not JSON ({e}): {choice['message']['content'][:200]!r}")
                    continue
                row["parsed"] += 1
                problems = check(doc)
                row["valid"] += not problems
                if problems and len(row["error_samples"]) < 2:
                    row["error_samples"].append(f"invalid: {'; '.join(problems)[:200]}")
    for row in rows:
        row["latency_ms"] = spread(row.pop("ms"))
    parse = {x: parse_call(by_name[x], model_id, max_tokens) for x in ("ours", "peer")}
    return {
        "requests_each": n,
        "max_tokens": max_tokens,
        "schema": PERSON_SCHEMA,
        "validator": checker_name,
        "rows": rows,
        "parse_call": parse,
    }


def parse_call(server: Server, model_id: str, max_tokens: int) -> dict[str, Any]:
    """One ``beta.chat.completions.parse`` with the pydantic model Person."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    beta = getattr(client, "beta", None)
    api = beta.chat.completions if beta is not None and hasattr(beta, "chat") else client.chat.completions
    s = sampling()
    try:
        r = api.parse(
            model=model_id,
            messages=[{"role": "user", "content": structured_prompts(1)[0]}],
            response_format=Person,
            max_tokens=max_tokens,
            temperature=s["temperature"],
            extra_body={k: v for k, v in s.items() if k != "temperature"},
        )
    except Exception as e:  # noqa: BLE001 - the outcome is the result
        return {"ok": False, "error": clean_error(f"{type(e).__name__}: {e}")}
    parsed = r.choices[0].message.parsed
    return {"ok": isinstance(parsed, Person), "parsed": parsed.model_dump() if parsed is not None else None}


# --- 3. prompt cache ------------------------------------------------------------------------------
def conversations(
    servers: list[Server], model_id: str, openers: list[str], *, turns: int, max_tokens: int
) -> dict[str, Any]:
    """Multi-turn conversations, streamed; time to first token of every turn on every server."""
    histories = {(x.name, k): [] for x in servers for k in range(len(openers))}
    ttft: dict[str, list[list[float | None]]] = {x.name: [[] for _ in openers] for x in servers}
    prompt_chars: dict[str, list[list[int]]] = {x.name: [[] for _ in openers] for x in servers}
    incomplete = {x.name: 0 for x in servers}
    step = 0
    with httpx.Client(timeout=600) as http:
        for x in servers:  # not a server's first request ever (ours also loads its model on it)
            warm = {"model": model_id, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4}
            http.post(x.url + "/v1/chat/completions", json=warm).raise_for_status()
        for t in range(turns):
            for k, opener in enumerate(openers):
                user = opener if t == 0 else FOLLOW_UPS[(t - 1) % len(FOLLOW_UPS)]
                for x in rotated(servers, step):
                    messages = histories[(x.name, k)]
                    messages.append({"role": "user", "content": user})
                    body = {
                        "model": model_id,
                        "messages": messages,
                        "max_tokens": max_tokens,
                        "stream": True,
                        **sampling(),
                    }
                    t0 = time.perf_counter()
                    with http.stream("POST", x.url + "/v1/chat/completions", json=body) as r:
                        r.raise_for_status()
                        got = read_stream(r.iter_lines(), t0)
                    incomplete[x.name] += not (got["done"] and got["finish_reason"])
                    ttft[x.name][k].append(got["first_token_ms"])
                    prompt_chars[x.name][k].append(sum(len(m["content"]) for m in messages))
                    messages.append({"role": "assistant", "content": got["text"]})
                step += 1
    out: dict[str, Any] = {
        "conversations": len(openers),
        "turns": turns,
        "max_tokens": max_tokens,
        "servers": {},
    }
    for x in servers:
        per_turn = [spread([v for conv in ttft[x.name] if (v := conv[t]) is not None]) for t in range(turns)]
        first, last = per_turn[0]["median"], per_turn[-1]["median"]
        ratios = [conv[-1] / conv[0] for conv in ttft[x.name] if conv[0] and conv[-1]]
        out["servers"][x.name] = {
            "first_token_ms_per_turn": per_turn,
            "ratio_last_over_first": last / first if first and last else None,
            "ratios_per_conversation": ratios,
            "first_token_ms": ttft[x.name],
            "prompt_chars": prompt_chars[x.name],
            "incomplete_streams": incomplete[x.name],
        }
    names = [x.name for x in servers]
    out["replies_identical_to_ours"] = {
        n: all(histories[(n, k)] == histories[(names[0], k)] for k in range(len(openers))) for n in names[1:]
    }
    return out


# --- 4. load --------------------------------------------------------------------------------------
def load_test(
    server: Server, model_id: str, prompts: list[str], *, clients: int, duration: float, max_tokens: int
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {"http_503": 0, "http_other": 0, "transport": 0, "stream_incomplete": 0}
    samples: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client_loop(i: int) -> None:
        n = 0
        with httpx.Client(base_url=server.url, timeout=600) as c:
            while time.monotonic() < stop_at:
                stream = n % 4 == 3
                body = {
                    "model": model_id,
                    "messages": [{"role": "user", "content": prompts[(i + n) % len(prompts)]}],
                    "max_tokens": max_tokens,
                    "stream": stream,
                    **sampling(),
                }
                t0 = time.perf_counter()
                kind, detail = None, ""
                try:
                    if stream:
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            if r.status_code != 200:
                                r.read()
                                kind = "http_503" if r.status_code == 503 else "http_other"
                                detail = clean_error(f"HTTP {r.status_code}: {r.text}")
                            else:
                                got = read_stream(r.iter_lines(), t0)
                                if not (got["done"] and got["finish_reason"]):
                                    kind, detail = "stream_incomplete", f"stream: {got}"[:200]
                    else:
                        r = c.post("/v1/chat/completions", json=body)
                        if r.status_code != 200:
                            kind = "http_503" if r.status_code == 503 else "http_other"
                            detail = clean_error(f"HTTP {r.status_code}: {r.text}")
                except httpx.HTTPError as e:
                    kind, detail = "transport", clean_error(f"{type(e).__name__}: {e}")
                took = (time.perf_counter() - t0) * 1000
                with lock:
                    if kind:
                        errors[kind] += 1
                        if len(samples) < 5 and detail not in samples:
                            samples.append(detail)
                    else:
                        latencies.append(took)
                n += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    n_err = sum(errors.values())
    return {
        "clients": clients,
        "duration_s": wall,
        "requests": len(latencies) + n_err,
        "ok": len(latencies),
        "errors": errors,
        "errors_other_than_503": n_err - errors["http_503"],
        "error_samples": samples,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 0.5),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else None,
    }


# --- targets and the report -----------------------------------------------------------------------
def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's serving targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    st = r.get("structured")
    if st:
        for row in st["rows"]:
            out.append(
                {
                    "target": f"structured: {row['server']}, {row['format']}: all replies parse and validate",
                    "value": f"{row['valid']}/{row['requests']}",
                    "met": row["requests"] > 0 and row["valid"] == row["requests"],
                }
            )
        for srv, p in st["parse_call"].items():
            out.append(
                {
                    "target": f"structured: `beta.chat.completions.parse` against {srv}",
                    "value": "ok" if p["ok"] else "failed",
                    "met": p["ok"],
                }
            )
    cv = r.get("conversation")
    if cv:
        ours = cv["servers"]["ours"]
        ratio = ours["ratio_last_over_first"]
        out.append(
            {
                "target": f"prompt cache: ours, first token of turn {cv['turns']} ≤ 1.5× turn 1",
                "value": None if ratio is None else round(ratio, 2),
                "met": ratio is not None and ratio <= 1.5,
            }
        )
        last = ours["first_token_ms_per_turn"][-1]["median"]
        peer = cv["servers"].get("peer-cache", {}).get("first_token_ms_per_turn", [{}])[-1].get("median")
        out.append(
            {
                "target": f"prompt cache: ours' turn-{cv['turns']} first token ≤ peer with its cache on",
                "value": None if last is None or peer is None else f"{last:.1f} vs {peer:.1f} ms",
                "met": last is not None and peer is not None and last <= peer,
            }
        )
    for key, label in (("latency_short", "short replies"), ("latency_long", "long replies")):
        lat = r.get(key)
        if not lat:
            continue
        for via in VIAS:
            o = lat["overhead_vs"]["peer"][via]["overhead_pct"]
            out.append(
                {
                    "target": f"latency: {label} via {VIA_LABEL[via]}, median overhead vs peer ≤ 0 %",
                    "value": None if o is None else round(o, 1),
                    "met": o is not None and o <= 0,
                }
            )
    for name, lt in (r.get("load") or {}).items():
        out.append(
            {
                "target": f"load: {name}, {lt['clients']} clients, no errors other than 503",
                "value": lt["errors_other_than_503"],
                "met": lt["errors_other_than_503"] == 0,
            }
        )
    return out


def _ms(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v) + " ms"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:+.1f} %"


def _range(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "–"
    return f"{s['median']:.1f} ms ({s['min']:.1f}–{s['max']:.1f})"


def latency_rows(label: str, lat: dict[str, Any]) -> list[str]:
    lines = []
    for name, row in lat["servers"].items():
        for via in VIAS:
            over = "" if name == "ours" else _pct(lat["overhead_vs"][name][via]["overhead_pct"])
            tokens = f"{row['mean_completion_tokens']:.0f}"
            lines.append(
                f"| {label} | {name} | {VIA_LABEL[via]} | {tokens} | {row[via]['n']} | {_range(row[via])} "
                f"| {_ms(row[via]['p95'])} | {over} |"
            )
    return lines


def _head(r: dict[str, Any]) -> list[str]:
    s, m = r["settings"], r["machine"]
    load = ", ".join(str(x) for x in m["load_avg"])
    sampling_text = ", ".join(f"{k} {v}" for k, v in s["sampling"].items())
    return [
        f"# `gguf-factory serve` vs `python -m llama_cpp.server`: {r['model']}",
        "",
        f"{r['date']} · commit {r['commit']} · {m['cpus']} CPUs ({m['platform']}), load {load} · "
        f"`{r['command']}` · {r['seconds'] / 60:.1f} min",
        "",
        f"Same GGUF ({r['model_bytes'] / 1e6:.1f} MB), {s['threads']} threads, context {s['ctx']} on every "
        f"server; greedy with the same explicit sampling settings ({sampling_text}). "
        f"llama-cpp-python {s['llama_cpp_python']}, openai {s['openai']}. The servers, each a separate "
        "process on a loopback port:",
        "",
        "| name | command |",
        "|---|---|",
        *(f"| {n} | `{c}` |" for n, c in r["servers"].items()),
        "",
        "## Targets (issue 16)",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        *(
            f"| {t['target']} | {'–' if t['value'] is None else t['value']} | {'✅' if t['met'] else '❌'} |"
            for t in r["targets"]
        ),
        "",
    ]


def _latency_md(ls: dict[str, Any], ll: dict[str, Any]) -> list[str]:
    differing = ls["prompts_with_replies_differing_from_ours"]
    differing_long = ll["prompts_with_replies_differing_from_ours"]
    n_short, n_long = ls["prompts"] * ls["rounds"], ll["prompts"] * ll["rounds"]
    return [
        "## Latency, one request at a time",
        "",
        f"Interleaved prompt by prompt ({ls['prompts']} prompts; {ls['rounds']} rounds of short replies, "
        f"{ll['rounds']} of long ones), the order of (server, client) rotating every prompt; medians "
        "(min–max). Overhead: ours' median against the peer's through the same client. Short replies end "
        f"by themselves (at most {ls['max_tokens']} tokens); long ones are {ll['max_tokens']} tokens, end of "
        "generation banned by logit_bias.",
        "",
        "| replies | server | via | mean tokens | requests | median (min–max) | p95 | ours' overhead |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *latency_rows("short", ls),
        *latency_rows(f"{ll['max_tokens']} tokens", ll),
        "",
        "Prompts whose replies differed from ours (either client): "
        + ", ".join(
            f"{n}: short {v} of {n_short}, long {differing_long[n]} of {n_long}" for n, v in differing.items()
        )
        + ".",
        "",
    ]


def _structured_md(st: dict[str, Any]) -> list[str]:
    return [
        "## Structured output",
        "",
        f"{st['requests_each']} requests per row (a person: name, age, tags, every field required, no "
        f"other field), at most {st['max_tokens']} tokens, interleaved; validated with {st['validator']}.",
        "",
        "| server | response_format | requests | HTTP 200 | finish stop | parse | validate "
        "| median (min–max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {x['server']} | {x['format']} | {x['requests']} | {x['http_ok']} | {x['finished']} "
            f"| {x['parsed']} | {x['valid']} | {_range(x['latency_ms'])} |"
            for x in st["rows"]
        ),
        "",
        *(
            f"- {x['server']}, {x['format']}: " + " / ".join(f"`{e}`" for e in x["error_samples"])
            for x in st["rows"]
            if x["error_samples"]
        ),
        *(
            f"- `beta.chat.completions.parse` (pydantic model) against {n}: "
            + (f"ok, {p['parsed']}" if p["ok"] else f"failed: `{p['error']}`")
            for n, p in st["parse_call"].items()
        ),
        "",
    ]


def _conversation_md(cv: dict[str, Any]) -> list[str]:
    names = list(cv["servers"])
    ratios = [cv["servers"][n]["ratio_last_over_first"] for n in names]
    return [
        "## Prompt cache: multi-turn conversations",
        "",
        f"{cv['conversations']} conversations of {cv['turns']} turns (each turn appends the previous reply "
        f"and a new user message; replies of at most {cv['max_tokens']} tokens), streamed; the "
        "conversations take turns on each server, so what a turn reuses comes from the prompt cache. Time "
        "to the first content token, median (min–max) over the conversations:",
        "",
        "| turn | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
        *(
            f"| {t + 1} | "
            + " | ".join(_range(cv["servers"][n]["first_token_ms_per_turn"][t]) for n in names)
            + " |"
            for t in range(cv["turns"])
        ),
        f"| turn {cv['turns']} / turn 1 | "
        + " | ".join("–" if x is None else f"{x:.2f}×" for x in ratios)
        + " |",
        "",
        "Replies identical to ours in every turn: "
        + ", ".join(f"{n} {'yes' if v else 'no'}" for n, v in cv["replies_identical_to_ours"].items())
        + "; streams that ended without a finish reason: "
        + ", ".join(f"{n} {cv['servers'][n]['incomplete_streams']}" for n in names)
        + ".",
        "",
    ]


def _load_md(ld: dict[str, Any], s: dict[str, Any]) -> list[str]:
    first = next(iter(ld.values()))
    return [
        f"## {first['clients']} concurrent clients, {s['duration']:.0f} s per server",
        "",
        f"One server at a time ({', '.join(ld)}, in that order), replies of at most {s['max_tokens']} "
        "tokens, every fourth request streamed. Errors: 503 (documented: a full queue or a queue "
        "timeout) / any other HTTP status / transport / a stream that ended without a finish reason.",
        "",
        "| server | requests | errors 503 / other / transport / incomplete | req/s | p50 | p95 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {n} | {x['requests']} | {' / '.join(str(v) for v in x['errors'].values())} "
            f"| {x['requests_per_s']:.2f} | {_ms(x['p50_ms'])} | {_ms(x['p95_ms'])} | {_ms(x['p99_ms'])} "
            f"| {_ms(x['max_ms'])} |"
            for n, x in ld.items()
        ),
        "",
        *(
            f"- {n}: " + " / ".join(f"`{e}`" for e in x["error_samples"])
            for n, x in ld.items()
            if x["error_samples"]
        ),
        "",
    ]


def render_md(r: dict[str, Any]) -> str:
    """The Markdown report: every row of every phase that ran."""
    lines = _head(r)
    if r.get("latency_short") and r.get("latency_long"):
        lines += _latency_md(r["latency_short"], r["latency_long"])
    if r.get("structured"):
        lines += _structured_md(r["structured"])
    if r.get("conversation"):
        lines += _conversation_md(r["conversation"])
    if r.get("load"):
        lines += _load_md(r["load"], r["settings"])
    if r.get("memory"):
        lines += [
            "## Server memory at the end",
            "",
            "| server | RSS | peak RSS |",
            "|---|---:|---:|",
            *(
                f"| {n} | {m.get('rss_mb', '–')} MB | {m.get('peak_rss_mb', '–')} MB |"
                for n, m in r["memory"].items()
            ),
            "",
        ]
    lines += ["## Not compared, and how the peer is configured", "", *(f"- {n}" for n in r["notes"]), ""]
    return "\n".join(lines)


NOTES = [
    "Per-request LoRA adapters over one shared base (a router manifest: several domains served from one "
    "base in memory): ours only. `llama_cpp.server` applies one adapter (`--lora_path`) to every request "
    "of a model, so the shared-base targets have no peer figure; ours are in benchmarks/serve_routing.py.",
    "`llama_cpp.server` runs with `--interrupt_requests false`: by default a request that arrives while a "
    "reply streams cuts that reply short (it ends with `[DONE]` and no finish reason), so under load it "
    "would do less work than ours. `--verbose false` spares it a timing printout per request.",
    "The peer's prompt cache is off by default; peer-cache is the same server with `--cache true` (RAM). "
    "Ours' prompt cache is on by default (`--prompt-cache-mb 128`) in every phase.",
]


# --- main -----------------------------------------------------------------------------------------
def end_bias(model: Path, ctx: int, threads: int) -> dict[int, float]:
    with load(model, n_ctx=ctx, threads=threads) as m:
        return {t: -100.0 for t in range(m.llm.n_vocab()) if m.is_end_of_generation(t)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="GGUF (default: the demo's Q4_K_M)")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="every server (default: all cores)"
    )
    ap.add_argument("--ctx", type=int, default=2048, help="context length, every server")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of short replies (long: half as many)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32, help="cap on short replies and in the load test")
    ap.add_argument("--long-tokens", type=int, default=200)
    ap.add_argument("--structured", type=int, default=50, help="json_schema requests per row")
    ap.add_argument("--structured-tokens", type=int, default=128)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--turn-tokens", type=int, default=48, help="cap on each conversation reply")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--peer-cache-size", type=int, default=None, help="bytes (default: llama_cpp.server's)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for serve_peer.json / .md")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}: run `gguf-factory demo` first, or pass --model X.gguf")
    command = "python benchmarks/serve_peer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    test_jsonl = args.model.parent / "data" / "test.jsonl"
    prompts = FALLBACK_PROMPTS
    if test_jsonl.is_file():
        prompts = [p for p, _ in held_out_prompts(test_jsonl, args.prompts)]
    prompts = prompts[: args.prompts]
    model_id = args.model.stem
    bias = end_bias(args.model, args.ctx, args.threads)
    logs = Path(tempfile.mkdtemp(prefix="serve-peer-"))
    servers = make_servers(args.model, model_id, args.threads, args.ctx, logs, args.peer_cache_size)
    by_name = {x.name: x for x in servers}
    pair = [by_name["ours"], by_name["peer"]]
    result: dict[str, Any] = {
        "benchmark": "serve_peer",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "command": command,
        "machine": machine(),
        "model": model_id,
        "model_file": shown_path(args.model),
        "model_bytes": args.model.stat().st_size,
        "settings": {
            "threads": args.threads,
            "ctx": args.ctx,
            "sampling": sampling(),
            "max_tokens": args.max_tokens,
            "duration": args.duration,
            "llama_cpp_python": __import__("llama_cpp").__version__,
            "openai": openai.__version__,
        },
        "servers": {x.name: shown(x.cmd, args.model) for x in servers},
        "notes": NOTES,
    }
    t_start = time.perf_counter()
    try:
        for x in servers:
            x.start()
        for x in servers:
            x.wait_ready()
        print(f"latency: {args.rounds} rounds x {len(prompts)} prompts, ours vs peer", flush=True)
        result["latency_short"] = latency(
            pair, model_id, prompts, rounds=args.rounds, max_tokens=args.max_tokens, bias=None
        )
        long_rounds = max(1, args.rounds // 2)
        print(f"latency: {long_rounds} rounds of {args.long_tokens}-token replies", flush=True)
        result["latency_long"] = latency(
            pair, model_id, prompts, rounds=long_rounds, max_tokens=args.long_tokens, bias=bias
        )
        print(f"structured: {args.structured} requests per row", flush=True)
        result["structured"] = structured(servers, model_id, args.structured, args.structured_tokens)
        print(f"prompt cache: {args.conversations} conversations x {args.turns} turns", flush=True)
        openers = [  # distinct: no conversation's first turn is another's
            OPENERS[k % len(OPENERS)] + (f" ({k // len(OPENERS)})" if k >= len(OPENERS) else "")
            for k in range(args.conversations)
        ]
        result["conversation"] = conversations(
            servers, model_id, openers, turns=args.turns, max_tokens=args.turn_tokens
        )
        result["load"] = {}
        for x in pair:
            print(f"load: {x.name}, {args.clients} clients for {args.duration:.0f} s", flush=True)
            result["load"][x.name] = load_test(
                x, model_id, prompts, clients=args.clients, duration=args.duration, max_tokens=args.max_tokens
            )
        result["memory"] = {x.name: x.memory() for x in servers}
    finally:
        for x in servers:
            x.stop()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = targets(result)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "serve_peer.json", result)
    md = render_md(result)
    atomic_write_text(args.results / "serve_peer.md", md)
    print(md)
    print(f"wrote {args.results / 'serve_peer.md'} and .json in {result['seconds']:.0f} s; logs: {logs}")


if __name__ == "__main__":
    main()
