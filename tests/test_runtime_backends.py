"""One ChatModel interface, two engines: the tiny model in transformers, its exact F32 GGUF in llama.cpp."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gguf_factory.errors import InputError, ModelError
from gguf_factory.runtime import ChatModel, load

PROMPTS = ["hi, how are you?", "What is your favourite food?", "Tell me a joke", "Do you like pizza?"]
TEXTS = [
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi, how are you?<|im_end|>\n",
    "what do you like to eat for breakfast",
]


@pytest.fixture(scope="module")
def hf(tiny_hf_model: Path) -> Iterator[ChatModel]:
    with load(tiny_hf_model, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def gg(tiny_f32_gguf: Path) -> Iterator[ChatModel]:
    with load(tiny_f32_gguf, threads=1) as m:
        yield m


@pytest.mark.slow
def test_backend_is_picked_from_the_path(hf: ChatModel, gg: ChatModel) -> None:
    assert (hf.backend, gg.backend) == ("transformers", "llama.cpp")
    assert isinstance(hf, ChatModel) and isinstance(gg, ChatModel)
    assert hf.chat_template == gg.chat_template and "<|im_start|>" in (hf.chat_template or "")
    assert hf.tokenize("hello world") == gg.tokenize("hello world")
    assert hf.detokenize(hf.tokenize("hello world")) == "hello world"
    # special tokens are parsed only when asked, as llama.cpp does
    assert hf.tokenize("<|im_start|>", special=True) == gg.tokenize("<|im_start|>", special=True) == [1]
    assert len(hf.tokenize("<|im_start|>")) > 1
    eog = [t for t in range(512) if hf.is_end_of_generation(t)]
    assert eog and eog == [t for t in range(512) if gg.is_end_of_generation(t)]


@pytest.mark.slow
@pytest.mark.parametrize("repeat_penalty", [1.1, 1.0])
def test_same_greedy_replies_in_both_engines(hf: ChatModel, gg: ChatModel, repeat_penalty: float) -> None:
    total = 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = hf.prompt_ids(messages)
        assert ids == gg.prompt_ids(messages)
        a = hf.chat(messages, max_tokens=24, repeat_penalty=repeat_penalty)
        b = gg.chat(messages, max_tokens=24, repeat_penalty=repeat_penalty)
        assert a == b, (prompt, a, b)
        ta = list(hf.generate_tokens(ids, max_tokens=24, repeat_penalty=repeat_penalty))
        tb = list(gg.generate_tokens(ids, max_tokens=24, repeat_penalty=repeat_penalty))
        assert ta == tb, prompt
        assert hf.detokenize(ta).strip() == a
        # raw continuation without the template: longer outputs, the penalty window matters
        ra = hf.generate(prompt, max_tokens=20, repeat_penalty=repeat_penalty)
        rb = gg.generate(prompt, max_tokens=20, repeat_penalty=repeat_penalty)
        assert ra == rb, (prompt, ra, rb)
        total += len(ta) + len(hf.tokenize(ra))
    assert total > 20  # the comparison covered real generated tokens, not empty replies


@pytest.mark.slow
def test_logits_agree(hf: ChatModel, gg: ChatModel) -> None:
    for text in TEXTS:
        a, b = hf.logits(text), gg.logits(text)
        n = len(hf.tokenize(text, special=True))
        assert a.shape == b.shape == (n, 512) and a.dtype == b.dtype == np.float32
        assert (a.argmax(axis=1) == b.argmax(axis=1)).all()
        assert np.abs(a - b).max() < 1e-3
    ids = gg.tokenize(TEXTS[1])
    np.testing.assert_array_equal(gg.logits(ids), gg.logits(TEXTS[1]))
    # the logits are the ones generation uses: greedy's first token is the argmax after the prompt
    prompt = hf.prompt_ids([{"role": "user", "content": PROMPTS[1]}])
    first = int(gg.logits(prompt)[-1].argmax())
    got = next(iter(gg.generate_tokens(prompt, max_tokens=1, repeat_penalty=1.0)), None)
    assert got == first or (got is None and gg.is_end_of_generation(first))
    # logits() leaves llama.cpp's state usable for chat
    assert gg.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=8) == hf.chat(
        [{"role": "user", "content": PROMPTS[0]}], max_tokens=8
    )


@pytest.mark.slow
def test_streaming_joins_to_the_reply(hf: ChatModel) -> None:
    for prompt in PROMPTS[:2]:
        messages = [{"role": "user", "content": prompt}]
        whole = hf.chat(messages, max_tokens=16)
        pieces = hf.chat(messages, max_tokens=16, stream=True)
        assert not isinstance(pieces, str)
        assert "".join(pieces).strip() == whole
    text = hf.generate("hello", max_tokens=12)
    assert text and "".join(hf.generate("hello", max_tokens=12, stream=True)) == text
    # a consumer that stops early ends the background generation
    it = hf.generate_tokens(hf.tokenize("hello"), max_tokens=50, repeat_penalty=1.0)
    assert isinstance(next(it), int)
    it.close()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_sampling_is_seeded(hf: ChatModel) -> None:
    messages = [{"role": "user", "content": PROMPTS[0]}]
    a = hf.chat(messages, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=12, seed=3)
    b = hf.chat(messages, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=12, seed=3)
    assert a == b
    others = {hf.chat(messages, temperature=1.5, top_k=0, max_tokens=12, seed=s) for s in range(4, 9)}
    assert len(others | {a}) > 1  # hot sampling does change the reply


@pytest.mark.slow
def test_errors(
    hf: ChatModel, gg: ChatModel, tiny_hf_model: Path, tiny_f32_gguf: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="backend 'transformers'"):
        load(tiny_hf_model, backend="llama.cpp")
    with pytest.raises(InputError, match="GGUF file.*llama.cpp"):
        load(tiny_f32_gguf, backend="transformers")
    with pytest.raises(InputError, match="unknown backend 'onnx'"):
        load(tiny_f32_gguf, backend="onnx")
    with pytest.raises(InputError, match="not found"):
        load(tmp_path / "nope")
    with pytest.raises(InputError, match="n_gpu_layers"):
        load(tiny_hf_model, n_gpu_layers=10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load(empty)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_hf_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        load(pickled)
    for m in (hf, gg):
        with pytest.raises(InputError, match="role"):
            m.chat([{"role": "robot", "content": "x"}])
        with pytest.raises(InputError):
            m.chat([])
        with pytest.raises(InputError, match="no tokens"):
            m.logits("")
        with pytest.raises(InputError, match="context"):
            m.logits([5] * (m.n_ctx + 1))
        with pytest.raises(InputError, match="token ids"):
            m.logits([100000])
    with pytest.raises(InputError, match="context"):
        hf.chat([{"role": "user", "content": "hello " * 200}])


def test_each_request_frees_the_previous_sampler(gg: ChatModel) -> None:
    """llama-cpp-python's samplers sit in reference cycles: without the runtime's sampler subclass each
    generation left one behind, with its n_vocab-long native buffer, until the cyclic collector ran
    (+0.57 MB RSS per request on SmolLM2). With the collector off, at most one stays alive."""
    import gc

    from llama_cpp._internals import LlamaSampler

    def live() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is LlamaSampler and o.sampler is not None)

    gc.collect()
    gc.disable()
    try:
        ids = gg.prompt_ids([{"role": "user", "content": "hello"}])
        for _ in range(5):
            assert list(gg.generate_tokens(ids, max_tokens=3, temperature=0.0))
            assert isinstance(gg.chat([{"role": "user", "content": "hi"}], max_tokens=3), str)
            pieces = list(gg.chat([{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
            assert pieces and all(isinstance(p, str) for p in pieces)
        assert live() <= 1, live()
    finally:
        gc.enable()
