"""llama.cpp's quantizer and the runtime API on a real tiny model."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from generation_checks import assert_generates
from gguf_factory.errors import InputError, ModelError, QuantizeError
from gguf_factory.quantize import QUANT_TYPES, quantize
from gguf_factory.runtime import load

pytestmark = pytest.mark.slow


def file_type(path: Path) -> int:
    return int(gguf.GGUFReader(path).get_field("general.file_type").contents())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "Q4_0"])
def test_quantize_writes_a_smaller_loadable_gguf(tiny_f16_gguf: Path, tmp_path: Path, qtype: str) -> None:
    import llama_cpp

    out = tmp_path / f"m-{qtype}.gguf"
    r = quantize(tiny_f16_gguf, out, qtype)
    assert r.path == out and out.exists()
    assert r.size_bytes == out.stat().st_size < tiny_f16_gguf.stat().st_size
    assert file_type(out) == getattr(llama_cpp, QUANT_TYPES[qtype])
    # leftovers of the temp-then-rename dance must be gone
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    with load(out) as m:
        assert_generates(m, "hello", max_tokens=4)


def test_quantize_refuses_to_overwrite_its_input(tiny_f16_gguf: Path) -> None:
    with pytest.raises(InputError, match="overwrite"):
        quantize(tiny_f16_gguf, tiny_f16_gguf, "Q8_0")


def test_quantize_failure_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)  # right magic, garbage header
    with pytest.raises(QuantizeError, match="bad.gguf"):
        quantize(bad, tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_chat_stream_equals_non_stream(tiny_f16_gguf: Path) -> None:
    messages = [{"role": "user", "content": "hi, how are you?"}]
    with load(tiny_f16_gguf) as m:
        whole = m.chat(messages, max_tokens=12)
        pieces = list(m.chat(messages, max_tokens=12, stream=True))
    assert isinstance(whole, str) and whole
    assert "".join(pieces).strip() == whole


def test_generate_and_tokenize(tiny_f16_gguf: Path) -> None:
    with load(tiny_f16_gguf) as m:
        ids = m.tokenize("hello world")
        assert ids and m.detokenize(ids) == "hello world"
        assert len(m.tokenize("<|im_start|>", special=True)) == 1
        text = m.generate("hello", max_tokens=6)
        streamed = "".join(m.generate("hello", max_tokens=6, stream=True))
        assert text == streamed
        assert m.chat_template and "<|im_start|>" in m.chat_template
        assert m.n_ctx <= 2048


def test_chat_rejects_bad_messages(tiny_f16_gguf: Path) -> None:
    with load(tiny_f16_gguf) as m:
        with pytest.raises(InputError, match="role"):
            m.chat([{"role": "robot", "content": "x"}])
        with pytest.raises(InputError):
            m.chat([])


def test_load_rejects_non_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="x.gguf"):
        load(p)
