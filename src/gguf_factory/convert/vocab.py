"""Tokenizer -> GGUF ``tokenizer.ggml.*``: tokens, types, scores/merges, special ids, chat template.

Three kinds of tokenizer.json are supported, in the layouts real checkpoints ship:

* byte-level BPE (``tokenizer.ggml.model = "gpt2"``). llama.cpp splits the text with a fixed list of regexes
  per pre-tokenizer name (src/llama-vocab.cpp); the tokenizer.json's own ``pre_tokenizer`` steps
  (``Split(Regex, Isolated)``, ``ByteLevel(use_regex)``, ``Digits``, ``Punctuation``) are turned into the
  regexes they apply and looked up in :data:`PRE_TOKENIZERS` together with the BPE ``ignore_merges`` flag
  (GPT-2, Llama 3, Qwen2/3, StarCoder/Granite, Falcon, OLMo 2's cl100k "dbrx", GPT-4o, Tekken, DeepSeek V3
  and more). A list llama.cpp does not have is refused, naming the closest one; ``NFC`` is the only
  normalizer let through (llama.cpp does not normalize: ids match on NFC text).
* SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, Mixtral, Phi-3, Gemma 1/2/3: ``"▁"`` for
  spaces and ``<0xXX>`` byte tokens) -> llama.cpp's ``"llama"`` (SPM) tokenizer. llama.cpp merges by token
  score, so each token's score is minus the rank of the first merge that creates it (the merge order). The
  space handling comes from the legacy ``Prepend("▁") + Replace(" ", "▁")`` normalizer, ``Replace`` alone,
  Gemma 3's ``Split(" ", MergedWithPrevious)`` after it (a no-op) or a ``Metaspace`` pre-tokenizer.
* SentencePiece-style Unigram (``model.type == "Unigram"``), scores = the unigram log-probabilities:
  - without byte fallback -> llama.cpp's unigram tokenizer (``"t5"``, UGM): the same Viterbi search as
    SentencePiece, the normalization table (``precompiled_charsmap``) and whitespace options passed through;
    exact, unknown characters included (one ``<unk>`` per run, as SentencePiece).
  - with byte fallback -> ``"llama"`` (SPM), as llama.cpp's own converter does, with a warning. llama.cpp's
    UGM has no byte fallback (newlines, emoji, any character missing from the vocabulary would become
    ``<unk>``: lossy); its SPM keeps the bytes but merges the best-scoring adjacent pair greedily, which is
    SentencePiece's *BPE* algorithm, not the unigram Viterbi search: ids differ from SentencePiece on many
    sentences (measured in tests/test_convert_spm.py), though they match transformers 5's LlamaTokenizer,
    which builds BPE merges from a unigram .model the same way.

A bare SentencePiece ``tokenizer.model`` (no tokenizer.json) is read with the ``sentencepiece`` package's
protobuf schema (plain protobuf parsing, nothing is unpickled or executed): pieces, scores and piece types map
one to one onto ``tokenizer.ggml.*`` (model choice as above), ``add_dummy_prefix`` becomes
``add_space_prefix``, the trainer spec's bos/eos/unk/pad ids are the defaults for the special tokens.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import ConversionError, ModelError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Byte-level BPE pre-tokenizers: tokenizer.json's own split steps -> llama.cpp's ``tokenizer.ggml.pre``
# ---------------------------------------------------------------------------------------------------
# llama.cpp (src/llama-vocab.cpp, llm_tokenizer_bpe) keeps, for each pre-tokenizer name, the list of regexes
# it splits the text with, in order, before byte-level BPE. A tokenizer.json describes the same thing as its
# ``pre_tokenizer`` steps. Each step is turned into the regex it applies (``Split(Regex, Isolated)`` as is,
# ``ByteLevel(use_regex=true)`` as GPT-2's regex, ``Digits`` as ``\p{N}`` / ``\p{N}+``, ``Punctuation`` as its
# character class) and the list is looked up below, with the BPE flags llama.cpp sets for that name
# (``ignore_merges``: a word found whole in the vocabulary is one token; ``clean_spaces``: detokenizer only).
# The regexes are written as tokenizer.json has them (llama.cpp sometimes keeps an equivalent rewrite: e.g.
# ``(?i:'s|...)`` becomes ``(?:'[sS]|...)`` because its regex engine has no inline flags).

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}"
)
GPT4O_REGEX = (
    _CASED_WORDS.replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = _CASED_WORDS.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SEED_CODER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
EXAONE_MOE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
JAIS2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
    r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
MINICPM5_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
UFAKZEKA_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BLOOM_REGEX = r" ?[^(\s|.,!?…。，、।۔،)]+"
DEEPSEEK3_REGEXES = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
SPARK2_5_REGEXES = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
    r"\p{N}",
)
DEEPSEEK_CODER_REGEXES = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
# tokenizers' Digits(individual_digits) / Punctuation(contiguous) steps, as regexes
DIGIT = r"\p{N}"
DIGITS = r"\p{N}+"
PUNCTUATION_RUN = r"[\p{P}\$\+<=>\^~\|`]+"  # Unicode punctuation plus the ASCII symbols Rust counts as such
GPT2_PRE = "gpt-2"


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp BPE pre-tokenizer: its name and what a tokenizer.json must split with to be it."""

    name: str
    regexes: tuple[str, ...]  # tokenizer.json's split steps, in order, as regexes
    ignore_merges: bool = False  # llama.cpp's ignore_merges for this name
    clean_spaces: bool = True  # llama.cpp's clean_spaces (detokenization only)
    # tokenizer.json steps missing from llama.cpp's list for this name: each must be a no-op for the
    # vocabulary at hand (checked from its merges, see :func:`_check_omitted_digit_split`).
    llama_cpp_omits: tuple[str, ...] = ()


PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt-2", (GPT2_REGEX,)),
    PreTokenizer("llama-bpe", (LLAMA3_REGEX,), ignore_merges=True),
    PreTokenizer("dbrx", (LLAMA3_REGEX,)),
    PreTokenizer("jais-2", (JAIS2_REGEX,)),
    PreTokenizer("qwen2", (QWEN2_REGEX,), clean_spaces=False),
    PreTokenizer("stablelm2", (QWEN2_REGEX,)),
    PreTokenizer("qwen35", (QWEN35_REGEX,), clean_spaces=False),
    PreTokenizer("starcoder", (DIGIT, GPT2_REGEX)),
    PreTokenizer("smollm", (DIGIT, GPT2_REGEX), clean_spaces=False),
    PreTokenizer(
        "falcon", (PUNCTUATION_RUN, GPT2_REGEX, DIGITS, "[0-9][0-9][0-9]"), llama_cpp_omits=(DIGITS,)
    ),
    PreTokenizer("gpt-4o", (GPT4O_REGEX,), clean_spaces=False),
    PreTokenizer("tekken", (TEKKEN_REGEX,), ignore_merges=True, clean_spaces=False),
    PreTokenizer("seed-coder", (SEED_CODER_REGEX,), clean_spaces=False),
    PreTokenizer("exaone-moe", (EXAONE_MOE_REGEX,)),
    PreTokenizer("minicpm5", (r"\p{N}{1,3}", MINICPM5_REGEX), ignore_merges=True),
    PreTokenizer("ufakzeka", (UFAKZEKA_REGEX,), clean_spaces=False),
    PreTokenizer("bloom", (BLOOM_REGEX,)),
    PreTokenizer("poro-chat", (BLOOM_REGEX,), clean_spaces=False),
    PreTokenizer("viking", (BLOOM_REGEX, DIGIT), clean_spaces=False),
    PreTokenizer("deepseek-v3", DEEPSEEK3_REGEXES, clean_spaces=False),
    PreTokenizer("deepseek-coder", DEEPSEEK_CODER_REGEXES, clean_spaces=False),
    PreTokenizer("spark2_5", SPARK2_5_REGEXES, clean_spaces=False),
    PreTokenizer("laguna", (r"[^\n]+|[\n]+", QWEN2_REGEX), clean_spaces=False),
    PreTokenizer("tiny_aya", (r"\d{1,3}(?=(?:\d{3})*\b)", GPT4O_REGEX), clean_spaces=False),
)
# Kept for callers of the previous API: the single-regex Split+ByteLevel forms.
_SPLIT_REGEX_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def _canonical_regex(pattern: str) -> str:
    """A regex as tokenizer.json writes it, with control characters spelled as escapes (``\\r``, ``\\n``)."""
    return pattern.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")


def pre_tokenizer_regexes(tok_json: dict[str, Any], where: str) -> list[str]:
    """The regexes a byte-level tokenizer.json's pre-tokenizer splits with, in order; a ConversionError for a
    step that has none (or is not a plain isolating split)."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = _steps(pre)
    regexes: list[str] = []
    for i, step in enumerate(steps):
        kind = step.get("type")
        if kind == "ByteLevel":
            if any(s.get("type") == "ByteLevel" for s in steps[i + 1 :]):
                raise ConversionError(f"{where}: more than one ByteLevel pre-tokenizer step")
            if step.get("add_prefix_space"):
                raise ConversionError(
                    f"{where}: ByteLevel(add_prefix_space=true) is not supported by llama.cpp (a space "
                    "before every text)"
                )
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            behavior = str(step.get("behavior", "")).lower()
            if "Regex" not in pattern or behavior != "isolated" or step.get("invert"):
                raise ConversionError(
                    f"{where}: pre-tokenizer step {json.dumps(step)[:200]} is not supported by llama.cpp "
                    "(its splits keep each match as its own piece: Split(Regex, Isolated, invert=false))"
                )
            regexes.append(_canonical_regex(str(pattern["Regex"])))
        elif kind == "Digits":
            regexes.append(DIGIT if step.get("individual_digits") else DIGITS)
        elif kind == "Punctuation" and str(step.get("behavior", "isolated")).lower() == "contiguous":
            regexes.append(PUNCTUATION_RUN)
        else:
            raise ConversionError(
                f"{where}: pre-tokenizer step {json.dumps(step)[:200]} has no llama.cpp equivalent"
            )
    if not any(s.get("type") == "ByteLevel" for s in steps):
        raise ConversionError(f"{where}: a byte-level BPE tokenizer needs a ByteLevel pre-tokenizer step")
    return regexes


def detect_pre_tokenizer(tok_json: dict[str, Any], where: str, *, clean_up_spaces: bool | None = None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or a ConversionError saying why
    there is none: the split regexes (in order) and the BPE ``ignore_merges`` flag must be llama.cpp's.

    ``clean_up_spaces`` (tokenizer_config.json's ``clean_up_tokenization_spaces``) picks between names that
    differ only in that detokenizer setting.
    """
    regexes = tuple(pre_tokenizer_regexes(tok_json, where))
    model = tok_json.get("model") or {}
    ignore_merges = bool(model.get("ignore_merges", False))
    same_regexes = [p for p in PRE_TOKENIZERS if p.regexes == regexes]
    same_flags = [p for p in same_regexes if p.ignore_merges == ignore_merges]
    if same_flags:
        if clean_up_spaces is not None:
            same_flags.sort(key=lambda p: p.clean_spaces != clean_up_spaces)
        chosen = same_flags[0]
        if chosen.llama_cpp_omits:
            _check_omitted_digit_split(model, where, chosen)
        return chosen.name
    if same_regexes:
        raise ConversionError(
            f"{where}: model.ignore_merges={str(ignore_merges).lower()} but llama.cpp's "
            f"{same_regexes[0].name!r} pre-tokenizer (the one with these split regexes) uses "
            f"ignore_merges={str(same_regexes[0].ignore_merges).lower()}: words would split differently"
        )
    shown = json.dumps(tok_json.get("pre_tokenizer"))[:300]
    hint = ""
    if regexes:
        joined = "|".join(regexes)
        closest = max(
            PRE_TOKENIZERS, key=lambda p: difflib.SequenceMatcher(None, "|".join(p.regexes), joined).ratio()
        )
        hint = f"; its split regexes are closest to llama.cpp's {closest.name!r}"
    raise ConversionError(
        f"{where}: pre-tokenizer not supported by llama.cpp: {shown}: no llama.cpp pre-tokenizer splits with "
        f"these regexes{hint}"
    )


def _is_numeric(ch: str) -> bool:
    import unicodedata

    return unicodedata.category(ch) in ("Nd", "Nl", "No")  # Rust's char::is_numeric (tokenizers' Digits)


def _check_omitted_digit_split(model: dict[str, Any], where: str, pre: PreTokenizer) -> None:
    """tokenizer.json splits digit runs from what surrounds them (``Digits`` after ``ByteLevel``);
    llama.cpp's ``pre.name`` does not. That changes nothing iff no merge joins a digit to a non-digit (BPE
    then never forms a token across that boundary), which holds for a vocabulary trained with the split."""
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left and right and _is_numeric(left[-1]) != _is_numeric(right[0]):
            raise ConversionError(
                f"{where}: the merge {left!r} + {right!r} joins a digit and a non-digit, which the "
                f"tokenizer's Digits step forbids; llama.cpp's {pre.name!r} pre-tokenizer has no such step, "
                "so its ids would differ"
            )


SPECIAL_KINDS = ("bos", "eos", "pad", "unk")


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE), "llama" (SentencePiece BPE) or "t5" (SentencePiece unigram)
    pre: str | None  # llama.cpp pre-tokenizer name (byte-level BPE only)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/pad/unk -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None
    scores: list[float] | None = None  # SentencePiece-style: merge priority per token
    add_space_prefix: bool | None = None  # SentencePiece-style: prepend "▁" to the text
    remove_extra_whitespaces: bool | None = None  # unigram ("t5"): collapse runs of spaces
    precompiled_charsmap: bytes | None = None  # unigram ("t5"): SentencePiece's normalization table

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.precompiled_charsmap:
            writer.add_precompiled_charsmap(self.precompiled_charsmap)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "pad": writer.add_pad_token_id,
            "unk": writer.add_unk_token_id,
        }
        for kind, tid in self.special_ids.items():
            adders[kind](tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config/special_tokens_map: a string, an AddedToken dict or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _is_byte_level(tok_json: dict[str, Any]) -> bool:
    def has_bytelevel(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_bytelevel(n) for n in node.get("pretokenizers", []) + node.get("decoders", []))

    return has_bytelevel(tok_json.get("pre_tokenizer")) and has_bytelevel(tok_json.get("decoder"))


def _template_adds(tok_json: dict[str, Any], token: str | None) -> bool:
    """Whether the post-processor's single-sequence template inserts ``token``."""
    if token is None:
        return False
    post = tok_json.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in posts:
        if p.get("type") == "TemplateProcessing":
            for piece in p.get("single", []):
                if (piece.get("SpecialToken") or {}).get("id") == token:
                    return True
    return False


def _template_leading_special(tok_json: dict[str, Any]) -> str | None:
    """The special token the post-processor's single-sequence template puts before the text, if any."""
    post = tok_json.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in posts:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0] if single else {}
            return (first.get("SpecialToken") or {}).get("id")
    return None


def load_chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_config.get("chat_template")
    if tmpl:
        return tmpl
    cj = model_dir / "chat_template.json"
    if cj.is_file():
        return _read_json(cj).get("chat_template")
    return None


SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _steps(node: Any) -> list[dict[str, Any]]:
    """The steps of a normalizer / pre-tokenizer / decoder node (a Sequence or a single step)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [n for n in inner if isinstance(n, dict)]
    return [node]


def _is_spm_bpe(tok_json: dict[str, Any]) -> bool:
    """SentencePiece-style BPE: byte fallback, no byte-level pre-tokenizer or decoder."""
    model = tok_json.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not _is_byte_level(tok_json)


def spm_space_prefix(tok_json: dict[str, Any], where: str) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" to the text (llama.cpp add_space_prefix).

    Accepted shapes, as real checkpoints ship them: the legacy normalizer ``Sequence[Prepend("▁"),
    Replace(" ", "▁")]`` (Llama 1/2, Mistral, Mixtral, Phi-3), ``Replace(" ", "▁")`` alone (Gemma 1/2, no
    prefix), the same with a ``Split(" ", MergedWithPrevious)`` pre-tokenizer (Gemma 3 and transformers 5's
    GemmaTokenizer: a no-op, as the normalizer has already replaced every space), or a ``Metaspace("▁")``
    pre-tokenizer (transformers 5's LlamaTokenizer).
    """
    norm = _steps(tok_json.get("normalizer"))
    pre = _steps(tok_json.get("pre_tokenizer"))
    prefix = False
    replaces_space = False
    for step in norm:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPM_SPACE:
            prefix = True
        elif (
            kind == "Replace"
            and (step.get("pattern") or {}).get("String") == " "
            and step.get("content") == SPM_SPACE
        ):
            replaces_space = True
        else:
            raise ConversionError(
                f"{where}: normalizer step {json.dumps(step)[:200]} has no llama.cpp equivalent "
                "(supported: Prepend('▁'), Replace(' ', '▁'))"
            )
    for step in pre:
        kind = step.get("type")
        if kind == "Split" and (step.get("pattern") or {}).get("String") == " " and replaces_space:
            continue  # splits on spaces the normalizer has already replaced: nothing left to split
        if kind != "Metaspace" or step.get("replacement", SPM_SPACE) != SPM_SPACE:
            raise ConversionError(
                f"{where}: pre-tokenizer {json.dumps(step)[:200]} is not supported for a SentencePiece-style "
                "tokenizer (supported: none, Metaspace('▁'), or Split(' ') after a Replace(' ', '▁') "
                "normalizer)"
            )
        replaces_space = True
        if step.get("split", True):
            _check_metaspace_split(tok_json, where)
        scheme = step.get("prepend_scheme")
        if scheme is None:  # tokenizers < 0.14
            scheme = "always" if step.get("add_prefix_space", True) else "never"
        if scheme == "first":
            log.warning(
                "%s: Metaspace(prepend_scheme='first') adds '▁' only at the start of the input; llama.cpp "
                "(like SentencePiece) also adds it after special tokens, so ids can differ right after them",
                where,
            )
        prefix = prefix or scheme in ("always", "first")
    if not replaces_space:
        raise ConversionError(
            f"{where}: a byte-fallback BPE tokenizer without Replace(' ', '▁') or Metaspace is not supported"
        )
    return prefix


def _check_metaspace_split(tok_json: dict[str, Any], where: str) -> None:
    """``Metaspace(split=true)`` cuts the text before every "▁", so no token can hold a "▁" after its first
    character; llama.cpp does not cut, which is the same only if the vocabulary has no such token."""
    vocab = (tok_json.get("model") or {}).get("vocab") or {}
    pieces = vocab if isinstance(vocab, dict) else [v[0] for v in vocab]
    bad = next((t for t in pieces if SPM_SPACE in t[1:]), None)
    if bad is not None:
        raise ConversionError(
            f"{where}: Metaspace(split=true) never lets a token hold '▁' after its first character, but the "
            f"vocabulary has {bad!r}; llama.cpp would use it, so ids would differ"
        )


def _spm_scores(vocab: dict[str, int], merges: list[Any], n_vocab: int) -> list[float]:
    """llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation has the highest score:
    score = -(rank of the first merge producing the token). Tokens no merge produces (characters, bytes,
    added tokens) rank below every merge: HF never forms them by merging, so llama.cpp should do it last."""
    scores = [-float(len(merges) + 1)] * n_vocab
    done: set[int] = set()
    for rank, merge in enumerate(merges):
        # a "left right" string (tokenizers < 0.20) or a [left, right] pair
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        tid = vocab.get("".join(pair))
        if tid is not None and tid not in done and tid < n_vocab:
            scores[tid] = -float(rank + 1)
            done.add(tid)
    return scores


def _is_spm_unigram(tok_json: dict[str, Any]) -> bool:
    model = tok_json.get("model") or {}
    return model.get("type") == "Unigram" and not _is_byte_level(tok_json)


@dataclass
class _Base:
    """The tokenizer-specific half of a :class:`Vocab`: tokens by id, their types and scores."""

    model: str
    pre: str | None
    by_id: dict[int, tuple[str, int]]
    merges: list[str]
    scores_by_id: dict[int, float] | None
    add_space_prefix: bool | None
    where: str
    post_json: dict[str, Any]  # tokenizer.json (for its post-processor), {} for a tokenizer.model
    default_special: dict[str, int]  # ids a tokenizer.model names (trainer_spec), used when nothing else does
    default_add_bos: bool = False
    remove_extra_whitespaces: bool | None = None
    precompiled_charsmap: bytes | None = None


def _check_byte_tokens(present: set[str], where: str) -> None:
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in present]
    if missing:
        raise ConversionError(
            f"{where}: byte_fallback is on but {len(missing)} byte tokens are missing from the "
            f"vocabulary (e.g. {missing[0]})"
        )


def _warn_unigram_byte_fallback(where: str) -> None:
    log.warning(
        "%s: unigram model with byte fallback: written as llama.cpp's SentencePiece ('llama') tokenizer, "
        "which keeps the byte fallback (llama.cpp's unigram tokenizer has none: newlines, emoji and other "
        "characters missing from the vocabulary would become <unk>) but merges pieces greedily by score "
        "instead of the unigram Viterbi search, so many words split differently from SentencePiece "
        "(transformers' LlamaTokenizer builds BPE merges from a .model and splits them as llama.cpp does)",
        where,
    )


_COLLAPSE_SPACES = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}


def unigram_normalization(tok_json: dict[str, Any], where: str) -> tuple[bool, bool, bytes | None]:
    """(add_space_prefix, remove_extra_whitespaces, precompiled_charsmap) of a SentencePiece-style Unigram
    tokenizer.json: ``Precompiled`` steps (SentencePiece's normalization table, which llama.cpp's unigram
    tokenizer applies itself), a ``Replace(" {2,}", " ")`` step (whitespace collapsing), and the "▁" steps
    that :func:`spm_space_prefix` accepts."""
    import base64

    norm = tok_json.get("normalizer")
    charsmap: bytes | None = None
    collapse = False
    rest: list[dict[str, Any]] = []
    for step in _steps(norm):
        if step.get("type") == "Precompiled":
            raw = step.get("precompiled_charsmap") or ""
            try:
                charsmap = base64.b64decode(raw) if isinstance(raw, str) else bytes(raw)
            except (ValueError, TypeError) as e:
                raise ModelError(f"{where}: unreadable precompiled_charsmap: {e}") from e
        elif step == _COLLAPSE_SPACES:
            collapse = True
        else:
            rest.append(step)
    stripped = dict(tok_json, normalizer={"type": "Sequence", "normalizers": rest} if rest else None)
    return spm_space_prefix(stripped, where), collapse, charsmap or None


def _from_tokenizer_json(
    tj_path: Path, tok_json: dict[str, Any], tok_config: dict[str, Any] | None = None
) -> _Base:
    where = str(tj_path)
    model = tok_json.get("model") or {}
    normal = int(gguf.TokenType.NORMAL)
    added = tok_json.get("added_tokens") or []
    if _is_spm_unigram(tok_json):
        pieces = model.get("vocab") or []
        try:
            vocab_u = [(str(t), float(sc)) for t, sc in pieces]
        except (TypeError, ValueError) as e:
            raise ModelError(f"{where}: malformed Unigram vocabulary: {e}") from e
        byte_fallback = bool(model.get("byte_fallback"))
        by_id: dict[int, tuple[str, int]] = {}
        scores: dict[int, float] = {}
        for i, (t, sc) in enumerate(vocab_u):
            kind = int(gguf.TokenType.BYTE) if byte_fallback and _BYTE_TOKEN.fullmatch(t) else normal
            by_id[i] = (t, kind)
            scores[i] = sc
        unk_id = model.get("unk_id")
        default_unk: dict[str, int] = {}
        if isinstance(unk_id, int) and unk_id in by_id:
            by_id[unk_id] = (by_id[unk_id][0], int(gguf.TokenType.UNKNOWN))
            default_unk["unk"] = unk_id
        for a in added:
            kind = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
            if int(a["id"]) == unk_id:
                kind = gguf.TokenType.UNKNOWN
            by_id[int(a["id"])] = (a["content"], int(kind))
            scores[int(a["id"])] = 0.0
        if byte_fallback:
            _check_byte_tokens({t for t, _ in vocab_u}, where)
            _warn_unigram_byte_fallback(where)
            return _Base(
                model="llama",
                pre=None,
                by_id=by_id,
                merges=[],
                scores_by_id=scores,
                add_space_prefix=spm_space_prefix(tok_json, where),
                where=where,
                post_json=tok_json,
                default_special=default_unk,
            )
        prefix, collapse, charsmap = unigram_normalization(tok_json, where)
        return _Base(
            model="t5",
            pre=None,
            by_id=by_id,
            merges=[],
            scores_by_id=scores,
            add_space_prefix=prefix,
            where=where,
            post_json=tok_json,
            default_special=default_unk,
            remove_extra_whitespaces=collapse,
            precompiled_charsmap=charsmap,
        )

    spm = _is_spm_bpe(tok_json)
    if model.get("type") != "BPE" or not (spm or _is_byte_level(tok_json)):
        raise ConversionError(
            f"{tj_path}: unsupported tokenizer (model type {model.get('type')!r}); supported: "
            "byte-level BPE, SentencePiece-style BPE with byte fallback and SentencePiece-style Unigram"
        )
    pre = None
    if not spm:
        _check_byte_level_bpe(tok_json, where)
        clean_up = (tok_config or {}).get("clean_up_tokenization_spaces")
        pre = detect_pre_tokenizer(
            tok_json, where, clean_up_spaces=clean_up if isinstance(clean_up, bool) else None
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    by_id = {}
    for t, i in vocab.items():
        kind = int(gguf.TokenType.BYTE) if spm and _BYTE_TOKEN.fullmatch(t) else normal
        by_id[i] = (t, kind)
    for a in added:
        kind = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(a["id"])] = (a["content"], int(kind))
    if spm and model.get("unk_token") in vocab:
        by_id[vocab[model["unk_token"]]] = (model["unk_token"], int(gguf.TokenType.UNKNOWN))
    if spm:
        _check_byte_tokens(set(vocab), where)
    merges = [] if spm else [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    scores_by_id = None
    if spm:
        n = max(by_id, default=-1) + 1
        scores_by_id = dict(enumerate(_spm_scores(vocab, model.get("merges") or [], n)))
    return _Base(
        model="llama" if spm else "gpt2",
        pre=pre,
        by_id=by_id,
        merges=merges,
        scores_by_id=scores_by_id,
        add_space_prefix=spm_space_prefix(tok_json, where) if spm else None,
        where=where,
        post_json=tok_json,
        default_special={"unk": vocab[model["unk_token"]]} if spm and model.get("unk_token") in vocab else {},
    )


def _check_byte_level_bpe(tok_json: dict[str, Any], where: str) -> None:
    """What llama.cpp's byte-level BPE ("gpt2") does besides its pre-tokenizer: no normalization (NFC is let
    through, see below), plain merges (no dropout, no subword prefix or suffix, no byte fallback)."""
    model = tok_json.get("model") or {}
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ConversionError(f"{where}: model.{key}={model[key]!r} is not supported by llama.cpp")
    if model.get("dropout"):
        raise ConversionError(f"{where}: model.dropout={model['dropout']} (BPE dropout) is not supported")
    if model.get("byte_fallback"):
        raise ConversionError(f"{where}: byte_fallback=true with a byte-level pre-tokenizer is not supported")
    for step in _steps(tok_json.get("normalizer")):
        if step.get("type") == "NFC":
            # Qwen2/3, GPT-NeoX: llama.cpp applies no Unicode normalization. Text that is already NFC (what
            # keyboards, editors and the web produce) gets the same ids; decomposed text does not.
            log.info(
                "%s: NFC normalizer: llama.cpp does not normalize, ids match on NFC text (decomposed "
                "accents such as 'e' + U+0301 tokenize differently)",
                where,
            )
            continue
        raise ConversionError(
            f"{where}: normalizer {json.dumps(step)[:200]} has no llama.cpp equivalent for byte-level BPE"
        )


# sentencepiece_model.proto's piece types have the same numbers as gguf.TokenType (NORMAL=1 ... BYTE=6).
_SP_TYPES = {int(t) for t in gguf.TokenType}


def _from_sentencepiece_model(sp_path: Path, tok_config: dict[str, Any]) -> _Base:
    """A SentencePiece ``tokenizer.model`` (protobuf), parsed with the schema shipped by ``sentencepiece``."""
    where = str(sp_path)
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ConversionError(
            f"{where}: reading a SentencePiece tokenizer.model needs the 'sentencepiece' package ({e})"
        ) from e
    from google.protobuf.message import DecodeError

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_path.read_bytes())
    except (OSError, DecodeError) as e:
        raise ModelError(f"{where} is not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise ModelError(f"{where} is not a SentencePiece model (no pieces)")
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    kind_name = sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type) if trainer.model_type else "UNIGRAM"
    if kind_name not in ("UNIGRAM", "BPE"):
        raise ConversionError(
            f"{where}: SentencePiece model type {kind_name} has no llama.cpp tokenizer "
            "(supported: BPE, UNIGRAM)"
        )
    # llama.cpp's unigram tokenizer (exact Viterbi) only when no byte fallback is needed; see the module doc
    unigram = kind_name == "UNIGRAM" and not trainer.byte_fallback
    if trainer.treat_whitespace_as_suffix:
        raise ConversionError(f"{where}: treat_whitespace_as_suffix=true is not supported")
    if norm.remove_extra_whitespaces and not unigram:
        log.warning(
            "%s: remove_extra_whitespaces=true: SentencePiece collapses runs of spaces, llama.cpp does not; "
            "ids differ on text with repeated, leading or trailing spaces",
            where,
        )
    if not unigram and (norm.precompiled_charsmap or norm.name not in ("", "identity")):
        log.warning(
            "%s: normalization rule %r is not applied by llama.cpp's 'llama' tokenizer: ids differ on "
            "text that the rule changes (e.g. full-width or compatibility characters under NFKC)",
            where,
            norm.name or "custom",
        )
    if kind_name == "UNIGRAM" and trainer.byte_fallback:
        _warn_unigram_byte_fallback(where)
    by_id: dict[int, tuple[str, int]] = {}
    scores: dict[int, float] = {}
    for i, piece in enumerate(proto.pieces):
        ptype = int(piece.type) if int(piece.type) in _SP_TYPES else int(gguf.TokenType.NORMAL)
        by_id[i] = (piece.piece, ptype)
        scores[i] = float(piece.score)
    if trainer.byte_fallback:
        _check_byte_tokens({p.piece for p in proto.pieces}, where)
    # Tokens transformers added on top of the .model (tokenizer_config.json's added_tokens_decoder).
    for sid, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        try:
            tid, text = int(sid), _token_text(entry)
        except (TypeError, ValueError):
            continue
        if text is None or (tid in by_id and by_id[tid][0] == text):
            continue
        special = isinstance(entry, dict) and entry.get("special")
        by_id[tid] = (text, int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        scores[tid] = 0.0
    default_special = {
        kind: int(tid)
        for kind, tid in (
            ("bos", trainer.bos_id),
            ("eos", trainer.eos_id),
            ("pad", trainer.pad_id),
            ("unk", trainer.unk_id),
        )
        if 0 <= int(tid) < len(proto.pieces)
    }
    return _Base(
        model="t5" if unigram else "llama",
        pre=None,
        by_id=by_id,
        merges=[],
        scores_by_id=scores,
        add_space_prefix=bool(norm.add_dummy_prefix),
        where=where,
        post_json={},
        default_special=default_special,
        # transformers' LlamaTokenizer adds BOS by default; a SentencePiece model with a BOS piece expects it
        default_add_bos="bos" in default_special,
        remove_extra_whitespaces=bool(norm.remove_extra_whitespaces) if unigram else None,
        precompiled_charsmap=bytes(norm.precompiled_charsmap) or None if unigram else None,
    )


def load_vocab(model_dir: Path, config: dict[str, Any], n_vocab: int) -> Vocab:
    """The folder's tokenizer as a :class:`Vocab` of exactly ``n_vocab`` tokens (the embedding rows)."""
    tj_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tc_path, stm_path = model_dir / "tokenizer_config.json", model_dir / "special_tokens_map.json"
    tok_config = _read_json(tc_path) if tc_path.is_file() else {}
    stm = _read_json(stm_path) if stm_path.is_file() else {}
    if tj_path.is_file():
        base = _from_tokenizer_json(tj_path, _read_json(tj_path), tok_config)
    elif sp_path.is_file():
        base = _from_sentencepiece_model(sp_path, tok_config)
    else:
        raise ModelError(
            f"no tokenizer in {model_dir}: tokenizer.json (or a SentencePiece tokenizer.model) is missing"
        )
    by_id, where = base.by_id, base.where
    spm = base.model in ("llama", "t5")
    if not by_id:
        raise ModelError(f"{where} has an empty vocabulary")
    if max(by_id) >= n_vocab:
        raise ConversionError(
            f"{where} has token id {max(by_id)} but the model's embedding has only {n_vocab} rows"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", int(gguf.TokenType.UNUSED)))
        tokens.append(text)
        types.append(kind)
    scores = None
    if base.scores_by_id is not None:
        floor = min(base.scores_by_id.values(), default=0.0) - 1.0
        scores = [base.scores_by_id.get(i, floor) for i in range(n_vocab)]

    # Special tokens: tokenizer_config.json, then special_tokens_map.json, then config.json ids.
    # (transformers 5 loads mistral / mixtral / phi3 checkpoints with the tokenizer.json as it is)
    llama_class = str(tok_config.get("tokenizer_class") or "").removesuffix("Fast") == "LlamaTokenizer" and (
        config.get("model_type") in (None, "llama")
    )
    if spm and base.add_space_prefix and llama_class and tok_config.get("legacy") is not True:
        # transformers' LlamaTokenizer class (legacy=false, its default) runs its own Metaspace pipeline
        # instead of the file's: "▁" only at the very start of the input. llama.cpp, like SentencePiece and
        # the legacy normalizer in tokenizer.json, also prefixes the text after each special token.
        log.warning(
            "%s: tokenizer_class LlamaTokenizer with legacy=false: transformers then prefixes '▁' only at "
            "the start of the input; llama.cpp, like SentencePiece and this tokenizer.json, also after "
            "special tokens inside the text (e.g. '<s>[INST]') and before a leading space: ids differ there",
            tc_path,
        )
    text_to_id = {t: i for i, (t, _) in sorted(by_id.items(), reverse=True)}
    special_ids: dict[str, int] = {}
    special_text: dict[str, str | None] = {}
    for kind in SPECIAL_KINDS:
        key = f"{kind}_token"
        if key in tok_config or key in stm:
            text = _token_text(tok_config[key] if key in tok_config else stm[key])
            special_text[kind] = text
            if text is None:
                continue
            if text not in text_to_id:
                raise ConversionError(
                    f"{tc_path if key in tok_config else stm_path}: {key} {text!r} is not in the vocabulary"
                )
            special_ids[kind] = text_to_id[text]
        else:
            cid = config.get(f"{kind}_token_id")
            if isinstance(cid, list):
                cid = cid[0] if cid else None
            if not (isinstance(cid, int) and 0 <= cid < n_vocab):
                cid = base.default_special.get(kind)
            if cid is not None:
                special_ids[kind] = cid
                special_text[kind] = tokens[cid]

    leading = _template_leading_special(base.post_json)
    if special_text.get("bos") is None and "bos" in special_text and leading in text_to_id:
        # bos_token null, yet the post-processor puts a special token first (SmolLM3's <|begin_of_text|>):
        # transformers inserts it, so llama.cpp must know it as its BOS (as gguf-py's SpecialVocab does)
        special_text["bos"], special_ids["bos"] = leading, text_to_id[leading]
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        add_bos = _template_adds(base.post_json, special_text.get("bos")) or (
            base.default_add_bos and "bos" in special_ids
        )
    add_eos = tok_config.get("add_eos_token")
    if add_eos is None:
        add_eos = _template_adds(base.post_json, special_text.get("eos"))

    if add_bos and "bos" not in special_ids:
        log.warning("%s asks to add a BOS token but names none; llama.cpp will not add one", tc_path)
        add_bos = False
    return Vocab(
        model=base.model,
        pre=base.pre,
        tokens=tokens,
        types=types,
        merges=base.merges,
        special_ids=special_ids,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=load_chat_template(model_dir, tok_config),
        scores=scores,
        add_space_prefix=base.add_space_prefix,
        remove_extra_whitespaces=base.remove_extra_whitespaces,
        precompiled_charsmap=base.precompiled_charsmap,
    )
