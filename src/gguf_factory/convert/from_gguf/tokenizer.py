"""GGUF ``tokenizer.ggml.*`` -> a Hugging Face tokenizer that gives llama.cpp's ids, built with
``tokenizers``.

The target is what llama.cpp does with the file (src/llama-vocab.cpp is the fact source), so that the
rebuilt checkpoint and the GGUF agree token for token:

* ``gpt2`` (byte-level BPE): the merges in rank order, and the pre-tokenizer llama.cpp runs for
  ``tokenizer.ggml.pre``: its split regexes in order (the table the forward converter detects names with,
  :data:`gguf_factory.convert.vocab.PRE_TOKENIZERS`, less the steps llama.cpp omits), then byte-level
  encoding; ``ignore_merges`` and ``clean_up_tokenization_spaces`` as llama.cpp sets them for that name. A
  missing or unknown name is refused: llama.cpp would split with different regexes, ids would differ.
* ``llama`` (SentencePiece): llama.cpp merges the adjacent pair whose concatenation is a token with the
  highest score (leftmost first), then falls back to ``<0xXX>`` byte tokens. That is BPE with one merge per
  way of splitting a token into two tokens, ranked by the token's score; spaces become "▁" and, with
  ``add_space_prefix``, every piece of text (the input, and the text after each special token) gets a
  leading "▁", as llama.cpp does.
* ``t5`` (SentencePiece unigram): Unigram with the pieces' scores and llama.cpp's normalization
  (SentencePiece's ``precompiled_charsmap``, optional whitespace collapsing, the "▁" prefix).

Control and unknown tokens become special added tokens (matched whole, never split), user-defined tokens
non-special added tokens (llama.cpp matches those even in plain text); per-token whitespace stripping
follows llama.cpp's name-based rules (Phi-3). BOS/EOS insertion is written into the post-processor, which
is what transformers uses, and mirrored in tokenizer_config.json's ``add_bos_token``/``add_eos_token``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ConversionError, ModelError
from ..vocab import DIGIT, DIGITS, GPT2_REGEX, PRE_TOKENIZERS, PreTokenizer, _check_omitted_digit_split
from .source import VT, GGUFSource

log = logging.getLogger(__name__)

TT = gguf.TokenType
K = gguf.Keys.Tokenizer
SPM_SPACE = "\u2581"
SUPPORTED_MODELS = ("gpt2", "llama", "t5")

# llama.cpp's defaults per tokenizer model when the GGUF has no id / flag (llama_vocab::impl::load).
_DEFAULT_IDS: dict[str, dict[str, int | None]] = {
    "llama": {"bos": 1, "eos": 2, "unk": 0, "pad": None},
    # llama.cpp's byte-level BPE defaults (11) are placeholders, not tokens: only ids the GGUF names
    "gpt2": {"bos": None, "eos": None, "unk": None, "pad": None},
    "t5": {"bos": None, "eos": 1, "unk": 2, "pad": 0},
}
_DEFAULT_ADD: dict[str, tuple[bool, bool]] = {
    "llama": (True, False),
    "gpt2": (False, False),
    "t5": (False, True),
}
# BPE pre-tokenizer names for which llama.cpp turns add_bos on by default.
_ADD_BOS_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "tekken", "chameleon"})
# Texts llama.cpp makes control tokens whatever their type says (its end-of-turn / end-of-generation
# auto-detection in llama_vocab::impl::load).
_LLAMA_CPP_CONTROL_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<|eom_id|>",
        "<end_of_utterance>",
    }
)
_KIND_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "pad": K.PAD_ID}
_SPECIAL_TYPES = (int(TT.CONTROL), int(TT.UNKNOWN))


@dataclass
class RebuiltTokenizer:
    """A ``tokenizers.Tokenizer`` plus the transformers files that go with it."""

    tokenizer: Any  # tokenizers.Tokenizer
    model: str  # the GGUF tokenizer model (gpt2 | llama | t5)
    pre: str | None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json
    special_tokens_map: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: Path) -> None:
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        _write_json(out_dir / "tokenizer_config.json", self.config)
        _write_json(out_dir / "special_tokens_map.json", self.special_tokens_map)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    scores: np.ndarray | None
    ids: dict[str, int]


def _read_vocab(src: GGUFSource, n_vocab: int | None) -> _Vocab:
    where = src.path
    tokens = src.strings(K.LIST)
    if not tokens:
        raise ModelError(f"{where}: {K.LIST} is empty")
    if n_vocab is not None and len(tokens) != n_vocab:
        raise ModelError(
            f"{where}: {K.LIST} has {len(tokens)} tokens but token_embd.weight has {n_vocab} rows"
        )
    types_arr = src.array(K.TOKEN_TYPE, frozenset({VT.INT32}), None)
    if types_arr is None:
        types = [int(TT.NORMAL)] * len(tokens)
    elif len(types_arr) < len(tokens):
        raise ModelError(f"{where}: {K.TOKEN_TYPE} has {len(types_arr)} entries for {len(tokens)} tokens")
    else:
        types = [int(t) for t in types_arr[: len(tokens)]]
    scores = src.array(K.SCORES, frozenset({VT.FLOAT32, VT.INT32}), None)
    if scores is not None:
        if len(scores) < len(tokens):
            raise ModelError(f"{where}: {K.SCORES} has {len(scores)} entries for {len(tokens)} tokens")
        scores = scores[: len(tokens)].astype(np.float32)
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not t:
            raise ModelError(f"{where}: token {i} of {K.LIST} is empty")
        if t in ids:
            raise ModelError(f"{where}: token {t!r} appears twice in {K.LIST} (ids {ids[t]} and {i})")
        ids[t] = i
    for i, t in enumerate(tokens):  # llama.cpp's text-based overrides
        if t in _LLAMA_CPP_CONTROL_TEXTS and types[i] != int(TT.CONTROL):
            types[i] = int(TT.CONTROL)
    return _Vocab(tokens, types, scores, ids)


def rebuild_tokenizer(
    src: GGUFSource, n_vocab: int | None = None, *, model_max_length: int | None = None
) -> RebuiltTokenizer:
    """The GGUF's tokenizer as a Hugging Face tokenizer, or a :class:`ModelError` saying why it cannot be
    rebuilt exactly. ``n_vocab``: the embedding rows the token list must match."""
    model = src.string(K.MODEL)
    if model not in SUPPORTED_MODELS:
        raise ModelError(
            f"{src.path}: tokenizer model {model!r} ({K.MODEL}) cannot be rebuilt; "
            f"supported: {', '.join(SUPPORTED_MODELS)}"
        )
    vocab = _read_vocab(src, n_vocab)
    special_ids = _special_ids(src, model, len(vocab.tokens))
    pre: PreTokenizer | None = None
    if model == "gpt2":
        pre = _pre_tokenizer(src)
        tok = _byte_level_bpe(src, vocab, pre)
    elif model == "llama":
        tok = _spm_bpe(src, vocab, special_ids)
    else:
        tok = _unigram(src, vocab, special_ids)

    add_bos_default, add_eos_default = _DEFAULT_ADD[model]
    if pre is not None and pre.name in _ADD_BOS_PRE:
        add_bos_default = True
    add_bos = src.boolean(K.ADD_BOS, add_bos_default)
    add_eos = src.boolean(K.ADD_EOS, add_eos_default)
    for kind, flag in (("bos", add_bos), ("eos", add_eos)):
        if flag and kind not in special_ids:
            raise ModelError(
                f"{src.path}: tokenizer.ggml.add_{kind}_token is true but there is no {kind} token"
            )

    _add_special_tokens(src, tok, vocab)
    _set_post_processor(tok, model, vocab, special_ids, add_bos, add_eos)
    texts = {kind: vocab.tokens[i] for kind, i in special_ids.items()}
    clean_spaces = pre.clean_spaces if pre is not None else False  # llama.cpp: SPM and UGM keep spaces
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{kind}_token": texts.get(kind) for kind in ("bos", "eos", "unk", "pad")},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": clean_spaces,
        "model_max_length": model_max_length or 1 << 62,
    }
    template = _chat_template(src)
    if template is not None:
        config["chat_template"] = template
    stm = {f"{kind}_token": text for kind, text in texts.items()}
    return RebuiltTokenizer(tok, model, pre.name if pre else None, special_ids, config, stm)


def _special_ids(src: GGUFSource, model: str, n: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, key in _KIND_KEYS.items():
        default = _DEFAULT_IDS[model][kind]
        value = src.integer(key, None)
        if value is not None and not 0 <= value < n:
            log.warning("%s: %s = %d is outside the vocabulary (llama.cpp ignores it)", src.path, key, value)
            value = None
        tid = value if value is not None else default
        if tid is not None and 0 <= tid < n:
            out[kind] = tid
    return out


def _chat_template(src: GGUFSource) -> str | list[dict[str, str]] | None:
    main = src.string(K.CHAT_TEMPLATE, None)
    named = []
    for name in src.strings(K.CHAT_TEMPLATES, []):
        text = src.string(K.CHAT_TEMPLATE_N.format(name=name), None)
        if text is not None:
            named.append({"name": name, "template": text})
    if not named:
        return main
    if main is not None:
        named.insert(0, {"name": "default", "template": main})
    return named


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE ("gpt2")
# ---------------------------------------------------------------------------------------------------


def _pre_tokenizer(src: GGUFSource) -> PreTokenizer:
    name = src.string(K.PRE, None)
    known = {p.name: p for p in PRE_TOKENIZERS}
    if name is None or name == "default":
        raise ModelError(
            f"{src.path}: no {K.PRE}: llama.cpp then splits text with its 'default' regexes, which no "
            "Hugging Face pre-tokenizer is known to reproduce exactly; the tokenizer cannot be rebuilt"
        )
    if name not in known:
        raise ModelError(
            f"{src.path}: {K.PRE} {name!r} is a pre-tokenizer that cannot be rebuilt exactly (its split "
            f"regexes are not known here); known: {', '.join(sorted(known))}"
        )
    return known[name]


def _split_steps(pre: PreTokenizer, merges: list[tuple[str, str]]) -> Any:
    """llama.cpp's split regexes for ``pre`` as tokenizers pre-tokenizer steps, the byte-level mapping last.

    A step llama.cpp omits (Falcon's ``Digits`` after the byte-level mapping) is a no-op for a vocabulary
    none of whose merges joins a digit and a non-digit, the forward converter's own test for accepting the
    omission: it is then put back where the original tokenizer.json had it, so that the rebuilt folder
    converts to GGUF again. Otherwise it stays out (llama.cpp's ids are what count).
    """
    from tokenizers import Regex, pre_tokenizers

    def step(r: str) -> Any:
        if r == DIGIT:
            return pre_tokenizers.Digits(individual_digits=True)
        if r == DIGITS:
            return pre_tokenizers.Digits(individual_digits=False)
        return pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)

    kept = [r for r in pre.llama_cpp_omits if r == DIGITS and _no_digit_merges(pre, merges)]
    regexes = [r for r in pre.regexes if r not in pre.llama_cpp_omits or r in kept]
    if kept and GPT2_REGEX in regexes:  # the tokenizer.json form: the steps after GPT-2's see mapped bytes
        i = regexes.index(GPT2_REGEX)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
        return pre_tokenizers.Sequence([*map(step, regexes[:i]), byte_level, *map(step, regexes[i + 1 :])])
    gpt2_last = bool(regexes) and regexes[-1] == GPT2_REGEX
    steps = [step(r) for r in (regexes[:-1] if gpt2_last else regexes)]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=gpt2_last))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _no_digit_merges(pre: PreTokenizer, merges: list[tuple[str, str]]) -> bool:
    try:
        _check_omitted_digit_split({"merges": merges}, "", pre)
    except ConversionError:
        return False
    return True


def _byte_level_bpe(src: GGUFSource, vocab: _Vocab, pre: PreTokenizer) -> Any:
    from tokenizers import Tokenizer, decoders, models

    merges = _read_merges(src, vocab)
    bpe = models.BPE(
        vocab=dict(vocab.ids), merges=merges, ignore_merges=pre.ignore_merges, byte_fallback=False
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _split_steps(pre, merges)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_merges(src: GGUFSource, vocab: _Vocab) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` split as llama.cpp splits them (at the first space after the first
    character); duplicates keep their first rank, as in llama.cpp's rank table."""
    raw = src.strings(K.MERGES)
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for rank, m in enumerate(raw):
        pos = m.find(" ", 1)
        if pos < 0:
            raise ModelError(f"{src.path}: merge {rank} {m!r} of {K.MERGES} has no space between two tokens")
        pair = (m[:pos], m[pos + 1 :])
        if pair in seen:
            continue
        for part in (*pair, pair[0] + pair[1]):
            if part not in vocab.ids:
                raise ModelError(
                    f"{src.path}: merge {rank} {m!r} uses or makes {part!r}, which is not in {K.LIST}; "
                    "llama.cpp would fall back to byte tokens there, the tokenizer cannot be rebuilt exactly"
                )
        seen.add(pair)
        out.append(pair)
    return out


# ---------------------------------------------------------------------------------------------------
# SentencePiece BPE ("llama")
# ---------------------------------------------------------------------------------------------------


def _spm_merges(src: GGUFSource, vocab: _Vocab) -> list[tuple[str, str]]:
    """One merge per split of a token into two tokens, ranked by the token's score (highest first): what
    llama.cpp's SPM tokenizer does with the scores. A token that llama.cpp can form from a character that is
    not itself a token (it merges any adjacent symbols whose text is a token; transformers turns such a
    character into byte tokens first) is refused."""
    assert vocab.scores is not None
    ids, scores = vocab.ids, vocab.scores
    found: list[tuple[float, int, int, str, str]] = []
    for tid, text in enumerate(vocab.tokens):
        if len(text) < 2:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            in_l, in_r = left in ids, right in ids
            if in_l and in_r:
                found.append((-float(scores[tid]), tid, cut, left, right))
            elif (in_l or len(left) == 1) and (in_r or len(right) == 1):
                char = right if in_l else left
                raise ModelError(
                    f"{src.path}: token {text!r} can be formed by llama.cpp from the character {char!r}, "
                    "which is not a token itself; a Hugging Face BPE cannot reproduce that, the tokenizer "
                    "cannot be rebuilt exactly"
                )
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _spm_bpe(src: GGUFSource, vocab: _Vocab, special_ids: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    if vocab.scores is None:
        raise ModelError(f"{src.path}: a SentencePiece ('llama') tokenizer needs {K.SCORES}")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab.ids]
    if missing:
        raise ModelError(
            f"{src.path}: the SentencePiece vocabulary lacks {len(missing)} of the 256 byte tokens (e.g. "
            f"{missing[0]}), which llama.cpp needs for characters outside the vocabulary"
        )
    merges = _spm_merges(src, vocab)
    unk = special_ids.get("unk")
    tok = Tokenizer(
        models.BPE(
            vocab=dict(vocab.ids),
            merges=merges,
            unk_token=vocab.tokens[unk] if unk is not None else None,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    prefix = src.boolean(K.ADD_PREFIX, True)
    steps = [normalizers.Prepend(SPM_SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tok


# ---------------------------------------------------------------------------------------------------
# SentencePiece unigram ("t5")
# ---------------------------------------------------------------------------------------------------


def _unigram(src: GGUFSource, vocab: _Vocab, special_ids: dict[str, int]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    if vocab.scores is None:
        raise ModelError(f"{src.path}: a unigram ('t5') tokenizer needs {K.SCORES}")
    unk = special_ids.get("unk")
    if unk is None:
        raise ModelError(f"{src.path}: a unigram ('t5') tokenizer needs an unknown token")
    normal = [i for i, t in enumerate(vocab.types) if t == int(TT.NORMAL)]
    if not normal:
        raise ModelError(f"{src.path}: the unigram vocabulary has no normal tokens")
    # llama.cpp scores an unknown character min(normal scores) - 10; tokenizers min(all scores) - 10.
    if float(vocab.scores.min()) < float(vocab.scores[normal].min()):
        raise ModelError(
            f"{src.path}: a non-normal token scores below every normal token, so the unknown-character "
            "penalty of llama.cpp and of a Hugging Face Unigram would differ; cannot be rebuilt exactly"
        )
    pieces = [(t, float(s)) for t, s in zip(vocab.tokens, vocab.scores, strict=True)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=unk, byte_fallback=False))
    steps: list[Any] = []
    charsmap = src.array(K.PRECOMPILED_CHARSMAP, frozenset({VT.UINT8, VT.INT8}), None)
    if charsmap is not None and len(charsmap):
        steps.append(normalizers.Precompiled(charsmap.astype(np.uint8).tobytes()))
    prefix = src.boolean(K.ADD_PREFIX, True)
    merge = src.boolean(K.REMOVE_EXTRA_WS, False)
    if merge:
        # llama.cpp drops leading/trailing spaces, keeps one space between words and puts "▁" before
        # the first word whatever add_space_prefix says.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if prefix or merge:
        # only before the first non-space character: a segment of spaces alone gets no extra "▁" (onig's
        # ^ and $ match at line breaks: \A and \z are the ends of the text)
        steps += [
            normalizers.Prepend(SPM_SPACE),
            normalizers.Replace(Regex(r"\A" + SPM_SPACE + r"(?= *\z)"), ""),
        ]
    steps.append(normalizers.Replace(" ", SPM_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(" ", 1, 0)] if prefix or merge else []
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), *strip])
    return tok


# ---------------------------------------------------------------------------------------------------
# Added tokens and the post-processor
# ---------------------------------------------------------------------------------------------------


def _rstrip_ids(src: GGUFSource, vocab: _Vocab, special: Iterable[int]) -> set[int]:
    """llama.cpp's name-based rule: models named like Phi-3 strip whitespace after their special tokens
    (except <unk>, <s> and <|endoftext|>; </s> always)."""
    name = (src.string(gguf.Keys.General.NAME, "") or "").lower()
    if "phi-3" not in name and "phi3" not in name:
        return set()
    out = set(special)
    if "</s>" in vocab.ids:
        out.add(vocab.ids["</s>"])
    for text in ("<unk>", "<s>", "<|endoftext|>"):
        out.discard(vocab.ids.get(text, -1))
    return out


def _add_special_tokens(src: GGUFSource, tok: Any, vocab: _Vocab) -> None:
    from tokenizers import AddedToken

    special = [i for i, t in enumerate(vocab.types) if t in _SPECIAL_TYPES]
    user = [i for i, t in enumerate(vocab.types) if t == int(TT.USER_DEFINED)]
    rstrip = _rstrip_ids(src, vocab, special + user)
    tok.add_special_tokens(
        [AddedToken(vocab.tokens[i], special=True, normalized=False, rstrip=i in rstrip) for i in special]
    )
    tok.add_tokens(
        [AddedToken(vocab.tokens[i], special=False, normalized=False, rstrip=i in rstrip) for i in user]
    )
    for i in special + user:  # the ids must be the GGUF's: the tokens already sit in the model's vocabulary
        got = tok.token_to_id(vocab.tokens[i])
        if got != i:
            raise ModelError(f"{src.path}: token {vocab.tokens[i]!r} would get id {got} instead of {i}")


def _set_post_processor(
    tok: Any, model: str, vocab: _Vocab, special_ids: dict[str, int], add_bos: bool, add_eos: bool
) -> None:
    from tokenizers import processors

    steps: list[Any] = []
    if model == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    if add_bos or add_eos:
        bos = vocab.tokens[special_ids["bos"]] if add_bos else None
        eos = vocab.tokens[special_ids["eos"]] if add_eos else None
        single = " ".join(p for p in (bos, "$A", eos) if p)
        pair = " ".join(p for p in (bos, "$A", eos, bos, "$B", eos) if p)
        used = {t: vocab.ids[t] for t in (bos, eos) if t}
        steps.append(
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(used.items()))
        )
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
