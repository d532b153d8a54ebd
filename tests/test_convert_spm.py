"""convert with SentencePiece tokenizers: a bare tokenizer.model (BPE, unigram) and a Unigram tokenizer.json.

The SentencePiece models are trained here, offline, with the ``sentencepiece`` library on chatterbot-corpus
lines (English plus a little Spanish, German and Russian) with a user-defined piece, the way Llama 2 / Gemma
tokenizers are built (identity normalization, no whitespace collapsing, digits split; byte fallback unless
said otherwise; one NFKC variant). Each is wrapped for a tiny random-weight Llama (and a Gemma 2) as

* a bare ``tokenizer.model`` + ``tokenizer_config.json`` (transformers loads it as ``LlamaTokenizer`` /
  ``GemmaTokenizer``), and
* a ``tokenizer.json`` with a ``Unigram`` model (pieces and scores from the .model, Llama's legacy
  ``Prepend("▁") + Replace(" ", "▁")`` normalizer, NFKC as a ``Precompiled`` step), built with ``tokenizers``.

The GGUFs (F32) are checked through the real llama.cpp, against transformers (``verify``'s
check_tokenizer_parity, greedy parity) and against the ``sentencepiece`` library, the tokenizer llama.cpp's
``"llama"`` and ``"t5"`` tokenizers imitate. Where transformers and SentencePiece disagree with each other the
test names the texts and which side llama.cpp takes. Measured on these models (94 texts):

* BPE .model -> "llama": = SentencePiece except text right after a user-defined piece (2 texts);
  = transformers except where the text, or the text after a user-defined piece, starts with a space (3
  texts; transformers' Metaspace drops SentencePiece's dummy "▁" there, llama.cpp keeps it).
* unigram .model/tokenizer.json with byte fallback -> "llama" (lossless, greedy merges): = transformers 5's
  LlamaTokenizer (which also builds BPE merges from the .model) but not SentencePiece's Viterbi search
  (58 of 90 texts split differently); against a true Unigram tokenizer.json 118 of 188 encodings differ.
* unigram without byte fallback -> "t5" (llama.cpp's Viterbi): = SentencePiece and = transformers' Unigram
  on every text (0 of 188), NFKC table included; transformers 5's LlamaTokenizer mis-reads such a .model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from gguf_factory.convert import convert
from gguf_factory.errors import ConversionError, ModelError
from model_builders import CHAT_PROMPTS, ENGLISH, GEMMA, PARITY_TEXTS, corpus_lines
from model_builders import save_model as _save_model

SPM_SPACE = "\u2581"
TRAIN_TEXTS = ENGLISH[::2] + [t for lang in ("spanish", "german", "russian") for t in corpus_lines(lang)[::4]]
EXTRA_TEXTS = [
    "a <custom> b",
    "x<custom>y",
    "  two leading spaces",
    "end  ",
    "\n\nnewlines first",
    "12345 678 9",
    "😀",
    "日本語のテキスト",
    "Ünïcödé ß ø å",
]
TEXTS = PARITY_TEXTS + EXTRA_TEXTS
LLAMA2_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def train_spm(model_type: str, *, byte_fallback: bool = True, vocab_size: int = 700, **options: Any) -> bytes:
    """A SentencePiece model proto (bytes): ids 0-2 unk/bos/eos, 3 a user-defined piece, then (with byte
    fallback) the 256 ``<0xXX>`` pieces, then the learned pieces."""
    import sentencepiece as spm

    settings: dict[str, Any] = {
        "normalization_rule_name": "identity",
        "add_dummy_prefix": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "user_defined_symbols": ["<custom>"],
        **options,
    }
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXTS),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=byte_fallback,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
        **settings,
    )
    return buf.getvalue()


def unigram_tokenizer_json(proto_bytes: bytes) -> Any:
    """A ``tokenizers`` Unigram tokenizer with the .model's pieces and scores (Llama legacy normalizer)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    byte_fallback = proto.trainer_spec.byte_fallback
    tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback))
    charsmap = proto.normalizer_spec.precompiled_charsmap  # e.g. NFKC: as transformers' converter writes it
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    tok.normalizer = normalizers.Sequence(
        [*steps, normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPM_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_tokens([AddedToken("<custom>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def save_llama(out: Path, n_vocab: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)


def tokenizer_config(cls: str, **extra: Any) -> str:
    return json.dumps(
        {
            "tokenizer_class": cls,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 256,
            "chat_template": LLAMA2_CHAT,
            **extra,
        }
    )


def build_llama_model_file(
    out: Path, model_type: str, byte_fallback: bool = True, rule: str = "identity"
) -> None:
    """tokenizer.model only (no tokenizer.json)."""
    proto = train_spm(
        model_type,
        byte_fallback=byte_fallback,
        vocab_size=700 if byte_fallback else 450,
        normalization_rule_name=rule,
    )
    (out / "tokenizer.model").write_bytes(proto)
    (out / "tokenizer_config.json").write_text(tokenizer_config("LlamaTokenizer"))
    save_llama(out, 700 if byte_fallback else 450, seed=11)


def build_llama_unigram_json(out: Path, byte_fallback: bool = True, rule: str = "identity") -> None:
    """tokenizer.json with a Unigram model (no tokenizer.model)."""
    proto = train_spm(
        "unigram",
        byte_fallback=byte_fallback,
        vocab_size=700 if byte_fallback else 450,
        normalization_rule_name=rule,
    )
    (out.parent / "source.model").write_bytes(proto)  # for comparisons with the sentencepiece library
    tok = unigram_tokenizer_json(proto)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(tokenizer_config("PreTrainedTokenizerFast"))
    save_llama(out, tok.get_vocab_size(), seed=12)


def build_gemma2_model_file(out: Path) -> None:
    """Gemma style: a BPE tokenizer.model without the dummy prefix, ids 0-3 pad/eos/bos/unk, chat markers as
    user-defined pieces; GemmaTokenizer config; a tiny random Gemma 2."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    proto = train_spm(
        "bpe",
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    (out / "tokenizer.model").write_bytes(proto)
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<end_of_turn>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 256,
        "chat_template": GEMMA,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = Gemma2Config(
        vocab_size=700,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        pad_token_id=0,
        eos_token_id=5,
        bos_token_id=2,
    )
    _save_model(out, model_config, Gemma2ForCausalLM, seed=13, gemma=True)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "gemma2-model": build_gemma2_model_file,
    "model-bpe": lambda out: build_llama_model_file(out, "bpe"),
    "model-unigram": lambda out: build_llama_model_file(out, "unigram"),
    "model-unigram-nobf": lambda out: build_llama_model_file(out, "unigram", byte_fallback=False),
    "json-unigram": build_llama_unigram_json,
    "json-unigram-nobf": lambda out: build_llama_unigram_json(out, byte_fallback=False),
    "model-unigram-nfkc": lambda out: build_llama_model_file(
        out, "unigram", byte_fallback=False, rule="nmt_nfkc"
    ),
    "json-unigram-nfkc": lambda out: build_llama_unigram_json(out, byte_fallback=False, rule="nmt_nfkc"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    cache: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            hf_dir = tmp_path_factory.mktemp(kind) / f"tiny-{kind}"
            hf_dir.mkdir()
            BUILDERS[kind](hf_dir)
            f32 = hf_dir.parent / f"tiny-{kind}-F32.gguf"
            convert(hf_dir, f32, outtype="f32")
            cache[kind] = (hf_dir, f32)
        return cache[kind]

    return get


def llama_ids(path: Path, texts: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [list(llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts]
    finally:
        llm.close()


def sp_ids(hf_dir: Path, texts: list[str]) -> list[list[int]]:
    """Ids from the ``sentencepiece`` library itself (the folder's tokenizer.model, or the .model its
    tokenizer.json was built from)."""
    import sentencepiece as spm

    path = hf_dir / "tokenizer.model"
    sp = spm.SentencePieceProcessor(
        model_file=str(path if path.is_file() else hf_dir.parent / "source.model")
    )
    return [list(sp.encode(t)) for t in texts]


def read_fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {n: f.contents() for n, f in reader.fields.items()}


# Texts on which transformers and SentencePiece disagree with each other (llama.cpp sides with one of them):
# * a leading space: SentencePiece (and llama.cpp) prefix "▁" anyway ("▁▁leading"); transformers' Metaspace
#   does not prefix a text that already starts with one;
# * text right after a user-defined piece: transformers (and llama.cpp) prefix it with "▁", SentencePiece
#   does not.
LEADING_SPACE = [t for t in TEXTS if t.startswith(" ")]
AFTER_USER_PIECE = [t for t in TEXTS if "<custom>" in t]
COMMON_TEXTS = [t for t in TEXTS if t not in LEADING_SPACE and t not in AFTER_USER_PIECE]


def test_corpus_covers_the_hard_cases() -> None:
    """The texts compared exactly include newlines, tabs, runs of spaces, digits, emoji and other scripts."""
    joined = "\n".join(COMMON_TEXTS)
    for needle in ("\n\n", "\t", "   ", "1234", "😀", "日本語", "ß", "Café"):
        assert needle in joined, needle
    assert any(ord(c) > 0x400 and c.isalpha() for c in joined)  # non-Latin scripts (chatterbot languages)
    assert LEADING_SPACE and AFTER_USER_PIECE


# ---------------------------------------------------------------------------------------------------
# A bare tokenizer.model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_file_bpe_metadata(built: Callable[[str], tuple[Path, Path]]) -> None:
    import sentencepiece as spm

    hf_dir, f32 = built("model-bpe")
    assert not (hf_dir / "tokenizer.json").exists()
    fields = read_fields(f32)
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    assert fields["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.chat_template"] == LLAMA2_CHAT
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == sp.get_piece_size() == 700
    assert tokens == [sp.id_to_piece(i) for i in range(700)]
    assert scores == pytest.approx([sp.get_score(i) for i in range(700)])
    T = gguf.TokenType
    assert types[:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.USER_DEFINED]
    assert types[4:260] == [T.BYTE] * 256 and tokens[4 + 0x0A] == "<0x0A>"
    assert set(types[260:]) == {T.NORMAL}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model-bpe", "model-unigram"])
def test_model_file_tokenizer_parity(built: Callable[[str], tuple[Path, Path]], kind: str) -> None:
    """transformers (LlamaTokenizer from the .model) and llama.cpp: identical ids on everything but the two
    cases where transformers and SentencePiece disagree (see above)."""
    from gguf_factory.verify import check_tokenizer_parity

    hf_dir, f32 = built(kind)
    parity = check_tokenizer_parity(f32, hf_dir, COMMON_TEXTS)
    assert parity.n_checks == 2 * len(COMMON_TEXTS)  # plain + chat-template rendering
    assert parity.ok, parity.mismatches[:3]
    # leading spaces: llama.cpp keeps SentencePiece's "▁▁", transformers drops one "▁"
    spaced = check_tokenizer_parity(f32, hf_dir, LEADING_SPACE)
    assert {t for t, _, _ in spaced.mismatches} == set(LEADING_SPACE)
    for text, hf_ids, ll_ids in spaced.mismatches:
        assert ll_ids[1:] == hf_ids and ll_ids[0] == hf_ids[0], text


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model-bpe", "model-unigram"])
def test_model_file_greedy_parity(built: Callable[[str], tuple[Path, Path]], kind: str) -> None:
    from gguf_factory.verify import check_greedy_parity

    hf_dir, f32 = built(kind)
    assert greedy_ok(check_greedy_parity(f32, hf_dir, CHAT_PROMPTS[:3], max_new_tokens=10))


@pytest.mark.slow
def test_gemma_model_file(built: Callable[[str], tuple[Path, Path]]) -> None:
    """Gemma style (no dummy prefix): 0 mismatches with transformers' GemmaTokenizer and with SentencePiece
    on every text, chat template included, and greedy parity through llama.cpp's gemma2."""
    from gguf_factory.verify import check_greedy_parity, check_tokenizer_parity

    hf_dir, f32 = built("gemma2-model")
    fields = read_fields(f32)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 2 and fields["tokenizer.ggml.eos_token_id"] == 5
    assert fields["tokenizer.ggml.token_type"][4:6] == [gguf.TokenType.USER_DEFINED] * 2
    parity = check_tokenizer_parity(f32, hf_dir, TEXTS)
    assert parity.n_checks == 2 * len(TEXTS)
    assert parity.ok, parity.mismatches[:3]
    assert llama_ids(f32, TEXTS) == sp_ids(hf_dir, TEXTS)
    assert greedy_ok(check_greedy_parity(f32, hf_dir, CHAT_PROMPTS[:3], max_new_tokens=10))


@pytest.mark.slow
def test_model_file_bpe_matches_sentencepiece(built: Callable[[str], tuple[Path, Path]]) -> None:
    """llama.cpp's "llama" tokenizer is SentencePiece's BPE: same ids as the sentencepiece library."""
    hf_dir, f32 = built("model-bpe")
    texts = COMMON_TEXTS + LEADING_SPACE
    assert llama_ids(f32, texts) == sp_ids(hf_dir, texts)


@pytest.mark.slow
def test_model_file_unigram_with_byte_fallback(
    built: Callable[[str], tuple[Path, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    """A unigram .model with byte fallback is written as "llama" (lossless, greedy merging): it matches
    transformers' LlamaTokenizer (test above) but not SentencePiece's Viterbi search, and says so."""
    from llama_cpp import Llama

    from gguf_factory.convert.vocab import load_vocab

    hf_dir, f32 = built("model-unigram")
    with caplog.at_level("WARNING", logger="gguf_factory.convert.vocab"):
        load_vocab(hf_dir, {}, 700)
    assert "tokenizer.model: unigram model with byte fallback" in caplog.text
    assert "instead of the unigram Viterbi search" in caplog.text
    fields = read_fields(f32)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.token_type"][4 + 0x0A] == gguf.TokenType.BYTE
    ll, sp = llama_ids(f32, COMMON_TEXTS), sp_ids(hf_dir, COMMON_TEXTS)
    differ = sum(a != b for a, b in zip(ll, sp, strict=True))
    assert 0 < differ < len(COMMON_TEXTS)  # measured: 58 of 90 texts split differently
    llm = Llama(model_path=str(f32), vocab_only=True, verbose=False)
    try:  # but nothing is lost: every text (emoji and newlines included) decodes back exactly
        for text, ids in zip(COMMON_TEXTS, ll, strict=True):
            if text:  # " ": the dummy prefix
                assert llm.detokenize(ids).decode("utf-8") == " " + text
    finally:
        llm.close()


@pytest.mark.slow
def test_model_file_unigram_without_byte_fallback(built: Callable[[str], tuple[Path, Path]]) -> None:
    """Without byte fallback a unigram .model goes to llama.cpp's unigram tokenizer ("t5"): exactly the
    sentencepiece library's Viterbi ids, unknown characters included (transformers 5's LlamaTokenizer
    mis-reads such a .model, building BPE merges from it: it is not the reference here)."""
    hf_dir, f32 = built("model-unigram-nobf")
    fields = read_fields(f32)
    assert fields["tokenizer.ggml.model"] == "t5"
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.remove_extra_whitespaces"] is False
    assert "tokenizer.ggml.precompiled_charsmap" not in fields  # identity normalization
    texts = COMMON_TEXTS + LEADING_SPACE
    ll = llama_ids(f32, texts)
    assert ll == sp_ids(hf_dir, texts)
    assert any(0 in ids for ids in ll)  # some characters are unknown: <unk>, as SentencePiece


@pytest.mark.slow
def test_model_file_defaults_without_tokenizer_config(
    built: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    """No tokenizer_config.json: BOS/EOS/UNK ids and add_bos come from the .model's trainer spec."""
    import shutil

    from gguf_factory.convert.vocab import load_vocab

    src, _ = built("model-bpe")
    m = Path(shutil.copytree(src, tmp_path / "m"))
    (m / "tokenizer_config.json").unlink()
    vocab = load_vocab(m, {}, 704)
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert vocab.add_bos and not vocab.add_eos and vocab.chat_template is None
    assert vocab.tokens[700:] == [f"[PAD{i}]" for i in range(700, 704)]
    assert set(vocab.types[700:]) == {gguf.TokenType.UNUSED}
    assert vocab.scores is not None and max(vocab.scores[700:]) < min(vocab.scores[:700])


# ---------------------------------------------------------------------------------------------------
# A Unigram tokenizer.json
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unigram_json_parity(built: Callable[[str], tuple[Path, Path]]) -> None:
    """Unigram tokenizer.json without byte fallback -> "t5": 0 mismatches with transformers on every text
    (leading spaces, added tokens, unknown characters, chat template), and greedy parity."""
    from gguf_factory.verify import check_greedy_parity, check_tokenizer_parity

    hf_dir, f32 = built("json-unigram-nobf")
    fields = read_fields(f32)
    assert fields["tokenizer.ggml.model"] == "t5"
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[:4] == [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.USER_DEFINED,
    ]
    parity = check_tokenizer_parity(f32, hf_dir, TEXTS)
    assert parity.n_checks == 2 * len(TEXTS)
    assert parity.ok, parity.mismatches[:3]
    greedy = check_greedy_parity(f32, hf_dir, CHAT_PROMPTS[:3], max_new_tokens=10)
    assert greedy.ok, greedy.mismatches


@pytest.mark.slow
def test_unigram_json_with_byte_fallback(
    built: Callable[[str], tuple[Path, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    """With byte fallback: "llama" (SPM) with the unigram scores and BYTE tokens, and a warning that names
    the approximation; greedy parity still holds (same prompt ids)."""
    from gguf_factory.convert.vocab import load_vocab
    from gguf_factory.verify import check_greedy_parity

    hf_dir, f32 = built("json-unigram")
    with caplog.at_level("WARNING", logger="gguf_factory.convert.vocab"):
        load_vocab(hf_dir, {}, 700)
    assert "tokenizer.json: unigram model with byte fallback" in caplog.text
    fields = read_fields(f32)
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.scores"][260:] == pytest.approx([s for _, s in tj["model"]["vocab"][260:]])
    assert fields["tokenizer.ggml.token_type"][4:260] == [gguf.TokenType.BYTE] * 256
    assert greedy_ok(check_greedy_parity(f32, hf_dir, CHAT_PROMPTS[:3], max_new_tokens=10))


def greedy_ok(parity: Any) -> bool:
    assert parity.ok, parity.mismatches
    assert any(len(g) > 4 for g in parity.generated)
    return True


# ---------------------------------------------------------------------------------------------------
# Bad SentencePiece inputs: a clear error naming the file, nothing written
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_sentencepiece_inputs(built: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    import shutil

    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    src, _ = built("model-bpe")
    out = tmp_path / "out.gguf"

    m = Path(shutil.copytree(src, tmp_path / "garbage"))
    (m / "tokenizer.model").write_bytes(b"\x80\x03not a protobuf, maybe a pickle\x94.")
    with pytest.raises(ModelError, match=r"tokenizer.model is not a SentencePiece model"):
        convert(m, out)

    proto = sp_pb2.ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    m = Path(shutil.copytree(src, tmp_path / "no-bytes"))
    del proto.pieces[4 + 0x41]
    (m / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ConversionError, match=r"tokenizer.model: byte_fallback is on but 1 byte tokens"):
        convert(m, out)

    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.CHAR
    m = Path(shutil.copytree(src, tmp_path / "char"))
    (m / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ConversionError, match=r"tokenizer.model: SentencePiece model type CHAR"):
        convert(m, out)

    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


NFKC_TEXTS = ["ＡＢＣ１２３ full width", "ﬁne ligature ①", "Ⅻ ㎏ ™ ｶﾀｶﾅ"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model-unigram-nfkc", "json-unigram-nfkc"])
def test_unigram_nfkc_normalization(built: Callable[[str], tuple[Path, Path]], kind: str) -> None:
    """SentencePiece's NFKC table (precompiled_charsmap) goes into the GGUF and llama.cpp's unigram
    tokenizer applies it: full-width, ligature and compatibility characters give SentencePiece's ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from gguf_factory.verify import check_tokenizer_parity

    hf_dir, f32 = built(kind)
    model_file = hf_dir / "tokenizer.model" if kind.startswith("model") else hf_dir.parent / "source.model"
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    fields = read_fields(f32)
    assert fields["tokenizer.ggml.model"] == "t5"
    charsmap = bytes(fields["tokenizer.ggml.precompiled_charsmap"])
    assert charsmap == proto.normalizer_spec.precompiled_charsmap and len(charsmap) > 1000
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert sp.encode("ＡＢＣ１２３") == sp.encode("ABC123")  # the table does change these texts
    texts = COMMON_TEXTS + LEADING_SPACE + NFKC_TEXTS
    assert llama_ids(f32, texts) == sp_ids(hf_dir, texts)
    if kind.startswith("json"):  # transformers runs the same table (its Precompiled normalizer)
        parity = check_tokenizer_parity(f32, hf_dir, TEXTS + NFKC_TEXTS)
        assert parity.ok, parity.mismatches[:3]
