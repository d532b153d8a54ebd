"""convert for GPT-2, Qwen2, Phi-3, Gemma 2 and Gemma 3, verified through the real llama.cpp (no mocks).

Each architecture gets a tiny random-weight model built here from its transformers config and a tokenizer of
the family's kind trained offline with ``tokenizers`` on chatterbot-corpus English lines: byte-level BPE
(GPT-2 regex for GPT-2, Qwen2's split regex for Qwen2) or SentencePiece-style BPE with byte fallback
(Phi-3 with the "▁" prefix, Gemma without). The init is scaled up (initializer_range 0.2, weights
doubled: mean top-1 probability ~0.25-0.4 instead of ~0.07) so top-1 comparisons mean something. Every
model must give 0 tokenizer mismatches (English edge cases plus held-out lines in other chatterbot
languages), identical greedy continuations, and top-1 agreement >= 99.9 % (F32) / >= 99 % (F16) over all
prompt positions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import yaml

from gguf_factory.convert import convert
from gguf_factory.errors import ConversionError

SPM_SPACE = "\u2581"


# ---------------------------------------------------------------------------------------------------
# Text: chatterbot-corpus lines (English for training; other languages only for the parity checks)
# ---------------------------------------------------------------------------------------------------


def corpus_lines(language: str) -> list[str]:
    import chatterbot_corpus

    out: list[str] = []
    for f in sorted((Path(chatterbot_corpus.__file__).parent / "data" / language).glob("*.yml")):
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        for conv in (doc or {}).get("conversations") or []:
            out.extend(line.strip() for line in conv or [] if isinstance(line, str) and line.strip())
    return out


ENGLISH = corpus_lines("english")
TRAIN_TEXTS = ENGLISH[::8]  # ~550 lines
OTHER_LANGUAGES = ["spanish", "german", "russian", "chinese", "japanese", "korean", "hindi", "turkish"]
EDGE_TEXTS = [
    "Hello, world!",
    "I don't know; it's 3:45pm.",
    "Numbers: 1234567890 and 3.14159 and 007",
    "multiple   spaces    here",
    "line1\nline2\n\n\nline3\n",
    "tabs\tand\ttabs",
    " leading space",
    "trailing space ",
    "Café naïve façade — «quoted» Zürich",
    "emoji 😀🎉👍🏽 done",
    "you'll we've they're I'm he'd DON'T",
    "mixed123abc!?#@$%^&*()",
    "<b>html</b> & &amp; {json: [1, 2]}",
    'depth-first or in-order? (maybe) "quoted" $100 -c',  # GPT-2 vs Qwen2 regexes split these apart
    "",
]
PARITY_TEXTS = EDGE_TEXTS + ENGLISH[3::97] + [t for lang in OTHER_LANGUAGES for t in corpus_lines(lang)[5:8]]

CHAT_PROMPTS: list[Any] = [
    [{"role": "user", "content": "Hello there! How are you today?"}],
    [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A branch of science."},
        {"role": "user", "content": "Tell me more."},
    ],
    "The quick brown fox jumps over the lazy dog",
    " ".join(ENGLISH[:6]),  # long: past the Gemma sliding windows below
]


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_bpe(pre: str, specials: list[str], vocab_size: int = 500) -> Any:
    """A GPT-2-style (``pre="gpt-2"``) or Qwen2-style (``pre="qwen2"``, NFC + split regex) byte-level BPE."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def spm_bpe(specials: list[str], chat_specials: list[Any], *, prefix: bool, vocab_size: int = 600) -> Any:
    """A SentencePiece-style BPE (Llama 2 / Phi-3 with ``prefix``, Gemma without): "▁" for spaces, pieces
    that start at word boundaries, the 256 ``<0xXX>`` byte-fallback tokens right after ``specials``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPM_SPACE, prepend_scheme="always" if prefix else "never", split=True
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for t in [*specials, *(f"<0x{b:02X}>" for b in range(256))]:
        vocab[t] = len(vocab)
    for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    unk = "<unk>" if "<unk>" in vocab else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend(SPM_SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_special_tokens(chat_specials)
    return tok


def save_tokenizer(tok: Any, out: Path, **config: Any) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False, **config}))


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DIALOGPT = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@dataclass
class Built:
    hf_dir: Path
    f32: Path


def _save_model(out: Path, config: Any, model_cls: Any, seed: int, *, gemma: bool = False) -> None:
    """Random weights, doubled (peaked logits); Gemma also gets random norm weights (stored as ``w`` for
    ``x * (1 + w)``: the converter's +1 matters everywhere), a smaller embedding and a large final norm, so
    that the blocks, not the sqrt(hidden)-scaled embedding, decide the next token."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_" not in name:
                p.mul_(2.0)
            elif gemma:
                p.normal_(0.0, 0.3)
        if gemma:
            model.model.embed_tokens.weight.mul_(0.125)
            model.model.norm.weight.add_(7.0)
    model.save_pretrained(out)


def build_gpt2(out: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_level_bpe("gpt-2", ["<|endoftext|>"])
    eot = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    _save_model(out, config, GPT2LMHeadModel, seed=0)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPT2Tokenizer",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        add_bos_token=False,
        model_max_length=256,
        chat_template=DIALOGPT,
    )


def build_qwen2(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = byte_level_bpe("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=800)
    config = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        use_sliding_window=False,
    )
    _save_model(out, config, Qwen2ForCausalLM, seed=1)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="Qwen2Tokenizer",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        add_bos_token=False,
        model_max_length=256,
        chat_template=CHATML,
        errors="replace",
    )


def build_phi3(out: Path) -> None:
    from tokenizers import AddedToken, processors
    from transformers import Phi3Config, Phi3ForCausalLM

    # As Phi-3-mini: chat markers strip the whitespace after them (llama.cpp applies the same rule to
    # models named "phi3").
    chat = [
        AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>")
        for t in ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    ]
    tok = spm_bpe(["<unk>", "<s>", "</s>"], chat, prefix=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = Phi3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        initializer_range=0.2,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=tok.token_to_id("<|end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    _save_model(out, config, Phi3ForCausalLM, seed=2)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="LlamaTokenizer",
        legacy=True,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=256,
        chat_template=PHI3,
    )


def _gemma_tokenizer() -> Any:
    from tokenizers import AddedToken, processors

    chat = [AddedToken(t, special=True, normalized=False) for t in ["<start_of_turn>", "<end_of_turn>"]]
    tok = spm_bpe(["<pad>", "<eos>", "<bos>", "<unk>"], chat, prefix=False)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def _save_gemma_tokenizer(tok: Any, out: Path) -> None:
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GemmaTokenizer",
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=256,
        chat_template=GEMMA,
    )


def build_gemma2(out: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = _gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        query_pre_attn_scalar=24,  # != head_dim: the scale is folded into Q
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        pad_token_id=0,
        eos_token_id=tok.token_to_id("<end_of_turn>"),
        bos_token_id=2,
    )
    _save_model(out, config, Gemma2ForCausalLM, seed=3, gemma=True)
    _save_gemma_tokenizer(tok, out)


def build_gemma3(out: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = _gemma_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0,
        pad_token_id=0,
        eos_token_id=tok.token_to_id("<end_of_turn>"),
        bos_token_id=2,
    )
    _save_model(out, config, Gemma3ForCausalLM, seed=4, gemma=True)
    _save_gemma_tokenizer(tok, out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "gpt2": build_gpt2,
    "qwen2": build_qwen2,
    "phi3": build_phi3,
    "gemma2": build_gemma2,
    "gemma3": build_gemma3,
}
ARCHS = list(BUILDERS)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    cache: dict[str, Built] = {}

    def get(arch: str) -> Built:
        if arch not in cache:
            hf_dir = tmp_path_factory.mktemp(arch) / f"tiny-{arch}"
            hf_dir.mkdir()
            BUILDERS[arch](hf_dir)
            f32 = hf_dir.parent / f"tiny-{arch}-F32.gguf"
            r = convert(hf_dir, f32, outtype="f32")
            assert r.path == f32 and f32.is_file()
            cache[arch] = Built(hf_dir, f32)
        return cache[arch]

    return get


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return {n: f.contents() for n, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---------------------------------------------------------------------------------------------------
# Parity through llama.cpp, every architecture
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_parity(built: Callable[[str], Built], arch: str) -> None:
    from gguf_factory.verify import check_tokenizer_parity

    b = built(arch)
    parity = check_tokenizer_parity(b.f32, b.hf_dir, PARITY_TEXTS)
    assert parity.n_checks == 2 * len(PARITY_TEXTS)  # plain + chat-template rendering
    assert parity.ok, parity.mismatches[:3]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_logits_f32(built: Callable[[str], Built], arch: str) -> None:
    from gguf_factory.verify import check_greedy_parity, check_logit_agreement

    b = built(arch)
    greedy = check_greedy_parity(b.f32, b.hf_dir, CHAT_PROMPTS, max_new_tokens=10)
    assert greedy.ok, greedy.mismatches
    assert any(len(g) > 4 for g in greedy.generated)
    assert len({t for g in greedy.generated for t in g}) >= 8  # not a degenerate repeat of one token
    logits = check_logit_agreement(b.f32, b.hf_dir, CHAT_PROMPTS)
    assert logits.n_positions > 80
    assert logits.top1_agreement >= 0.999, logits
    assert logits.max_abs_logprob_diff < 5e-2, logits  # ggml GELU uses an F16 table: ~1e-2
    assert logits.ok


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_f16(built: Callable[[str], Built], arch: str) -> None:
    from gguf_factory.verify import check_logit_agreement

    b = built(arch)
    f16 = b.f32.with_name(b.f32.name.replace("F32", "F16"))
    convert(b.hf_dir, f16, outtype="f16")
    _, tensors = read_gguf(f16)
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    logits = check_logit_agreement(f16, b.hf_dir, CHAT_PROMPTS, min_top1=0.99)
    assert logits.top1_agreement >= 0.99, logits
    assert logits.ok


# ---------------------------------------------------------------------------------------------------
# What each converter writes (layouts that the parity above depends on)
# ---------------------------------------------------------------------------------------------------


def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def gguf_array(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])


@pytest.mark.slow
def test_gpt2_layout(built: Callable[[str], Built]) -> None:
    b = built("gpt2")
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == 256
    assert fields["gpt2.feed_forward_length"] == 4 * 64
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert "position_embd.weight" in tensors and "blk.0.attn_norm.bias" in tensors
    # Conv1D [in, out] -> [out, in]
    c_attn = hf["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (64, 3 * 64)
    assert np.array_equal(gguf_array(tensors["blk.0.attn_qkv.weight"]), c_attn.T)
    assert np.array_equal(gguf_array(tensors["blk.0.ffn_up.weight"]), hf["transformer.h.0.mlp.c_fc.weight"].T)


@pytest.mark.slow
def test_qwen2_layout(built: Callable[[str], Built]) -> None:
    b = built("qwen2")
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert "output.weight" not in tensors  # tie_word_embeddings
    # NEOX rope in both engines: Q/K rows (and their biases) are not permuted
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"):
        ours = gguf_array(tensors[f"blk.0.attn_{name[0]}.{name.split('.')[1]}"])
        assert np.array_equal(ours, hf[f"model.layers.0.self_attn.{name}"]), name


@pytest.mark.slow
def test_phi3_layout_and_spm_vocab(built: Callable[[str], Built]) -> None:
    from tokenizers import Tokenizer

    b = built("phi3")
    fields, tensors = read_gguf(b.f32)
    tok = Tokenizer.from_file(str(b.hf_dir / "tokenizer.json"))
    assert fields["general.architecture"] == "phi3"
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [64, 64 + 2 * 32]  # fused Q, K, V (GQA)
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [64, 2 * 128]  # fused gate, up
    assert "output.weight" in tensors
    assert fields["phi3.rope.dimension_count"] == 16
    # SentencePiece-style vocabulary
    assert fields["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in fields and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.unknown_token_id"] == 0
    types, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.scores"]
    assert types[tok.token_to_id("<0x0A>")] == gguf.TokenType.BYTE
    assert types[0] == gguf.TokenType.UNKNOWN
    assert types[tok.token_to_id("<|end|>")] == gguf.TokenType.CONTROL
    assert types[tok.token_to_id(SPM_SPACE + "the")] == gguf.TokenType.NORMAL
    # merged earlier = higher score
    assert scores[tok.token_to_id(SPM_SPACE + "t")] > scores[tok.token_to_id(SPM_SPACE + "the")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_layout(built: Callable[[str], Built], arch: str) -> None:
    b = built(arch)
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    assert fields["general.architecture"] == arch
    # RMSNorm x * (1 + w): written as w + 1
    for hf_name, name in [
        ("model.norm.weight", "output_norm.weight"),
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
        ("model.layers.0.pre_feedforward_layernorm.weight", "blk.0.ffn_norm.weight"),
        ("model.layers.0.post_feedforward_layernorm.weight", "blk.0.post_ffw_norm.weight"),
    ]:
        assert np.allclose(gguf_array(tensors[name]), hf[hf_name] + 1.0, atol=1e-6), name
    # attention scale: transformers 24 ** -0.5, llama.cpp head_dim (16) ** -0.5 -> the ratio is folded in
    ratio = (16 / 24) ** 0.5
    if arch == "gemma2":
        q = gguf_array(tensors["blk.0.attn_q.weight"])
        assert np.allclose(q, hf["model.layers.0.self_attn.q_proj.weight"] * ratio, atol=1e-6)
        assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(5.0)
        assert fields["gemma2.attention.sliding_window_pattern"] == [True, False]
    else:
        qn = gguf_array(tensors["blk.0.attn_q_norm.weight"])
        assert np.allclose(qn, (hf["model.layers.0.self_attn.q_norm.weight"] + 1.0) * ratio, atol=1e-6)
        kn = gguf_array(tensors["blk.0.attn_k_norm.weight"])
        assert np.allclose(kn, hf["model.layers.0.self_attn.k_norm.weight"] + 1.0, atol=1e-6)
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(10000.0)
    assert fields[f"{arch}.final_logit_softcapping"] == pytest.approx(30.0)
    assert fields[f"{arch}.attention.sliding_window"] == 8
    assert fields[f"{arch}.attention.key_length"] == 16
    assert "output.weight" not in tensors
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 2


@pytest.mark.slow
def test_phi3_longrope(built: Callable[[str], Built], tmp_path: Path) -> None:
    """Phi-3.5-style longrope: short factors up to the original context, long ones past it, in both
    engines (llama.cpp picks by context size, transformers by sequence length)."""
    from gguf_factory.verify import check_logit_agreement

    rng = np.random.default_rng(0)
    short, long = rng.uniform(1.0, 2.0, 8).tolist(), rng.uniform(2.0, 8.0, 8).tolist()

    def edit(c: dict[str, Any]) -> None:
        c.update(original_max_position_embeddings=256, max_position_embeddings=1024)
        c["rope_parameters"] = {
            **(c.get("rope_parameters") or {}),
            "rope_type": "longrope",
            "short_factor": short,
            "long_factor": long,
            "original_max_position_embeddings": 256,
        }

    m = _copy(built("phi3").hf_dir, tmp_path / "tiny-phi3")
    _edit_json(m / "config.json", edit)
    out = tmp_path / "longrope.gguf"
    convert(m, out, outtype="f32")
    fields, tensors = read_gguf(out)
    assert np.allclose(gguf_array(tensors["rope_factors_short.weight"]), short)
    assert np.allclose(gguf_array(tensors["rope_factors_long.weight"]), long)
    assert fields["phi3.rope.scaling.original_context_length"] == 256
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(256)) ** 0.5)
    # short prompts: llama.cpp's context (padded to 256) stays within the original one -> short factors
    assert check_logit_agreement(out, m, CHAT_PROMPTS[:3]).ok
    # a 265-token prompt: past the original context in both engines -> long factors
    assert check_logit_agreement(out, m, [" ".join(ENGLISH[:14])]).ok


# ---------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the file, nothing written
# ---------------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.slow
def test_bad_inputs(built: Callable[[str], Built], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"

    # a byte-fallback tokenizer without its <0xXX> tokens
    m = _copy(built("phi3").hf_dir, tmp_path / "no-bytes")
    _edit_json(m / "tokenizer.json", lambda tj: tj["model"]["vocab"].pop("<0x41>"))
    with pytest.raises(ConversionError, match=r"tokenizer.json.*byte tokens are missing.*<0x41>"):
        convert(m, out)

    # a normalizer llama.cpp cannot reproduce
    m = _copy(built("gemma2").hf_dir, tmp_path / "lowercase")
    _edit_json(m / "tokenizer.json", lambda tj: tj.update(normalizer={"type": "Lowercase"}))
    with pytest.raises(ConversionError, match=r"tokenizer.json.*Lowercase.*no llama.cpp equivalent"):
        convert(m, out)

    # a tokenizer model llama.cpp has no equivalent for (WordPiece) is refused, naming the model type
    m = _copy(built("gemma2").hf_dir, tmp_path / "wordpiece")
    _edit_json(m / "tokenizer.json", lambda tj: tj.update(model={"type": "WordPiece", "vocab": {"a": 0}}))
    with pytest.raises(ConversionError, match=r"tokenizer.json: unsupported tokenizer.*'WordPiece'"):
        convert(m, out)

    # a split regex llama.cpp does not know: refused, naming the closest known one
    def odd_regex(tj: dict[str, Any]) -> None:
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_REGEX.removesuffix(r"|\s+")

    m = _copy(built("qwen2").hf_dir, tmp_path / "odd-regex")
    _edit_json(m / "tokenizer.json", odd_regex)
    with pytest.raises(
        ConversionError, match=r"tokenizer.json: pre-tokenizer not supported.*closest to .*'qwen2'"
    ):
        convert(m, out)

    # GPT-2 with an activation llama.cpp's gpt2 graph does not have
    m = _copy(built("gpt2").hf_dir, tmp_path / "relu")
    _edit_json(m / "config.json", lambda c: c.update(activation_function="relu"))
    with pytest.raises(ConversionError, match=r"config.json.*activation_function 'relu'"):
        convert(m, out)

    # Phi-3 whose fused gate/up does not match intermediate_size
    m = _copy(built("phi3").hf_dir, tmp_path / "phi-ff")
    _edit_json(m / "config.json", lambda c: c.update(intermediate_size=96))
    with pytest.raises(ConversionError, match=r"gate_up_proj.*expected 2 \* intermediate_size = 192"):
        convert(m, out)

    # Gemma 2 with an untied lm_head (llama.cpp's gemma2 always ties)
    m = _copy(built("gemma2").hf_dir, tmp_path / "untied")
    _edit_json(m / "config.json", lambda c: c.update(tie_word_embeddings=False))
    from safetensors.numpy import load_file, save_file

    state = load_file(str(m / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="tie_word_embeddings=false"):
        convert(m, out)

    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_verify_passes_for_every_architecture(built: Callable[[str], Built], arch: str) -> None:
    """The user-facing `verify` (tokenizer on built-in + 27 languages, greedy, top-1 logits) on each F32."""
    from gguf_factory.verify import verify

    b = built(arch)
    report = verify(b.f32, b.hf_dir, per_language=2, max_prompts=4, max_new_tokens=8, n_threads=1)
    assert report.gguf_type == "F32" and report.min_top1 is not None and report.min_top1 >= 0.999
    assert report.tokenizer.ok and not report.tokenizer.mismatches, report.tokenizer.mismatches[:3]
    assert report.greedy.ok, (arch, report.greedy)
    if arch == "gpt2":
        # llama.cpp's CPU GELU reads an fp16 lookup table (log-softmax off by ~1e-2 even in F32, vs ~1e-4
        # for SiLU models): on this random near-flat model 1 of 124 positions is a near-tie that flips
        assert report.logits.top1_agreement >= 0.99 and report.logits.max_abs_logprob_diff < 0.05
    else:
        assert report.logits.top1_agreement >= 0.999, (arch, report.logits)
        assert report.ok
