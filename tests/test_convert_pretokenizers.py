"""Byte-level BPE pre-tokenizers: each llama.cpp name in gguf_factory.convert.vocab.PRE_TOKENIZERS is found
from a tokenizer.json's own split steps, and llama.cpp then gives transformers' ids exactly.

For every entry, a byte-level BPE is trained here with exactly those split steps (``Split(Regex, Isolated)``,
``Digits``, ``Punctuation``, ``ByteLevel``) and the entry's ``ignore_merges``, wrapped around a tiny random
Llama, converted, and compared through the real llama.cpp on edge cases, English, other languages and
code. Then the refusals: split steps llama.cpp has no regex list for, a mismatched ``ignore_merges``, a Falcon
vocabulary whose merges cross the digit split llama.cpp leaves out, and the SentencePiece-side shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gguf_factory.convert import convert
from gguf_factory.convert.vocab import (
    DIGIT,
    DIGITS,
    GPT2_REGEX,
    PRE_TOKENIZERS,
    PUNCTUATION_RUN,
    PreTokenizer,
    detect_pre_tokenizer,
)
from gguf_factory.errors import ConversionError
from model_builders import (
    DECOMPOSED_TEXT,
    PARITY_TEXTS,
    falcon_tokenizer,
    gemma_tokenizer,
    save_model,
    save_tokenizer,
    train_byte_level,
)

EXTRA_TEXTS = [
    "for (int i = 0; i < 10; ++i) { x += a[i] * 1000000; }",
    "1,234,567.89 — 2024-01-02T03:04:05Z 0xDEADBEEF",
    "你好，世界！我想在apple工作1314151天～",
    "日本語のテキストとカタカナ、ひらがな",
    "안녕하세요 세계",
    "Ünïcödé ß ø å ½ ² ③",
    "'''''' ``````` \"\"\"\" ......!!!!!!?????? I've been 'told he's there",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
]
TEXTS = PARITY_TEXTS + EXTRA_TEXTS


def _pre_tokenizer_for(entry: PreTokenizer) -> Any:
    from tokenizers import Regex, pre_tokenizers

    steps: list[Any] = []
    regexes = list(entry.regexes)
    gpt2_last = regexes[-1] == GPT2_REGEX
    if gpt2_last:
        regexes = regexes[:-1]
    for r in regexes:
        if r == DIGIT:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif r == DIGITS:
            steps.append(pre_tokenizers.Digits(individual_digits=False))
        elif r == PUNCTUATION_RUN:
            steps.append(pre_tokenizers.Punctuation(behavior="contiguous"))
        else:
            steps.append(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=gpt2_last))
    return pre_tokenizers.Sequence(steps)


def _tokenizer_for(entry: PreTokenizer) -> Any:
    from tokenizers import decoders

    if entry.name == "falcon":  # its ByteLevel step sits in the middle of the sequence
        return falcon_tokenizer()
    tok = train_byte_level(_pre_tokenizer_for(entry), vocab_size=700, ignore_merges=entry.ignore_merges)
    tok.decoder = decoders.ByteLevel()
    return tok


def _tiny_llama(out: Path, tok: Any, **tok_config: Any) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
    )
    save_model(out, config, LlamaForCausalLM, seed=0)
    save_tokenizer(tok, out, tokenizer_class="PreTrainedTokenizerFast", **tok_config)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("entry", PRE_TOKENIZERS, ids=[p.name for p in PRE_TOKENIZERS])
def test_pre_tokenizer_parity(tmp_path: Path, entry: PreTokenizer) -> None:
    from gguf_factory.verify import check_tokenizer_parity

    tok = _tokenizer_for(entry)
    model = _tiny_llama(tmp_path / "m", tok, clean_up_tokenization_spaces=entry.clean_spaces)
    tj = json.loads((model / "tokenizer.json").read_text())
    assert detect_pre_tokenizer(tj, "tokenizer.json", clean_up_spaces=entry.clean_spaces) == entry.name
    out = tmp_path / "m.gguf"
    convert(model, out, outtype="f32")
    parity = check_tokenizer_parity(out, model, TEXTS)
    assert parity.ok, parity.mismatches[:3]


def _json(tok: Any) -> dict[str, Any]:
    return json.loads(tok.to_str())


def test_unknown_split_steps_are_refused() -> None:
    from tokenizers import Regex, pre_tokenizers

    entry = next(p for p in PRE_TOKENIZERS if p.name == "qwen2")
    tj = _json(train_byte_level(_pre_tokenizer_for(entry), vocab_size=300))
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] += r"|\p{Sc}"
    with pytest.raises(
        ConversionError, match=r"no llama.cpp pre-tokenizer splits with these regexes.*'qwen2'"
    ):
        detect_pre_tokenizer(tj, "x/tokenizer.json")
    # a split that keeps matches attached (not Isolated), and a step kind llama.cpp has no regex for
    odd = train_byte_level(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\s+"), behavior="merged_with_next"),
                pre_tokenizers.ByteLevel(use_regex=False),
            ]
        ),
        vocab_size=300,
    )
    with pytest.raises(ConversionError, match=r"Isolated"):
        detect_pre_tokenizer(_json(odd), "x/tokenizer.json")
    ws = train_byte_level(
        pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(use_regex=False)]
        ),
        vocab_size=300,
    )
    with pytest.raises(ConversionError, match=r"WhitespaceSplit.*no llama.cpp equivalent"):
        detect_pre_tokenizer(_json(ws), "x/tokenizer.json")


def test_ignore_merges_must_match_llama_cpp() -> None:
    """The Llama 3 regex with merges applied is llama.cpp's "dbrx"; a tokenizer with ignore_merges and a
    regex whose llama.cpp name applies merges is refused, naming the field."""
    llama3 = next(p for p in PRE_TOKENIZERS if p.name == "llama-bpe")
    qwen2 = next(p for p in PRE_TOKENIZERS if p.name == "qwen2")
    tj = _json(train_byte_level(_pre_tokenizer_for(llama3), vocab_size=300, ignore_merges=False))
    assert detect_pre_tokenizer(tj, "t") == "dbrx"
    tj = _json(train_byte_level(_pre_tokenizer_for(qwen2), vocab_size=300, ignore_merges=True))
    with pytest.raises(ConversionError, match=r"model.ignore_merges=true.*'qwen2'.*ignore_merges=false"):
        detect_pre_tokenizer(tj, "x/tokenizer.json")


def test_falcon_digit_split_must_be_a_no_op() -> None:
    """llama.cpp's falcon leaves out tokenizer.json's Digits step: accepted only while no merge joins a digit
    and a non-digit (true of a vocabulary trained with that step, as every Falcon's is)."""
    tj = _json(falcon_tokenizer())
    assert detect_pre_tokenizer(tj, "t") == "falcon"
    tj["model"]["merges"].append(["Ġ", "1"])
    with pytest.raises(ConversionError, match=r"merge 'Ġ' \+ '1' joins a digit and a non-digit.*'falcon'"):
        detect_pre_tokenizer(tj, "x/tokenizer.json")


def test_byte_level_refusals(tmp_path: Path) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers

    base = train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=300)
    base.decoder = decoders.ByteLevel()
    tok = train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=True), vocab_size=300)
    with pytest.raises(ConversionError, match=r"add_prefix_space=true"):
        detect_pre_tokenizer(_json(tok), "x/tokenizer.json")
    out = tmp_path / "out.gguf"
    for n, (edit, message) in enumerate(
        [
            (
                lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
                r"Lowercase.*no llama.cpp equivalent",
            ),
            (lambda t: setattr(t.model, "dropout", 0.1), r"dropout"),
        ]
    ):
        from tokenizers import Tokenizer

        t = Tokenizer.from_str(base.to_str())
        edit(t)
        model = _tiny_llama(tmp_path / f"m{n}", t)
        with pytest.raises(ConversionError, match=rf"tokenizer.json: .*{message}"):
            convert(model, out)
    assert not out.exists()


@pytest.mark.slow
def test_nfc_normalizer_limit(tmp_path: Path) -> None:
    """An NFC normalizer (Qwen2/3, GPT-NeoX) is converted: llama.cpp does not normalize, so ids match on NFC
    text (every other test text) and differ on decomposed text, which tokenizers composes first."""
    from gguf_factory.verify import check_tokenizer_parity
    from model_builders import qwen_tokenizer

    model = _tiny_llama(tmp_path / "m", qwen_tokenizer(vocab_size=500))
    out = tmp_path / "m.gguf"
    convert(model, out, outtype="f32")
    assert check_tokenizer_parity(out, model, TEXTS).ok
    decomposed = check_tokenizer_parity(out, model, [DECOMPOSED_TEXT])
    assert not decomposed.ok  # documented: llama.cpp sees "e" + U+0301, transformers "é"


def test_spm_shapes(tmp_path: Path) -> None:
    """SentencePiece-style tokenizer.json shapes: Gemma 3's Split(" ") is a no-op only after the Replace
    normalizer; Metaspace(split=true) only while no token holds "▁" after its first character."""
    from gguf_factory.convert.vocab import spm_space_prefix

    tj = _json(gemma_tokenizer(gemma3=True))
    assert tj["pre_tokenizer"] == {
        "type": "Split",
        "pattern": {"String": " "},
        "behavior": "MergedWithPrevious",
        "invert": False,
    }
    assert spm_space_prefix(tj, "t") is False
    without_replace = dict(tj, normalizer=None)
    with pytest.raises(ConversionError, match=r"Split.*is not supported for a SentencePiece-style tokenizer"):
        spm_space_prefix(without_replace, "x/tokenizer.json")
    metaspace = dict(
        tj,
        normalizer=None,
        pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
    )
    assert spm_space_prefix(metaspace, "t") is True
    metaspace["model"] = dict(tj["model"], vocab={**tj["model"]["vocab"], "a▁b": 99999})
    with pytest.raises(ConversionError, match=r"Metaspace\(split=true\).*'a▁b'"):
        spm_space_prefix(metaspace, "x/tokenizer.json")
    shutil.rmtree(tmp_path, ignore_errors=True)
