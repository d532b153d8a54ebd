"""`serve`: ``/v1/embeddings`` (llama.cpp's embedding mode, mean pooling, on the pool's own model) and the
llama.cpp options (``--parallel``, ``--max-queue``, ``--cache-type-k/-v``, ``--gpu-layers``...), on real
GGUFs through real HTTP and the official `openai` client."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import llama_cpp
import numpy as np
import openai
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError
from gguf_factory.runtime import load
from gguf_factory.serve import LoadOptions, ModelPool, PoolBusyError, create_app
from gguf_factory.serve.pool import kv_cache_bytes, resolve_n_ctx
from serve_helpers import assert_error, client_of, pool_of, running, serving

KEY = "emb-key"
TEXTS = ["hello there", "what is your favorite food?", "tell me a joke"]
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def pool(tiny_f16_gguf: Path) -> Iterator[ModelPool]:
    with pool_of({"tiny": tiny_f16_gguf}) as p:
        yield p


@pytest.fixture(scope="module")
def url(pool: ModelPool) -> Iterator[str]:
    with serving(pool, api_key=KEY, max_tokens_limit=32) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return client_of(url, KEY)


@pytest.fixture(scope="module")
def reference(tiny_f16_gguf: Path) -> Iterator[llama_cpp.Llama]:
    """llama.cpp's own embedding model: a separate instance made with embedding=True, mean pooling."""
    llm = llama_cpp.Llama(
        str(tiny_f16_gguf),
        n_ctx=resolve_n_ctx(tiny_f16_gguf),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )
    yield llm
    llm.close()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_embeddings_equal_llama_cpp_mean_pooling(
    client: openai.OpenAI, url: str, reference: llama_cpp.Llama
) -> None:
    want = np.array(reference.embed(TEXTS, normalize=True), dtype=np.float32)
    r = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "tiny"
    assert got.shape == (3, reference.n_embd())
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    n_tokens = sum(len(reference.tokenize(t.encode())) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens

    one = client.embeddings.create(model="tiny", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-5)  # alone = in a batch
    raw = httpx.post(
        f"{url}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}, headers=auth()
    )
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want[0], atol=1e-5)
    ids = reference.tokenize(TEXTS[2].encode())
    by_ids = client.embeddings.create(model="tiny", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[2], atol=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids)
    sims = got @ got.T
    assert np.allclose(np.diag(sims), 1.0, atol=1e-5) and (sims[~np.eye(3, dtype=bool)] < 1 - 1e-4).all()


def test_generation_unchanged_after_embeddings(client: openai.OpenAI, tiny_f16_gguf: Path) -> None:
    """The model is loaded with mean pooling and switched into embedding mode and back: replies are the
    same as a model loaded the plain way."""
    with load(tiny_f16_gguf) as plain:
        want = plain.chat(MESSAGES, max_tokens=16)
    client.embeddings.create(model="tiny", input=TEXTS)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    assert got.choices[0].message.content.strip() == want
    client.embeddings.create(model="tiny", input="one more")
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == got.choices[0].message.content


def test_embedding_errors(url: str, pool: ModelPool) -> None:
    post = lambda body, **kw: httpx.post(f"{url}/v1/embeddings", json=body, **kw)  # noqa: E731
    assert_error(post({"input": "hi"}), 401, code="invalid_api_key")
    assert_error(post({"input": "hi", "model": "nope"}, headers=auth()), 404, code="model_not_found")
    assert assert_error(post({"input": []}, headers=auth()), 400, says="empty")["param"] == "input"
    assert_error(post({"input": ["ok", ""]}, headers=auth()), 400, says="input 1 is empty")
    assert_error(post({}, headers=auth()), 400, says="input")
    too_long = post({"input": "hello " * 2000}, headers=auth())
    assert_error(too_long, 400, code="context_length_exceeded", says="per embedding input")
    assert_error(post({"input": [[1, 2, 10**6]]}, headers=auth()), 400, says="token ids must be in")
    err = assert_error(post({"input": "hi", "dimensions": 7}, headers=auth()), 400, says="not 7")
    assert err["param"] == "dimensions"
    bad_format = post({"input": "hi", "encoding_format": "int8"}, headers=auth())
    assert_error(bad_format, 400, says="encoding_format")
    assert_error(post({"input": ["x"] * 2049}, headers=auth()), 400, says="at most 2048")
    assert not pool.status()[0]["busy"]


def test_embedding_input_limit_follows_the_prompt_limit(tiny_f16_gguf: Path) -> None:
    pool = ModelPool({"m": tiny_f16_gguf})
    try:
        with running(create_app(pool, max_prompt_tokens=3)) as u:
            ok = httpx.post(f"{u}/v1/embeddings", json={"input": [[5, 6, 7]]})
            assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3
            r = httpx.post(f"{u}/v1/embeddings", json={"input": [[5, 6, 7, 8]]})
            assert_error(r, 400, code="context_length_exceeded", says="limit of 3 tokens")
    finally:
        pool.close()


# --- options ---------------------------------------------------------------------------------------
def test_parallel_instances_serve_requests_at_once(tiny_f16_gguf: Path) -> None:
    pool = ModelPool({"m": tiny_f16_gguf}, options=LoadOptions(parallel=2), queue_timeout=0.3)
    one = ModelPool({"m": tiny_f16_gguf})
    try:
        kv = kv_cache_bytes(tiny_f16_gguf, pool.n_ctx("m"))
        kv += pool.options.prompt_cache_bytes  # each instance has its prompt cache too
        assert pool.cost("m") == one.cost("m") + kv, "one file, two KV caches"
        a = pool.acquire("m")
        b = pool.acquire("m")  # the second instance: no wait
        assert a.model is not b.model
        assert pool.status()[0]["instances"] == 2 and pool.status()[0]["in_use"] == 2
        with pytest.raises(PoolBusyError, match="busy"):
            pool.acquire("m")
        with running(create_app(pool)) as u:
            body = {"messages": MESSAGES, "max_tokens": 4}
            got: list[int] = []
            t = threading.Thread(
                target=lambda: got.append(httpx.post(f"{u}/v1/chat/completions", json=body).status_code)
            )
            pool.queue_timeout = 20
            t.start()
            time.sleep(0.3)
            assert not got, "both instances are held: the request waits"
            a.release()
            t.join(20)
            assert got == [200]
            b.release()
            replies = []

            def ask() -> None:
                r = httpx.post(f"{u}/v1/chat/completions", json=body, timeout=30)
                replies.append(r.json()["choices"][0]["message"]["content"])

            threads = [threading.Thread(target=ask) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(replies) == 4 and len(set(replies)) == 1, "greedy replies agree on every instance"
        assert pool.status()[0]["loads"] == 1
    finally:
        pool.close()
        one.close()


def test_max_queue_answers_503_at_once(tiny_f16_gguf: Path) -> None:
    pool = ModelPool({"m": tiny_f16_gguf}, queue_timeout=30)
    try:
        with running(create_app(pool, max_queue=1)) as u:
            lease = pool.acquire("m")
            body = {"messages": MESSAGES, "max_tokens": 4}
            waiting: list[int] = []
            t = threading.Thread(
                target=lambda: waiting.append(
                    httpx.post(f"{u}/v1/chat/completions", json=body, timeout=30).status_code
                )
            )
            t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            r = httpx.post(f"{u}/v1/chat/completions", json=body)
            assert_error(r, 503, code="queue_full", says="already wait")
            assert time.monotonic() - t0 < 5
            lease.release()
            t.join(30)
            assert waiting == [200]
    finally:
        pool.close()


def test_quantized_kv_cache(tiny_f16_gguf: Path) -> None:
    """q8_0 K and V (flash attention on) on a real pretrained model whose heads fit llama.cpp's blocks; the
    tiny model's 16-value heads are refused in one line before anything loads."""
    from gguf_factory.bases import named_base

    smol = named_base("smollm2-135m-instruct").gguf_path()
    f16 = ModelPool({"s": smol}, n_ctx=512)
    q8 = ModelPool({"s": smol}, n_ctx=512, options=LoadOptions(type_k="q8_0", type_v="q8_0"))
    try:
        kv16 = kv_cache_bytes(smol, 512)
        assert kv_cache_bytes(smol, 512, "q8_0", "q8_0") == pytest.approx(kv16 * 34 / 64, rel=1e-6)
        assert q8.cost("s") < f16.cost("s")
        with running(create_app(q8)) as u:
            c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0, timeout=120)
            q = [{"role": "user", "content": "What is the capital of France?"}]
            r = c.chat.completions.create(model="s", messages=q, max_tokens=12, temperature=0)
            assert r.choices[0].message.content.strip()
            m = q8.acquire("s")
            try:
                assert m.model.llm.context_params.type_k == llama_cpp.GGML_TYPE_Q8_0
                assert m.model.llm.context_params.type_v == llama_cpp.GGML_TYPE_Q8_0
            finally:
                m.release()
    finally:
        f16.close()
        q8.close()
    with pytest.raises(InputError, match="blocks of 32"):
        ModelPool({"t": tiny_f16_gguf}, options=LoadOptions(type_k="q4_0"))
    with pytest.raises(InputError, match="unknown KV cache type"):
        LoadOptions(type_v="q9_9")
    with pytest.raises(InputError, match="parallel"):
        LoadOptions(parallel=0)


def test_cli_serve_options(tiny_f16_gguf: Path) -> None:
    help_text = run_cli("serve", "--help").stdout
    for option in ("--ctx", "--threads", "--gpu-layers", "--cache-type-k", "--cache-type-v", "--parallel",
                   "--max-queue", "--queue-timeout", "--batch-size"):  # fmt: skip
        assert option in help_text, option
    assert_one_line_error(run_cli("serve", tiny_f16_gguf, "--cache-type-k", "q9"), "unknown KV cache type")
    assert_one_line_error(run_cli("serve", tiny_f16_gguf, "--cache-type-v", "q8_0"), "blocks of 32")
    assert_one_line_error(run_cli("serve", tiny_f16_gguf, "--parallel", "0"), "parallel")
