"""`imatrix`: activations from llama.cpp's own graph on the user's data, in llama.cpp's GGUF format."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError
from gguf_factory.imatrix import compute_imatrix
from gguf_factory.quantize import load_imatrix, quantize

TEXT = "Hello there! How are you today? I like pizza and pasta. Tell me a joke about robots, please."


@pytest.fixture(scope="module")
def chat_imatrix(tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf"
    return compute_imatrix(tiny_f16_gguf, tiny_data_dir, out, ctx=128, threads=2)


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_one_entry_per_matmul_weight(chat_imatrix, tiny_f16_gguf: Path) -> None:
    r = chat_imatrix
    assert r.path.is_file() and r.chunks >= 2 and r.tokens > 200
    reader = gguf.GGUFReader(r.path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_size"].contents() == 128
    assert reader.fields["imatrix.chunk_count"].contents() == r.chunks
    assert reader.fields["imatrix.datasets"].contents() == ["train.jsonl"]
    assert "general.architecture" not in reader.fields

    model = _tensors(tiny_f16_gguf)
    weights = {n for n, t in model.items() if n.startswith("blk.") and len(t.shape) == 2}
    assert weights == {f"blk.{i}.{w}.weight" for i in range(2) for w in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    stored = _tensors(r.path)
    assert set(stored) == {f"{w}.in_sum2" for w in weights} | {f"{w}.counts" for w in weights}

    data = load_imatrix(r.path)
    assert set(data) == weights == set(r.names)
    for name in weights:
        width = int(model[name].shape[0])  # ne0: the input width of the matmul
        v = data[name]
        assert v.shape == (width,), name
        assert np.all(np.isfinite(v)) and np.all(v >= 0) and v.max() > 0, name
        # every position is an output, so every weight sees every token (the last block included)
        assert float(np.asarray(stored[f"{name}.counts"].data).reshape(-1)[0]) == r.tokens, name
    # q, k and v read the same normed input
    np.testing.assert_array_equal(data["blk.1.attn_q.weight"], data["blk.1.attn_v.weight"])
    assert data["blk.0.ffn_down.weight"].shape == (int(model["blk.0.ffn_up.weight"].shape[1]),)


def test_first_block_input_matches_numpy(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    """blk.0.attn_q's importance is the mean square of RMSNorm(embedding) * attn_norm, computed here."""
    import llama_cpp

    txt = tmp_path / "sample.txt"
    txt.write_text(TEXT, encoding="utf-8")
    r = compute_imatrix(tiny_f16_gguf, txt, tmp_path / "t.imatrix.gguf", ctx=256, threads=2)
    assert r.chunks == 1

    llm = llama_cpp.Llama(str(tiny_f16_gguf), vocab_only=True, verbose=False)
    ids = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
    bos = llm.token_bos()
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    toks = ([bos] if add_bos and bos >= 0 else []) + list(ids)
    assert r.tokens == len(toks)

    reader = gguf.GGUFReader(tiny_f16_gguf)
    t = {x.name: x for x in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    eps = float(reader.fields[f"{arch}.attention.layer_norm_rms_epsilon"].contents())
    emb = np.asarray(t["token_embd.weight"].data, dtype=np.float32)
    g = np.asarray(t["blk.0.attn_norm.weight"].data, dtype=np.float32).reshape(-1)
    x = emb[toks]
    y = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * g
    expected = (y * y).mean(axis=0)
    got = load_imatrix(r.path)["blk.0.attn_q.weight"]
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-6)


def test_quantize_uses_it(chat_imatrix, tiny_f16_gguf: Path, tmp_path: Path) -> None:
    plain = quantize(tiny_f16_gguf, tmp_path / "plain.gguf", "Q4_K_M", threads=2)
    with_im = quantize(tiny_f16_gguf, tmp_path / "im.gguf", "Q4_K_M", threads=2, imatrix=chat_imatrix.path)
    assert with_im.imatrix_entries == chat_imatrix.entries
    a, b = _tensors(plain.path), _tensors(with_im.path)
    changed = [
        n
        for n in a
        if n.startswith("blk.") and not np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))
    ]
    assert any(".attn_q." in n for n in changed) and any(".ffn_" in n for n in changed), changed
    iq = quantize(tiny_f16_gguf, tmp_path / "iq.gguf", "IQ4_XS", threads=2, imatrix=chat_imatrix.path)
    assert iq.path.is_file() and iq.imatrix_entries == chat_imatrix.entries


def test_cli_and_bad_inputs(tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.imatrix.gguf"
    proc = run_cli(
        "imatrix", tiny_f16_gguf, "--data", tiny_data_dir, "-o", out, "--ctx", "64", "--threads", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "14 weights" in proc.stdout
    assert len(load_imatrix(out)) == 14

    bad = tmp_path / "bad.imatrix.gguf"
    assert_one_line_error(run_cli("imatrix", tiny_f16_gguf, "--data", tmp_path / "nope", "-o", bad), "nope")
    assert_one_line_error(
        run_cli("imatrix", tiny_data_dir / "train.jsonl", "--data", tiny_data_dir, "-o", bad)
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("imatrix", tiny_f16_gguf, "--data", empty, "-o", bad), "train.jsonl")
    small = compute_imatrix(tiny_f16_gguf, tiny_data_dir, tmp_path / "small.gguf", max_tokens=50, ctx=32)
    assert small.chunks == 2 and small.tokens in (50, 52)  # 50 data tokens, plus BOS per chunk if used
    with pytest.raises(InputError):
        compute_imatrix(tiny_f16_gguf, tiny_data_dir, bad, ctx=2)
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))
