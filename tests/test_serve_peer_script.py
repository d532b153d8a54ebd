"""benchmarks/serve_peer.py's bookkeeping, without starting a server: the schema check, the stream reader
(time to first token, a stream cut short), the rotation of who goes first, the targets and the report
(every row of every phase), and no machine paths in what it records."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def sp() -> ModuleType:
    return load_benchmark("serve_peer", "serve_peer_script")


DOCS: list[tuple[Any, bool]] = [
    ({"name": "Ana", "age": 31, "tags": ["baker", "Lisbon"]}, True),
    ({"name": "Ana", "age": 31, "tags": []}, True),
    ({"name": "Ana", "age": 31}, False),  # a required field missing
    ({"name": "Ana", "age": 31, "tags": [], "city": "Lisbon"}, False),  # a field the schema does not have
    ({"name": "Ana", "age": "31", "tags": []}, False),
    ({"name": "Ana", "age": 31.5, "tags": []}, False),
    ({"name": "Ana", "age": True, "tags": []}, False),  # a bool is not an integer in JSON Schema
    ({"name": "Ana", "age": 31, "tags": ["a", "b", "c", "d", "e"]}, False),  # maxItems 4
    ({"name": "A" * 41, "age": 31, "tags": []}, False),  # maxLength 40
    ({"name": "Ana", "age": 31, "tags": [1]}, False),
    (["Ana", 31, []], False),
    ("Ana", False),
]


def test_the_minimal_validator_agrees_with_jsonschema(sp: ModuleType) -> None:
    for doc, ok in DOCS:
        assert (not sp.validate(doc, sp.PERSON_SCHEMA)) is ok, doc
    jsonschema = pytest.importorskip("jsonschema")
    v = jsonschema.Draft202012Validator(sp.PERSON_SCHEMA)
    for doc, ok in DOCS:
        assert v.is_valid(doc) is ok, doc
    _, check = sp.schema_checker()
    assert [not check(doc) for doc, _ in DOCS] == [ok for _, ok in DOCS]


def _sse(*chunks: dict[str, Any], done: bool = True) -> list[str]:
    import json

    lines = []
    for c in chunks:
        lines += [f"data: {json.dumps({'choices': [c]})}", ""]
    return lines + (["data: [DONE]", ""] if done else [])


def test_read_stream_times_the_first_content_not_the_role_chunk(sp: ModuleType) -> None:
    lines = _sse(
        {"delta": {"role": "assistant"}, "finish_reason": None},
        {"delta": {"content": ""}, "finish_reason": None},
        {"delta": {"content": "Hel"}, "finish_reason": None},
        {"delta": {"content": "lo"}, "finish_reason": None},
        {"delta": {}, "finish_reason": "stop"},
    )

    def slow(items: list[str]):  # each line arrives 5 ms after the previous one
        for x in items:
            time.sleep(0.005)
            yield x

    t0 = time.perf_counter()
    got = sp.read_stream(slow(lines), t0)
    assert got["text"] == "Hello" and got["finish_reason"] == "stop" and got["done"]
    assert 5 * 5 <= got["first_token_ms"] < (time.perf_counter() - t0) * 1000  # the 5th line, not the 1st

    cut = sp.read_stream(iter(_sse({"delta": {"content": "Hi"}, "finish_reason": None}, done=False)), t0)
    assert cut["text"] == "Hi" and not cut["done"] and cut["finish_reason"] is None
    nothing = sp.read_stream(iter(_sse({"delta": {}, "finish_reason": "length"})), t0)
    assert nothing["first_token_ms"] is None and nothing["done"]


def test_every_server_and_client_goes_first_equally_often(sp: ModuleType) -> None:
    combos = [("ours", "openai"), ("ours", "raw"), ("peer", "openai"), ("peer", "raw")]
    firsts = [sp.rotated(combos, k)[0] for k in range(12)]
    assert all(firsts.count(c) == 3 for c in combos)
    assert all(sorted(sp.rotated(combos, k)) == sorted(combos) for k in range(12))


def _latency(ours_ms: float, peer_ms: float) -> dict[str, Any]:
    row = {"n": 3, "median": 0.0, "min": 0.0, "max": 0.0, "p95": 0.0}
    servers = {
        "ours": {
            "mean_completion_tokens": 9,
            "openai": {**row, "median": ours_ms},
            "raw": {**row, "median": ours_ms},
        },
        "peer": {
            "mean_completion_tokens": 9,
            "openai": {**row, "median": peer_ms},
            "raw": {**row, "median": peer_ms},
        },
    }
    over = {
        v: {"overhead_pct": (ours_ms - peer_ms) / peer_ms * 100, "overhead_ms": ours_ms - peer_ms}
        for v in ("openai", "raw")
    }
    return {
        "rounds": 1,
        "prompts": 3,
        "max_tokens": 32,
        "servers": servers,
        "overhead_vs": {"peer": over},
        "prompts_with_replies_differing_from_ours": {"peer": 1},
    }


def _turns(first: float, last: float) -> dict[str, Any]:
    per_turn = [
        {"n": 2, "median": first, "min": first, "max": first, "p95": first},
        {"n": 2, "median": last, "min": last, "max": last, "p95": last},
    ]
    return {
        "first_token_ms_per_turn": per_turn,
        "ratio_last_over_first": last / first,
        "incomplete_streams": 0,
    }


def _result(sp: ModuleType, *, valid: int, ours_last: float, peer_cache_last: float, ours_ms: float) -> dict:
    structured_rows = [
        {
            "server": "ours",
            "format": "json_schema (OpenAI's format)",
            "requests": 50,
            "http_ok": 50,
            "finished": 50,
            "parsed": 50,
            "valid": valid,
            "latency_ms": sp.spread([1.0, 2.0]),
            "error_samples": [],
        },
        {
            "server": "peer",
            "format": "json_schema (OpenAI's format)",
            "requests": 50,
            "http_ok": 0,
            "finished": 0,
            "parsed": 0,
            "valid": 0,
            "latency_ms": sp.spread([1.0]),
            "error_samples": ["HTTP 500: no"],
        },
    ]
    load = {
        "clients": 16,
        "requests": 10,
        "errors": {"http_503": 2, "http_other": 0, "transport": 0, "stream_incomplete": 0},
        "errors_other_than_503": 0,
        "error_samples": [],
        "requests_per_s": 1.0,
        "p50_ms": 1.0,
        "p95_ms": 2.0,
        "p99_ms": 3.0,
        "max_ms": 3.0,
    }
    r: dict[str, Any] = {
        "model": "m",
        "date": "2026-12-04",
        "commit": "abc",
        "command": "python benchmarks/serve_peer.py",
        "machine": {"cpus": 2, "platform": "Linux", "load_avg": [0.1, 0.1, 0.1]},
        "model_bytes": 1e6,
        "seconds": 60,
        "settings": {
            "threads": 2,
            "ctx": 2048,
            "sampling": sp.sampling(),
            "max_tokens": 32,
            "duration": 60.0,
            "llama_cpp_python": "0.3.36",
            "openai": "3",
        },
        "servers": {"ours": "python -m gguf_factory.cli serve m.gguf", "peer": "python -m llama_cpp.server"},
        "notes": ["n"],
        "latency_short": _latency(ours_ms, 100.0),
        "latency_long": _latency(ours_ms, 100.0),
        "structured": {
            "requests_each": 50,
            "max_tokens": 128,
            "validator": "x",
            "rows": structured_rows,
            "parse_call": {"ours": {"ok": True, "parsed": {}}, "peer": {"ok": False, "error": "500"}},
        },
        "conversation": {
            "conversations": 2,
            "turns": 2,
            "max_tokens": 48,
            "servers": {
                "ours": _turns(100.0, ours_last),
                "peer": _turns(100.0, 400.0),
                "peer-cache": _turns(100.0, peer_cache_last),
            },
            "replies_identical_to_ours": {"peer": True, "peer-cache": False},
        },
        "load": {"ours": load, "peer": {**load, "errors_other_than_503": 1}},
        "memory": {"ours": {"rss_mb": 1.0, "peak_rss_mb": 2.0}},
    }
    r["targets"] = sp.targets(r)
    return r


def _met(r: dict[str, Any]) -> dict[str, bool]:
    return {t["target"]: t["met"] for t in r["targets"]}


def test_targets_follow_the_measurements(sp: ModuleType) -> None:
    good = _met(_result(sp, valid=50, ours_last=140.0, peer_cache_last=150.0, ours_ms=99.0))
    bad = _met(_result(sp, valid=49, ours_last=160.0, peer_cache_last=150.0, ours_ms=101.0))
    assert good.keys() == bad.keys()
    flipped = {k for k in good if good[k] != bad[k]}
    assert {k.split(":")[0] for k in flipped} == {"structured", "prompt cache", "latency"}
    assert len([k for k in flipped if k.startswith("latency")]) == 4  # short and long, both clients
    assert len([k for k in flipped if k.startswith("prompt cache")]) == 2  # ratio 1.6 > 1.5; 160 > 150 ms
    assert not good["structured: peer, json_schema (OpenAI's format): all replies parse and validate"]
    assert good["load: ours, 16 clients, no errors other than 503"]  # 503s are documented
    assert not good["load: peer, 16 clients, no errors other than 503"]


def test_the_report_has_every_row(sp: ModuleType) -> None:
    r = _result(sp, valid=49, ours_last=160.0, peer_cache_last=150.0, ours_ms=101.0)
    md = sp.render_md(r)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert (
        len([x for x in rows if x.startswith(("| short |", "| 32 tokens |"))]) == 8
    )  # 2 servers x 2 clients x 2
    assert "| ours | json_schema (OpenAI's format) | 50 | 50 | 50 | 50 | 49 |" in md
    assert "| peer | json_schema (OpenAI's format) | 50 | 0 | 0 | 0 | 0 |" in md
    assert len([x for x in rows if x.startswith(("| 1 |", "| 2 |"))]) == 2  # every turn
    assert "| turn 2 / turn 1 | 1.60× | 4.00× | 1.50× |" in md
    assert "| ours | 10 | 2 / 0 / 0 / 0 |" in md
    assert "+1.0 %" in md and "❌" in md and "✅" in md
    assert md.count("`HTTP 500: no`") == 1


def test_no_machine_paths(sp: ModuleType, tmp_path: Path) -> None:
    model = tmp_path / "deep" / "m.gguf"
    cmd = [
        "/usr/bin/python3",
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--port",
        "8123",
        "--n_ctx",
        "1",
    ]
    assert sp.shown(cmd, model) == "python -m llama_cpp.server --model m.gguf --n_ctx 1"
    assert sp.shown_path(sp.ROOT / "benchmarks" / "x.gguf") == "benchmarks/x.gguf"
    raw = (
        'HTTP 500: {"error":{"message":"Input should be \'text\'\\n\\n  File \\"/root/x/app.py\\", line 3"}}'
    )
    assert sp.clean_error(raw) == 'HTTP 500: {"error":{"message":"Input should be \'text\''
    said = 'InternalServerError: 500 - Input should be\n\n  File "/root/x/app.py", line 3'
    assert sp.clean_error(said) == "InternalServerError: 500 - Input should be"
    assert sp.clean_error("a " * 300) == ("a " * 100).strip()
