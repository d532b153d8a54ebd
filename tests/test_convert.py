"""convert: HF Llama folder -> GGUF, checked against transformers with the real llama.cpp (no mocks).

The models are tiny random-weight Llamas with a byte-level BPE tokenizer trained here. Their init is
scaled up (initializer_range 0.2) so that the argmax margins are large and greedy parity is meaningful.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from gguf_factory.convert import convert
from gguf_factory.errors import ConversionError, InputError, ModelError
from gguf_factory.train.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    save_hf_tokenizer,
    train_bpe_tokenizer,
)

CORPUS = [
    "Hello there! How are you today?",
    "I don't know, maybe it's 42 or 1234; they're sure we'll see.",
    "Good   morning,\n\nmy friend. What's up?",
    "Café, naïve façade, jalapeño, Zürich.",
    "Emoji time 😀 👍 🎉 ok",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 3.14159 and 2,718 and 100% (maybe) are fine.",
    "You'll be fine, I'm sure; he'd agree and we've seen it.",
]

PARITY_TEXTS = [
    "Hello, world!",
    "I don't know; it's 3:45pm.",
    "Numbers: 1234567890 and 3.14159 and 007",
    "multiple   spaces    here",
    "line1\nline2\n\n\nline3\n",
    "tabs\tand\ttabs",
    " leading space",
    "trailing space ",
    "Café naïve façade — «quoted» Zürich",
    "日本語のテキスト",
    "emoji 😀🎉👍🏽 done",
    "you'll we've they're I'm he'd DON'T",
    "mixed123abc!?#@$%^&*()",
    "<b>html</b> & &amp; {json: [1, 2]}",
    "",
]

CHAT_PROMPTS: list[Any] = [
    [{"role": "user", "content": "Hello there! How are you today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2 + 2?"}],
    "The quick brown fox",
    "I don't know",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_bpe_tokenizer(CORPUS * 10, vocab_size=400, min_frequency=2)
    out = tmp_path_factory.mktemp("tokenizer")
    save_hf_tokenizer(tok, out, model_max_length=256)
    return out


def make_model(
    out: Path,
    tokenizer_dir: Path,
    *,
    tie: bool = False,
    arch: str = "llama",
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a tiny random-weight model (GQA: 4 heads, 2 KV heads) with the test tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (MistralConfig, MistralForCausalLM)
    )
    config = cfg_cls(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=tok.token_to_id(IM_END),
        pad_token_id=tok.token_to_id(ENDOFTEXT),
        tie_word_embeddings=tie,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_model(tmp_path_factory.mktemp("llama") / "tiny-llama", tokenizer_dir)


@pytest.fixture(scope="module")
def llama_f32(llama_dir: Path) -> Path:
    out = llama_dir.parent / "tiny-llama-F32.gguf"
    r = convert(llama_dir, out, outtype="f32", name="tiny-llama")
    assert r.path == out and out.is_file()
    return out


def read_fields(path: Path) -> tuple[dict[str, Any], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def llama_generate(path: Path, prompt: str, n: int = 8) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1):
            out.append(tok)
            if len(out) >= n:
                break
        return out
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------------
# F32: metadata, tokenizer parity, greedy parity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_f32_metadata(llama_f32: Path, llama_dir: Path) -> None:
    from tokenizers import Tokenizer

    fields, tensors = read_fields(llama_f32)
    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "tiny-llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["general.size_label"].endswith("K")
    assert fields["gguf_factory.version"]
    assert fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.context_length"] == 256
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert fields["tokenizer.ggml.eos_token_id"] == tok.token_to_id(IM_END)
    assert fields["tokenizer.ggml.padding_token_id"] == tok.token_to_id(ENDOFTEXT)
    assert "tokenizer.ggml.bos_token_id" not in fields
    assert fields["tokenizer.ggml.add_bos_token"] is False
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.get_vocab_size()
    for special in (ENDOFTEXT, IM_START, IM_END):
        assert types[tok.token_to_id(special)] == gguf.TokenType.CONTROL
    assert types[tok.token_to_id("e")] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"]) > 0
    # untied: an output tensor; 1-D norms are F32, Q/K shapes follow GQA
    assert "output.weight" in tensors
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 64]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]


@pytest.mark.slow
def test_tokenizer_parity(llama_f32: Path, llama_dir: Path) -> None:
    from gguf_factory.verify import check_tokenizer_parity

    parity = check_tokenizer_parity(llama_f32, llama_dir, PARITY_TEXTS)
    assert parity.n_texts == len(PARITY_TEXTS)
    assert parity.n_checks == 2 * len(PARITY_TEXTS)  # plain + chat-template rendering
    assert parity.ok, parity.mismatches


@pytest.mark.slow
def test_greedy_parity_f32(llama_f32: Path, llama_dir: Path) -> None:
    from gguf_factory.verify import check_greedy_parity

    parity = check_greedy_parity(llama_f32, llama_dir, CHAT_PROMPTS, max_new_tokens=16)
    assert parity.n_prompts == len(CHAT_PROMPTS)
    assert parity.ok, parity.mismatches
    assert any(len(g) > 4 for g in parity.generated)


@pytest.mark.slow
def test_qk_permutation_matters(llama_f32: Path, llama_dir: Path) -> None:
    """The GGUF's Q rows are HF's rows permuted (not equal): the parity above depends on it."""
    from safetensors import safe_open

    _, tensors = read_fields(llama_f32)
    with safe_open(str(llama_dir / "model.safetensors"), framework="np") as f:
        hf_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    ours = np.asarray(tensors["blk.0.attn_q.weight"].data)
    assert ours.shape == hf_q.shape
    assert not np.array_equal(ours, hf_q)
    assert sorted(map(tuple, ours.round(6))) == sorted(map(tuple, hf_q.round(6)))  # same rows, reordered


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_regex_pretokenizers(tmp_path: Path, pre: str) -> None:
    """Llama-3- and Qwen2-style tokenizer.json (Split regex + ByteLevel) with a non-special added token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from gguf_factory.convert.vocab import _SPLIT_REGEX_PRE  # the two single-regex forms
    from gguf_factory.train.tokenizer import SPECIAL_TOKENS
    from gguf_factory.verify import check_tokenizer_parity

    pattern = next(p for p, name in _SPLIT_REGEX_PRE.items() if name == pre)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    tok.model.ignore_merges = pre == "llama-bpe"  # as Llama 3 ships it (llama.cpp's llama-bpe ignores merges)
    tok.add_tokens([AddedToken("<custom>", special=False)])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    save_hf_tokenizer(tok, tok_dir, model_max_length=256)
    model_dir = make_model(tmp_path / "m", tok_dir)
    out = tmp_path / "m.gguf"
    convert(model_dir, out, outtype="f32")
    fields, _ = read_fields(out)
    assert fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.token_type"][tok.token_to_id("<custom>")] == gguf.TokenType.USER_DEFINED
    parity = check_tokenizer_parity(out, model_dir, [*PARITY_TEXTS, "a <custom> b", "x<custom>y"])
    assert parity.ok, parity.mismatches


# ---------------------------------------------------------------------------------------------------
# Other outtypes, tied embeddings, sharded and .bin inputs, other configs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("outtype", "qtype", "ftype"),
    [
        ("f16", gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        ("bf16", gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    ],
    ids=["f16", "bf16", "q8_0"],
)
def test_outtypes_load_and_generate(
    llama_dir: Path, llama_f32: Path, outtype: str, qtype: Any, ftype: Any
) -> None:
    out = llama_dir.parent / f"tiny-llama-{outtype.upper()}.gguf"
    r = convert(llama_dir, out, outtype=outtype)
    assert r.outtype == outtype and r.arch == "llama" and r.size_bytes == out.stat().st_size
    assert r.size_bytes < llama_f32.stat().st_size
    fields, tensors = read_fields(out)
    assert fields["general.file_type"] == ftype
    assert tensors["blk.0.attn_q.weight"].tensor_type == qtype
    assert tensors["token_embd.weight"].tensor_type == qtype
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    prompt = "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"
    got = llama_generate(out, prompt)
    assert len(got) == 8
    # near-lossless types on a large-margin model: the first greedy token matches F32
    assert got[0] == llama_generate(llama_f32, prompt, n=1)[0]


@pytest.mark.slow
def test_tied_embeddings(tmp_path: Path, tokenizer_dir: Path) -> None:
    from gguf_factory.verify import check_greedy_parity

    model_dir = make_model(tmp_path / "tied", tokenizer_dir, tie=True, seed=1)
    out = tmp_path / "tied-F32.gguf"
    r = convert(model_dir, out, outtype="f32")
    _, tensors = read_fields(out)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert r.n_tensors == len(tensors)
    assert check_greedy_parity(out, model_dir, CHAT_PROMPTS[:2], max_new_tokens=12).ok


@pytest.mark.slow
def test_sharded_safetensors_and_torch_bin(
    tmp_path: Path, tokenizer_dir: Path, llama_dir: Path, llama_f32: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    sharded = make_model(tmp_path / "sharded", tokenizer_dir, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1

    as_bin = tmp_path / "bin"
    shutil.copytree(llama_dir, as_bin)
    state = load_file(str(as_bin / "model.safetensors"))
    (as_bin / "model.safetensors").unlink()
    torch.save(state, as_bin / "pytorch_model.bin")

    _, ref = read_fields(llama_f32)
    for src in (sharded, as_bin):
        out = tmp_path / f"{src.name}.gguf"
        convert(src, out, outtype="f32")
        _, tensors = read_fields(out)
        assert set(tensors) == set(ref)
        for name, t in tensors.items():
            assert np.array_equal(np.asarray(t.data), np.asarray(ref[name].data)), (src.name, name)


@pytest.mark.slow
def test_half_precision_sources(tmp_path: Path, llama_dir: Path, llama_f32: Path) -> None:
    """f16 and bf16 safetensors sources: the F32 GGUF holds exactly the half-precision values, widened."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(llama_dir / "model.safetensors"))
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        half = {k: v.to(dtype) for k, v in state.items()}
        widened = {k: v.to(torch.float32) for k, v in half.items()}
        outs = {}
        for kind, weights in (("half", half), ("widened", widened)):
            d = Path(shutil.copytree(llama_dir, tmp_path / f"{name}-{kind}"))
            save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
            outs[kind] = tmp_path / f"{name}-{kind}.gguf"
            convert(d, outs[kind], outtype="f32")
        _, got = read_fields(outs["half"])
        _, want = read_fields(outs["widened"])
        assert set(got) == set(want)
        for t in got:
            assert np.array_equal(np.asarray(got[t].data), np.asarray(want[t].data)), (name, t)
        # and the values really are half precision (the f32 reference differs)
        _, full = read_fields(llama_f32)
        q = "blk.0.attn_q.weight"
        assert not np.array_equal(np.asarray(got[q].data), np.asarray(full[q].data))


@pytest.mark.slow
def test_sharded_torch_bin_and_missing_shard(tmp_path: Path, llama_dir: Path, llama_f32: Path) -> None:
    """pytorch_model.bin.index.json with two .bin shards (weights_only loads), and a shard the index lists
    but the folder lacks: a clear error, nothing written."""
    import torch
    from safetensors.torch import load_file

    d = Path(shutil.copytree(llama_dir, tmp_path / "bin-sharded"))
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        fname = f"pytorch_model-0000{n}-of-00002.bin"
        torch.save({k: state[k] for k in part}, d / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "bin-sharded.gguf"
    convert(d, out, outtype="f32")
    _, tensors = read_fields(out)
    _, ref = read_fields(llama_f32)
    assert set(tensors) == set(ref)
    for name, t in tensors.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(ref[name].data)), name

    (d / "pytorch_model-00002-of-00002.bin").unlink()
    bad = tmp_path / "bad.gguf"
    with pytest.raises(ModelError, match=r"pytorch_model-00002-of-00002.bin"):
        convert(d, bad)
    assert not bad.exists() and not list(tmp_path.glob(".bad.gguf*"))


def test_chat_template_sources(tmp_path: Path, tokenizer_dir: Path) -> None:
    """chat_template.jinja wins over tokenizer_config.json's template; chat_template.json is the fallback."""
    from gguf_factory.convert.vocab import load_vocab

    d = Path(shutil.copytree(tokenizer_dir, tmp_path / "tok"))
    n = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"].__len__() + 8
    assert load_vocab(d, {}, n).chat_template == CHAT_TEMPLATE
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'json' }}"}))
    assert load_vocab(d, {}, n).chat_template == "{{ 'json' }}"
    (d / "chat_template.jinja").write_text("{{ 'jinja' }}")
    assert load_vocab(d, {}, n).chat_template == "{{ 'jinja' }}"


@pytest.mark.slow
def test_mistral_and_llama3_rope(tmp_path: Path, tokenizer_dir: Path) -> None:
    from gguf_factory.verify import check_greedy_parity

    mistral = make_model(tmp_path / "mistral", tokenizer_dir, arch="mistral", seed=2, sliding_window=None)
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    llama3 = make_model(tmp_path / "llama3", tokenizer_dir, seed=3, rope_parameters=rope)
    prompts = [*CHAT_PROMPTS[:2], " ".join(CORPUS)]  # the long one reaches past 64 positions
    for model_dir in (mistral, llama3):
        out = tmp_path / f"{model_dir.name}.gguf"
        convert(model_dir, out, outtype="f32")
        assert check_greedy_parity(out, model_dir, prompts, max_new_tokens=12).ok, model_dir.name
    _, tensors = read_fields(tmp_path / "llama3.gguf")
    assert "rope_freqs.weight" in tensors


# ---------------------------------------------------------------------------------------------------
# Errors: a message naming the file, and nothing left at the output path
# ---------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        convert(tmp_path / "nope", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        convert(tmp_path / "m", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ModelError, match="unsupported architecture FooForCausalLM.*LlamaForCausalLM"):
        convert(m, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_outtype(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="outtype"):
        convert(tmp_path, tmp_path / "out.gguf", outtype="q4_k")


def test_output_in_missing_folder(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "missing" / "out.gguf"
    with pytest.raises(InputError, match="output folder does not exist"):
        convert(m, out)
    assert not out.parent.exists()


@pytest.mark.slow
def test_missing_weights_tokenizer_and_unsafe_bin(tmp_path: Path, llama_dir: Path) -> None:
    m = tmp_path / "m"
    shutil.copytree(llama_dir, m)
    out = tmp_path / "out.gguf"

    (m / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json"):
        convert(m, out)
    (m / "tokenizer.model").write_bytes(b"\x00")  # read as protobuf (never unpickled): a clear error
    with pytest.raises(ModelError, match="tokenizer.model is not a SentencePiece model"):
        convert(m, out)
    assert not out.exists() and not list(tmp_path.glob(".out.gguf.*"))

    (m / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model weights"):
        convert(m, out)

    import torch

    torch.save({"x": Path("arbitrary-object")}, m / "pytorch_model.bin")  # not allowed by weights_only
    with pytest.raises(ConversionError, match="weights_only"):
        convert(m, out)
    assert not out.exists()


@pytest.mark.slow
def test_failure_mid_write_leaves_nothing(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor that fails to convert after the header is written: no file at the final path."""
    from gguf_factory.convert.archs.llama import LlamaConverter

    def boom(self: Any, gguf_name: str, hf_name: str, data: np.ndarray) -> np.ndarray:
        if gguf_name == "output.weight":
            raise ConversionError(f"cannot convert {hf_name}")
        return data

    monkeypatch.setattr(LlamaConverter, "modify_tensor", boom)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match="lm_head"):
        convert(llama_dir, out, outtype="f32")
    assert list(tmp_path.iterdir()) == []
