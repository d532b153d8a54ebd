"""The prompt cache: a request sharing a prefix with an earlier one (the next turn of a conversation, the
same system prompt) evaluates only what follows it, even after other conversations ran in between; the
replies are those of a server without the cache. Real llama.cpp, the tiny chat model."""

from __future__ import annotations

from pathlib import Path

import openai

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError
from gguf_factory.serve import LoadOptions, ModelPool, create_app
from serve_helpers import running

SYS_A = "You are a friendly bot who likes food and tells jokes about it."
SYS_B = "You answer in one short sentence and never ask questions back."
N = 8


def converse(pool: ModelPool, url: str) -> tuple[list[str], list[int]]:
    """Two interleaved conversations and a third one sharing A's system prompt: each reply, and the
    tokens llama.cpp evaluated for each request."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    a = [{"role": "system", "content": SYS_A}, {"role": "user", "content": "Hello there"}]
    b = [{"role": "system", "content": SYS_B}, {"role": "user", "content": "What is your favorite food?"}]
    replies: list[str] = []
    evaluated: list[int] = []

    def ask(messages: list[dict[str, str]]) -> str:
        with pool.use("m") as m:
            m.evaluated_tokens(reset=True)  # type: ignore[attr-defined]
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=N, temperature=0)
        with pool.use("m") as m:
            evaluated.append(m.evaluated_tokens(reset=True))  # type: ignore[attr-defined]
        reply = r.choices[0].message.content or ""
        replies.append(reply)
        return reply

    for turn in ("Tell me a joke", "Do you like pizza?", "Goodbye"):
        a += [{"role": "assistant", "content": ask(a)}, {"role": "user", "content": turn}]
        b += [{"role": "assistant", "content": ask(b)}, {"role": "user", "content": turn}]
    ask(a)
    ask(b)  # then a new conversation with A's system prompt, B's in llama.cpp's context
    ask([{"role": "system", "content": SYS_A}, {"role": "user", "content": "What do you eat?"}])
    return replies, evaluated


def test_prompt_cache_shortens_later_turns_and_changes_no_reply(tiny_f16_gguf: Path) -> None:
    cached = ModelPool({"m": tiny_f16_gguf}, n_threads=2)
    plain = ModelPool({"m": tiny_f16_gguf}, n_threads=2, options=LoadOptions(prompt_cache_bytes=0))
    try:
        with running(create_app(plain)) as url:
            want, full = converse(plain, url)
        with running(create_app(cached)) as url:
            got, short = converse(cached, url)
        assert got == want  # the cache changes what is evaluated, never what is answered
        # without the cache each request evaluates its whole prompt (the other conversation ran in
        # between: llama-cpp-python's own reuse of the last prompt does not help); with it, only the rest
        assert all(f > N for f in full)
        later = range(2, len(full))  # from A's second turn on, every request has a cached prefix
        assert all(short[i] < full[i] for i in later), (short, full)
        assert sum(short[i] for i in later) < 0.6 * sum(full[i] for i in later), (short, full)
        with cached.use("m") as m:
            cache = m.prompt_cache  # type: ignore[attr-defined]
            assert cache is not None and cache.hits >= len(later) and 0 < cache.cache_size
            assert cache.cache_size <= cache.capacity_bytes == cached.options.prompt_cache_bytes
        with plain.use("m") as m:
            assert m.prompt_cache is None  # type: ignore[attr-defined]
    finally:
        cached.close()
        plain.close()


def test_prompt_cache_stays_within_its_bytes(tiny_f16_gguf: Path) -> None:
    from gguf_factory.runtime import load

    with load(tiny_f16_gguf, n_threads=2, prompt_cache_bytes=1 << 30) as m:
        m.chat([{"role": "user", "content": "Hello there"}], max_tokens=N, temperature=0.0)
        cache = m.prompt_cache  # type: ignore[attr-defined]
        one = cache.cache_size
        assert len(cache.cache_state) == 1 and one > 0
        m.set_prompt_cache(int(one * 1.5))  # room for one such state, not two  # type: ignore[attr-defined]
        cache = m.prompt_cache  # type: ignore[attr-defined]
        for text in ("Hello there", "What is your favorite food?", "Tell me a joke"):
            m.chat([{"role": "user", "content": text}], max_tokens=N, temperature=0.0)
            assert cache.cache_size <= cache.capacity_bytes and len(cache.cache_state) == 1
        ((_, key),) = cache.cache_state
        assert list(key) in cache
        cache.namespace = (("some-adapter.gguf", 1.0),)  # another adapter set sees none of these states
        assert list(key) not in cache


def test_prompt_cache_option_refusals(tiny_f16_gguf: Path) -> None:
    import pytest

    with pytest.raises(InputError, match="prompt cache"):
        LoadOptions(prompt_cache_bytes=-1)
    assert_one_line_error(
        run_cli("serve", str(tiny_f16_gguf), "--prompt-cache-mb", "-5"), "--prompt-cache-mb"
    )
