"""`serve`: the real server (uvicorn + llama.cpp) on the tiny GGUF, spoken to with the official `openai`
client and with raw HTTP for the error cases; the model pool's LRU eviction on two real GGUFs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself ships with
import openai
import pytest

from gguf_factory.errors import InputError
from gguf_factory.runtime import load
from gguf_factory.serve import ModelPool, PoolBusyError, UnknownModelError, create_app, parse_size
from gguf_factory.serve.app import chat_prompt_tokens
from gguf_factory.serve.pool import resolve_n_ctx
from serve_helpers import assert_error, assert_idle_soon, free_port, running, wait_until_up

KEY = "test-key-123"
MAX_TOKENS_LIMIT = 48
MESSAGES = [
    {"role": "system", "content": "You are a friendly bot."},
    {"role": "user", "content": "Hello"},
]


@pytest.fixture(scope="module")
def model_id(tiny_f16_gguf: Path) -> str:
    return tiny_f16_gguf.stem


@pytest.fixture(scope="module")
def pool(tiny_f16_gguf: Path) -> Iterator[ModelPool]:
    p = ModelPool({tiny_f16_gguf.stem: tiny_f16_gguf}, queue_timeout=10)
    yield p
    p.close()


@pytest.fixture(scope="module")
def base_url(pool: ModelPool) -> Iterator[str]:
    with running(create_app(pool, api_key=KEY, max_tokens_limit=MAX_TOKENS_LIMIT)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def direct(tiny_f16_gguf: Path) -> Iterator[object]:
    """The same GGUF loaded straight through runtime.load, for reference answers."""
    with load(tiny_f16_gguf) as m:
        yield m


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


# --- happy paths through the official client ------------------------------------------------------
def test_chat_plain_and_streaming_equal_runtime(client: openai.OpenAI, model_id: str, direct) -> None:
    plain = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=24, temperature=0)
    assert plain.object == "chat.completion" and plain.model == model_id and plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    text = choice.message.content
    assert text.strip(), "the tiny model should say something"
    u = plain.usage
    assert u.prompt_tokens == chat_prompt_tokens(direct, MESSAGES)
    assert 0 < u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens

    stream = client.chat.completions.create(
        model="auto", messages=MESSAGES, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == model_id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) >= 3, "role, content, finish"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    assert direct.chat(MESSAGES, max_tokens=24) == text.strip()


def test_chat_stream_usage_and_raw_sse(base_url: str, model_id: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    import json

    usage_chunk = json.loads(lines[-2][len("data: ") :])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] > 0


def test_completions_plain_and_streaming(client: openai.OpenAI, model_id: str, direct) -> None:
    prompt = "<|im_start|>user\nwhat is your favorite food?<|im_end|>\n<|im_start|>assistant\n"
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason in ("stop", "length")
    text = plain.choices[0].text
    assert text == direct.generate(prompt, max_tokens=20)
    assert text.strip()
    assert plain.usage.prompt_tokens > 10 and plain.usage.completion_tokens > 0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model_id, prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
    )
    assert streamed == text


def test_sampling_options_pass_through(client: openai.OpenAI, model_id: str) -> None:
    def reply(**kw: object) -> str:
        r = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=20, **kw)
        return r.choices[0].message.content

    a = reply(temperature=1.5, top_p=1.0, seed=11)
    assert a == reply(temperature=1.5, top_p=1.0, seed=11), "same seed, same sample"
    others = {reply(temperature=1.5, top_p=1.0, seed=s) for s in range(12, 16)}
    assert others != {a}, "the seed should change the sample"
    short = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_logit_bias_bans_the_end(client: openai.OpenAI, base_url: str, model_id: str, direct) -> None:
    ends = [t for t in range(direct.llm.n_vocab()) if direct.is_end_of_generation(t)]
    assert ends
    normal = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=40)
    assert normal.choices[0].finish_reason == "stop" and normal.usage.completion_tokens < 40
    banned = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=40, logit_bias={str(t): -100 for t in ends}
    )
    assert banned.choices[0].finish_reason == "length" and banned.usage.completion_tokens == 40
    bad = {"messages": MESSAGES, "logit_bias": {"not-a-token": 1}}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=bad, headers=auth())
    assert_error(r, 400, says="logit_bias")


def test_models_and_health(client: openai.OpenAI, base_url: str, model_id: str, pool: ModelPool) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].owned_by == "gguf-factory"
    assert client.models.retrieve(model_id).id == model_id
    h = httpx.get(f"{base_url}/health")  # no key needed for a health check, and then no details
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    h = httpx.get(f"{base_url}/health", headers=auth())  # the key: the models (file names, no paths)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["models"][0]["id"] == model_id
    assert h.json()["models"][0]["n_ctx"] == pool.n_ctx(model_id)
    assert h.json()["models"][0]["file"] == pool.path(model_id).name
    assert str(pool.path(model_id).parent) not in h.text


def test_chat_prompt_tokens_match_llama_cpp(direct) -> None:
    for messages in (
        [{"role": "user", "content": "hi"}],
        MESSAGES,
        MESSAGES + [{"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "joke?"}],
    ):
        out = direct.llm.create_chat_completion(messages=messages, max_tokens=1)
        assert chat_prompt_tokens(direct, messages) == out["usage"]["prompt_tokens"]


# --- errors ---------------------------------------------------------------------------------------
def test_api_key(base_url: str, model_id: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 4}
    assert_error(httpx.post(url, json=body), 401, code="invalid_api_key", says="missing API key")
    bad = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
    assert_error(bad, 401, code="invalid_api_key", says="invalid API key")
    assert_error(httpx.get(f"{base_url}/v1/models"), 401)
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.post(url, json=body, headers=auth()).status_code == 200


def test_unknown_model(base_url: str, client: openai.OpenAI) -> None:
    r = httpx.post(
        f"{base_url}/v1/chat/completions", json={"model": "gpt-4", "messages": MESSAGES}, headers=auth()
    )
    err = assert_error(r, 404, code="model_not_found", says="'gpt-4' does not exist")
    assert err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    assert_error(httpx.get(f"{base_url}/v1/models/nope", headers=auth()), 404)
    assert_error(httpx.get(f"{base_url}/v1/nothing-here", headers=auth()), 404)


def test_malformed_requests(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    headers = {**auth(), "Content-Type": "application/json"}
    assert_error(httpx.post(url, content=b'{"messages": [', headers=headers), 400, says="malformed JSON")
    assert_error(httpx.post(url, json={"max_tokens": 4}, headers=auth()), 400, says="messages")
    assert_error(httpx.post(url, json={"messages": []}, headers=auth()), 400, says="messages")
    bad_role = {"messages": [{"role": "wizard", "content": "hi"}]}
    err = assert_error(httpx.post(url, json=bad_role, headers=auth()), 400, says="role")
    assert err["param"] == "messages.0.role"
    hot = {"messages": MESSAGES, "temperature": 9}
    assert_error(httpx.post(url, json=hot, headers=auth()), 400, says="temperature")
    assert_error(httpx.post(url, json={"messages": MESSAGES, "n": 2}, headers=auth()), 400, says="n:")
    two = {"prompt": ["a", "b"]}
    assert_error(httpx.post(f"{base_url}/v1/completions", json=two, headers=auth()), 400, says="one prompt")


def test_max_tokens_over_the_cap(base_url: str, client: openai.OpenAI, model_id: str) -> None:
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": MAX_TOKENS_LIMIT + 1}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=auth())
    assert_error(r, 400, code="max_tokens_too_large", says=f"limit of {MAX_TOKENS_LIMIT}")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt="hi", max_tokens=1000)
    ok = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS_LIMIT)
    assert ok.usage.completion_tokens <= MAX_TOKENS_LIMIT


def test_prompt_longer_than_context(base_url: str, model_id: str, pool: ModelPool) -> None:
    n_ctx = pool.n_ctx(model_id)
    long = [{"role": "user", "content": "hello " * (n_ctx * 2)}]
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": long}, headers=auth())
    assert_error(r, 400, code="context_length_exceeded", says=f"context of {n_ctx} tokens")
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi " * n_ctx * 2}, headers=auth())
    assert_error(r, 400, code="context_length_exceeded")
    ok = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": MESSAGES}, headers=auth())
    assert ok.status_code == 200


def test_prompt_token_limit(tiny_f16_gguf: Path, direct) -> None:
    limit = chat_prompt_tokens(direct, MESSAGES)
    pool = ModelPool({"m": tiny_f16_gguf})
    try:
        with running(create_app(pool, max_prompt_tokens=limit)) as url:
            ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
            assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == limit
            longer = [*MESSAGES[:1], {"role": "user", "content": MESSAGES[1]["content"] + " really"}]
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": longer})
            assert_error(r, 400, code="prompt_too_long", says=f"limit of {limit} tokens")
    finally:
        pool.close()


# --- concurrency, queueing, disconnects -----------------------------------------------------------
def test_simultaneous_requests_are_serialized(base_url: str, model_id: str, pool: ModelPool) -> None:
    barrier = threading.Barrier(3)
    results: list[httpx.Response] = []

    def ask(stream: bool) -> None:
        body = {"model": model_id, "messages": MESSAGES, "max_tokens": 24, "stream": stream}
        barrier.wait()
        with httpx.Client(timeout=60) as c:
            results.append(c.post(f"{base_url}/v1/chat/completions", json=body, headers=auth()))

    threads = [threading.Thread(target=ask, args=(s,)) for s in (False, True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200, 200]
    plain = [
        r.json()["choices"][0]["message"]["content"] for r in results if "json" in r.headers["content-type"]
    ]
    assert len(plain) == 2 and plain[0] == plain[1], "greedy answers to one prompt must not interfere"
    assert_idle_soon(pool)


def test_queue_longer_than_the_thread_pool(base_url: str, model_id: str) -> None:
    """More waiting requests than the server's 40 worker threads: the streams in front still progress."""
    n = 48
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def ask() -> None:
        body = {"model": model_id, "messages": MESSAGES, "max_tokens": 8, "stream": True}
        barrier.wait()
        with httpx.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers=auth(), timeout=60
        ) as r:
            lines = [line for line in r.iter_lines() if line]
            codes.append(r.status_code if lines[-1] == "data: [DONE]" else -1)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * n


def test_busy_model_queues_then_times_out(tiny_f16_gguf: Path) -> None:
    pool = ModelPool({"m": tiny_f16_gguf}, queue_timeout=0.3)
    body = {"messages": MESSAGES, "max_tokens": 4}
    try:
        with running(create_app(pool)) as url:
            lease = pool.acquire("m")  # another request is generating
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/chat/completions", json=body)
            assert_error(r, 503, code="model_busy", says="busy")
            assert time.monotonic() - t0 >= 0.3
            done: list[int] = []
            pool.queue_timeout = 10
            waiter = threading.Thread(
                target=lambda: done.append(httpx.post(f"{url}/v1/chat/completions", json=body).status_code)
            )
            waiter.start()
            time.sleep(0.4)
            assert waiter.is_alive() and not done, "the request should wait in the queue"
            lease.release()
            waiter.join(30)
            assert done == [200]
    finally:
        pool.close()


def test_client_disconnect_mid_stream(base_url: str, model_id: str, pool: ModelPool) -> None:
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": MAX_TOKENS_LIMIT, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read one event, then hang up
    assert_idle_soon(pool)
    ok = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "stream": False}, headers=auth())
    assert ok.status_code == 200


# --- the pool -------------------------------------------------------------------------------------
def test_pool_lru_eviction(tiny_f16_gguf: Path, tiny_f32_gguf: Path, tmp_path: Path) -> None:
    f16_copy = tmp_path / "tiny-F16-copy.gguf"
    shutil.copyfile(tiny_f16_gguf, f16_copy)
    paths = {"f16": tiny_f16_gguf, "f32": tiny_f32_gguf, "copy": f16_copy}
    costs = {k: ModelPool({k: p}).cost(k) for k, p in paths.items()}
    assert costs["f32"] > costs["f16"] > tiny_f16_gguf.stat().st_size  # file + KV cache

    # a budget for one model at a time
    pool = ModelPool({"f16": tiny_f16_gguf, "f32": tiny_f32_gguf}, budget_bytes=costs["f32"], queue_timeout=5)
    try:
        with pool.use("f16") as m:
            first = m.chat(MESSAGES, max_tokens=8)
        assert pool.loaded() == ["f16"] and pool.used_bytes == costs["f16"]
        with pool.use("f32") as m:
            assert m.path == tiny_f32_gguf
        assert pool.loaded() == ["f32"] and pool.evictions == 1 and pool.used_bytes == costs["f32"]
        with pool.use("f16") as m:  # loaded again, answers the same
            assert m.chat(MESSAGES, max_tokens=8) == first
        assert pool.loaded() == ["f16"] and pool.evictions == 2
        assert {s["id"]: s["loads"] for s in pool.status()} == {"f16": 2, "f32": 1}

        # no room while the loaded model is busy: the other waits, then gives up
        lease = pool.acquire("f16")
        with pytest.raises(PoolBusyError, match="no memory"):
            pool.acquire("f32", timeout=0.2)
        lease.release()
        lease.release()  # idempotent
        with pool.use("f32", timeout=1):
            pass
        with pytest.raises(UnknownModelError, match="'nope' not found"):
            pool.acquire("nope")
    finally:
        pool.close()

    # room for two: the least recently used goes, not the oldest loaded
    pool = ModelPool(paths, budget_bytes=costs["f32"] + costs["f16"])
    try:
        for k in ("f16", "f32", "f16", "copy"):
            with pool.use(k):
                pass
        assert pool.loaded() == ["f16", "copy"]
    finally:
        pool.close()

    with pytest.raises(InputError, match="more than the memory budget"):
        ModelPool({"f32": tiny_f32_gguf}, budget_bytes=costs["f32"] - 1)


def test_pool_context_matches_runtime(tiny_f16_gguf: Path, direct) -> None:
    assert resolve_n_ctx(tiny_f16_gguf) == direct.n_ctx


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5k") == 1500
    assert parse_size("1000") == 1000
    for bad in ("", "lots", "-1GB", "0"):
        with pytest.raises(InputError):
            parse_size(bad)


# --- the command ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_serve(tiny_f16_gguf: Path) -> None:
    port = free_port()
    exe = shutil.which("gguf-factory")
    cmd = [exe] if exe else [sys.executable, "-m", "gguf_factory.cli"]
    env = {**os.environ, "GGUF_FACTORY_API_KEY": "from-env"}
    proc = subprocess.Popen(
        [*cmd, "serve", str(tiny_f16_gguf), "--port", str(port), "--max-tokens-limit", "8"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)
        r = client.chat.completions.create(model=tiny_f16_gguf.stem, messages=MESSAGES, max_tokens=8)
        reply = r.choices[0].message.content
        assert isinstance(reply, str) and reply.strip(), reply
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=9)
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(15)
    out = proc.stdout.read().decode() if proc.stdout else ""
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out


def test_cli_serve_bad_input(tmp_path: Path) -> None:
    from cli_helpers import assert_one_line_error, run_cli

    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    assert_one_line_error(run_cli("serve", str(not_gguf)), "not a GGUF")
    assert_one_line_error(run_cli("serve", str(tmp_path / "missing.gguf")), "not found")


def test_one_sse_path_for_both_endpoints() -> None:
    """Both endpoints' streams come from one generator: same framing, closing chunk, usage, error and
    close-on-every-end behaviour; only the chunk's object name and where the text goes differ."""
    import json

    from gguf_factory.serve.app import _chat_events, _completion_events

    class FakeModel:
        def tokenize(self, text: str) -> list[int]:
            return list(range(len(text.split())))

    class Chunks:
        def __init__(self, items: list[dict], fail: bool = False) -> None:
            self.items, self.fail, self.closed = iter(items), fail, False

        def __iter__(self) -> Chunks:
            return self

        def __next__(self) -> dict:
            item = next(self.items, None)
            if item is None:
                raise ValueError("bad token") if self.fail else StopIteration
            return item

        def close(self) -> None:
            self.closed = True

    def parse(events: list[str]) -> list:
        assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
        return [e[6:-2] if e == "data: [DONE]\n\n" else json.loads(e[6:-2]) for e in events]

    chat = Chunks([{"choices": [{"delta": {"content": p}, "finish_reason": f}]} for p, f in
                   (("Hello", None), (None, None), (" there", "length"))])  # fmt: skip
    out = parse(list(_chat_events(chat, "c1", 7, "m", FakeModel(), 3, True)))
    assert chat.closed
    assert [o["choices"][0]["delta"] for o in out[:4]] == [
        {"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": " there"}, {}
    ]  # fmt: skip
    assert {o["object"] for o in out[:-1]} == {"chat.completion.chunk"}
    assert out[3]["choices"][0]["finish_reason"] == "length"
    assert out[4]["choices"] == [] and out[4]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5
    }  # fmt: skip
    assert out[-1] == "[DONE]"

    comp = Chunks([{"choices": [{"text": "a b", "finish_reason": None}]}], fail=True)
    out = parse(list(_completion_events(comp, "c2", 7, "m", FakeModel(), 3, False)))
    assert comp.closed
    assert out[0]["object"] == "text_completion" and out[0]["choices"][0]["text"] == "a b"
    assert out[1]["error"]["message"] == "bad token" and out[1]["error"]["type"] == "invalid_request_error"
    assert out[-1] == "[DONE]" and len(out) == 3
    ok = Chunks([{"choices": [{"text": "x", "finish_reason": "stop"}]}])
    out = parse(list(_completion_events(ok, "c3", 7, "m", FakeModel(), 3, False)))
    assert ok.closed
    assert [o["choices"][0]["text"] for o in out[:-1]] == ["x", ""]
    assert out[1]["choices"][0]["finish_reason"] == "stop" and out[-1] == "[DONE]"
