"""Tiny random-weight checkpoints of every family `convert` supports, shared by the convert tests and
benchmarks/convert.py.

Each builder writes a Hugging Face folder the way the family's real checkpoints ship it: a model from
transformers' own config class (tiny sizes, random weights), and a ``tokenizer.json`` in the exact JSON
layout of the published files (the same normalizer, pre-tokenizer, post-processor, decoder, model flags and
kind of added tokens; see each ``*_tokenizer`` function for the checkpoint it follows) plus a
``tokenizer_config.json`` with the real ``tokenizer_class`` and special tokens. Only the vocabulary is small:
it is trained here, offline, with the ``tokenizers`` library on chatterbot-corpus English lines, with the
family's own pre-tokenizer, so its merges are what that pipeline produces.

The init is scaled up (initializer_range 0.2, weights doubled) so that next-token distributions are peaked
(top-1 probability ~0.25-0.4 instead of ~0.07) and top-1 / greedy comparisons mean something.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    "Numbers: 1234567890 and 3.14159 and 007, 12 345 ½ ²",
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
    "def f(x):\n    return x ** 2  # code",
    "",
]
PARITY_TEXTS = EDGE_TEXTS + ENGLISH[3::97] + [t for lang in OTHER_LANGUAGES for t in corpus_lines(lang)[5:8]]
# Not NFC: "e" + COMBINING ACUTE ACCENT. tokenizers with an NFC normalizer compose it, llama.cpp does not.
DECOMPOSED_TEXT = "Cafe\u0301 re\u0301sume\u0301"

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
TEXT_PROMPTS: list[Any] = [p for p in CHAT_PROMPTS if isinstance(p, str)] + ["Once upon a time, in 1999,"]


# ---------------------------------------------------------------------------------------------------
# Tokenizers, in the layouts real checkpoints ship
# ---------------------------------------------------------------------------------------------------

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _special(*names: str, normalized: bool = False, **kw: Any) -> list[Any]:
    from tokenizers import AddedToken

    return [AddedToken(n, special=True, normalized=normalized, **kw) for n in names]


def train_byte_level(
    pre_tokenizer: Any,
    *,
    normalizer: Any = None,
    vocab_size: int = 600,
    leading_specials: tuple[str, ...] = (),
    ignore_merges: bool = False,
) -> Any:
    """A byte-level BPE trained with ``pre_tokenizer`` (``leading_specials`` get the first ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(leading_specials),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    tok.model.ignore_merges = ignore_merges
    return tok


def gpt2_tokenizer(*, whitespace_tokens: int = 0) -> Any:
    """openai-community/gpt2 (also distilgpt2, DialoGPT): ``ByteLevel(add_prefix_space=false,
    use_regex=true)`` pre-tokenizer, ByteLevel post-processor and decoder, no normalizer,
    ``<|endoftext|>`` last (normalized, special). ``whitespace_tokens``: microsoft/phi-2's CodeGen vocabulary
    adds runs of 2.. spaces as non-special added tokens after it."""
    from tokenizers import AddedToken, decoders, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens(_special("<|endoftext|>", normalized=True))
    if whitespace_tokens:
        tok.add_tokens([AddedToken(" " * n, normalized=True) for n in range(whitespace_tokens + 1, 1, -1)])
    return tok


def llama3_tokenizer(extra_specials: tuple[str, ...] = ()) -> Any:
    """meta-llama/Llama-3.x (also SmolLM3): ``Split(llama-3 regex, Isolated)`` +
    ``ByteLevel(use_regex=false)``, ``ignore_merges: true``, post-processor ``Sequence[ByteLevel,
    TemplateProcessing(<|begin_of_text|> $A)]``, specials after the vocabulary."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        ),
        ignore_merges=True,
    )
    specials = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        *extra_specials,
    )
    tok.add_special_tokens(_special(*specials))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return tok


def qwen_tokenizer(*, think_tokens: bool = False, nfc: bool = True, vocab_size: int = 800) -> Any:
    """Qwen/Qwen2.5 and Qwen3 (also their MoE): NFC normalizer, ``Split(qwen2 regex, Isolated)`` +
    ``ByteLevel(add_prefix_space=false, trim_offsets=false, use_regex=false)``, ByteLevel post-processor and
    decoder, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` after the vocabulary; Qwen3 adds
    ``<think>``/``</think>`` as non-special added tokens. ``nfc=False``: StableLM 2's Arcade100k (the same
    split, no normalizer)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        ),
        normalizer=normalizers.NFC() if nfc else None,
        vocab_size=vocab_size,
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens(_special("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    if think_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tok


def neox_tokenizer() -> Any:
    """EleutherAI/pythia (GPT-NeoX-20B tokenizer): NFC normalizer, ``ByteLevel(add_prefix_space=false,
    trim_offsets=true)`` pre-tokenizer, ``<|endoftext|>`` (0) and ``<|padding|>`` (1) first, and runs of
    spaces as non-special added tokens at the end."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        normalizer=normalizers.NFC(),
        leading_specials=("<|endoftext|>", "<|padding|>"),
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.add_tokens([AddedToken(" " * n, normalized=True) for n in (8, 4, 2)])
    return tok


def starcoder_tokenizer(specials: tuple[str, ...]) -> Any:
    """bigcode/starcoder2 and ibm-granite/granite-3.x: ``Sequence[Digits(individual_digits=true),
    ByteLevel(add_prefix_space=false, use_regex=true)]``, ``specials`` first."""
    from tokenizers import decoders, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        ),
        leading_specials=specials,
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return tok


def falcon_tokenizer() -> Any:
    """tiiuae/falcon-7b: ``Sequence[Punctuation(contiguous), ByteLevel(use_regex=true),
    Digits(individual_digits=false), Split("[0-9][0-9][0-9]", Isolated)]``, the ``>>TITLE<<``-style specials
    and ``<|endoftext|>`` first."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Punctuation(behavior="contiguous"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated", invert=False),
            ]
        ),
        leading_specials=(">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", "<|endoftext|>"),
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return tok


def olmo2_tokenizer() -> Any:
    """allenai/OLMo-2 (the cl100k-based dolma2 tokenizer): the llama-3 split regex + ``ByteLevel(use_regex=
    false)``, BPE merges applied (no ``ignore_merges``: llama.cpp's "dbrx"), specials after the vocabulary."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors

    tok = train_byte_level(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        ),
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens(_special("<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"))
    return tok


def spm_bpe(
    specials: list[str],
    *,
    prefix: bool,
    gemma3: bool = False,
    vocab_size: int = 600,
) -> tuple[Any, dict[str, int], list[tuple[str, str]]]:
    """The vocabulary of a SentencePiece-style BPE with byte fallback: ``specials``, the 256 ``<0xXX>``
    tokens, then pieces learned with "▁" for spaces (at word starts, as SentencePiece pieces are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

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
    return trainer_tok, vocab, merges  # type: ignore[return-value]


def llama2_tokenizer(chat_specials: list[Any] | None = None) -> Any:
    """meta-llama/Llama-2 (also Llama 1, Mistral 7B, Mixtral, Phi-3): BPE with byte fallback and
    ``fuse_unk``, the legacy normalizer ``Sequence[Prepend("▁"), Replace(" ", "▁")]``, no pre-tokenizer,
    post-processor ``TemplateProcessing(<s> $A)``, decoder ``Sequence[Replace("▁", " "), ByteFallback, Fuse,
    Strip(" ", 1, 0)]``; ``<unk>``, ``<s>``, ``</s>`` are ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    specials = ["<unk>", "<s>", "</s>"]
    _, vocab, merges = spm_bpe(specials, prefix=True)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPM_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(_special(*specials))
    if chat_specials:
        tok.add_special_tokens(chat_specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def gemma_tokenizer(*, gemma3: bool) -> Any:
    """google/gemma (1, 2): BPE with byte fallback, normalizer ``Replace(" ", "▁")`` (no prefix), no
    pre-tokenizer, post-processor ``TemplateProcessing(<bos> $A)``, decoder ``Sequence[Replace("▁", " "),
    ByteFallback, Fuse]``; ids 0-4 ``<pad> <eos> <bos> <unk> <mask>``, the turn markers special.
    ``gemma3``: google/gemma-3 adds the ``Split(" ", MergedWithPrevious)`` pre-tokenizer (a no-op after that
    normalizer) and the image markers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    _, vocab, merges = spm_bpe(specials, prefix=False)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    if gemma3:
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(_special(*specials))
    extra = ["<start_of_turn>", "<end_of_turn>"] + (["<start_of_image>", "<end_of_image>"] if gemma3 else [])
    tok.add_special_tokens(_special(*extra))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return tok


def save_tokenizer(tok: Any, out: Path, **config: Any) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"clean_up_tokenization_spaces": False, "model_max_length": 256, **config}, indent=1)
    )


# ---------------------------------------------------------------------------------------------------
# Chat templates (the families' turn formats, written short)
# ---------------------------------------------------------------------------------------------------

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
LLAMA2_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GRANITE_CHAT = (
    "{% for message in messages %}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] "
    "+ '<|end_of_text|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}"
)
OLMO2_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
}


def save_model(out: Path, config: Any, model_cls: Any, seed: int, *, gemma: bool = False) -> None:
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


def build_gpt2(out: Path, *, n_layer: int = 2, chat: bool = False) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=256,
        n_embd=64,
        n_layer=n_layer,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    save_model(out, config, GPT2LMHeadModel, seed=0)
    extra = {"chat_template": DIALOGPT} if chat else {}
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPT2Tokenizer",
        add_prefix_space=False,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        **extra,
    )


def _qwen_config(tok: Any, **kw: Any) -> dict[str, Any]:
    return {
        **SMALL,
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "use_sliding_window": False,
        **kw,
    }


def _save_qwen_tokenizer(tok: Any, out: Path) -> None:
    save_tokenizer(
        tok,
        out,
        tokenizer_class="Qwen2Tokenizer",
        add_prefix_space=False,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        errors="replace",
        split_special_tokens=False,
        chat_template=CHATML,
    )


def build_qwen2(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen_tokenizer()
    save_model(out, Qwen2Config(**_qwen_config(tok, tie_word_embeddings=True)), Qwen2ForCausalLM, seed=1)
    _save_qwen_tokenizer(tok, out)


def build_qwen3(out: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer(think_tokens=True)
    config = Qwen3Config(**_qwen_config(tok, head_dim=32, tie_word_embeddings=True))  # head_dim != 64 / 4
    save_model(out, config, Qwen3ForCausalLM, seed=5)
    _save_qwen_tokenizer(tok, out)


def build_qwen2moe(out: Path) -> None:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = qwen_tokenizer()
    config = Qwen2MoeConfig(
        **_qwen_config(
            tok,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            norm_topk_prob=False,
        )
    )
    save_model(out, config, Qwen2MoeForCausalLM, seed=6)
    _save_qwen_tokenizer(tok, out)


def build_qwen3moe(out: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = qwen_tokenizer(think_tokens=True)
    config = Qwen3MoeConfig(
        **_qwen_config(
            tok,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            norm_topk_prob=True,
        )
    )
    save_model(out, config, Qwen3MoeForCausalLM, seed=7)
    _save_qwen_tokenizer(tok, out)


def _llama_spm_config(tok: Any, **kw: Any) -> dict[str, Any]:
    return {
        **SMALL,
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        **kw,
    }


def _save_llama_spm_tokenizer(tok: Any, out: Path, *, legacy: bool | None, chat: str) -> None:
    extra = {} if legacy is None else {"legacy": legacy}
    save_tokenizer(
        tok,
        out,
        tokenizer_class="LlamaTokenizer",
        add_bos_token=True,
        add_eos_token=False,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=None,
        chat_template=chat,
        **extra,
    )


def build_llama2(out: Path, *, rope: dict[str, Any] | None = None, seed: int = 8) -> None:
    """Llama 2 chat: tokenizer_config says ``legacy: false`` as the published one does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama2_tokenizer()
    kw = {"rope_parameters": {"rope_theta": 10000.0, **rope}} if rope else {}
    save_model(out, LlamaConfig(**_llama_spm_config(tok, **kw)), LlamaForCausalLM, seed=seed)
    _save_llama_spm_tokenizer(tok, out, legacy=False, chat=LLAMA2_CHAT)


def build_llama3(out: Path, *, rope: dict[str, Any] | None = None, seed: int = 9) -> None:
    """Llama 3.2 style: tied embeddings, ``rope_type: llama3`` scaling (or ``rope``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama3_tokenizer()
    rope = rope or {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(
        **{
            **SMALL,
            "vocab_size": tok.get_vocab_size(),
            "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_token_id": tok.token_to_id("<|eot_id|>"),
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 500000.0, **rope},
        }
    )
    save_model(out, config, LlamaForCausalLM, seed=seed)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_input_names=["input_ids", "attention_mask"],
        chat_template=LLAMA3_CHAT,
    )


def build_mistral(out: Path) -> None:
    """Mistral 7B v0.2/v0.3-style config (no sliding window) with its Llama-2-layout tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = llama2_tokenizer()
    config = MistralConfig(**_llama_spm_config(tok, sliding_window=None, rope_parameters={"rope_theta": 1e6}))
    save_model(out, config, MistralForCausalLM, seed=10)
    chat = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    )
    _save_llama_spm_tokenizer(tok, out, legacy=None, chat=chat)


def build_mixtral(out: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = llama2_tokenizer()
    config = MixtralConfig(
        **_llama_spm_config(tok, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    )
    save_model(out, config, MixtralForCausalLM, seed=11)
    _save_llama_spm_tokenizer(tok, out, legacy=None, chat=LLAMA2_CHAT)


def build_phi3(out: Path) -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    # As Phi-3-mini: chat markers strip the whitespace after them (llama.cpp applies the same rule to
    # models named "phi3").
    chat = _special("<|endoftext|>") + _special(
        "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", rstrip=True
    )
    tok = llama2_tokenizer(chat)
    config = Phi3Config(
        **{
            **SMALL,
            "vocab_size": tok.get_vocab_size(),
            "original_max_position_embeddings": 256,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": tok.token_to_id("<|end|>"),
            "pad_token_id": tok.token_to_id("<|endoftext|>"),
            "tie_word_embeddings": False,
        }
    )
    save_model(out, config, Phi3ForCausalLM, seed=2)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="LlamaTokenizer",
        legacy=False,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
        add_eos_token=False,
        chat_template=PHI3,
    )


def _save_gemma_tokenizer(tok: Any, out: Path) -> None:
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GemmaTokenizer",
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
        chat_template=GEMMA,
    )


def _gemma_config(tok: Any, **kw: Any) -> dict[str, Any]:
    return {
        **SMALL,
        "vocab_size": tok.get_vocab_size(),
        "head_dim": 16,
        "pad_token_id": 0,
        "eos_token_id": tok.token_to_id("<end_of_turn>"),
        "bos_token_id": 2,
        **kw,
    }


def build_gemma(out: Path) -> None:
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = gemma_tokenizer(gemma3=False)
    save_model(out, GemmaConfig(**_gemma_config(tok, head_dim=32)), GemmaForCausalLM, seed=12, gemma=True)
    _save_gemma_tokenizer(tok, out)


def build_gemma2(out: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = gemma_tokenizer(gemma3=False)
    config = Gemma2Config(
        **_gemma_config(
            tok,
            query_pre_attn_scalar=24,  # != head_dim: the scale is folded into Q
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
        )
    )
    save_model(out, config, Gemma2ForCausalLM, seed=3, gemma=True)
    _save_gemma_tokenizer(tok, out)


def build_gemma3(out: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = gemma_tokenizer(gemma3=True)
    config = Gemma3TextConfig(
        **_gemma_config(
            tok,
            num_hidden_layers=3,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
        )
    )
    save_model(out, config, Gemma3ForCausalLM, seed=4, gemma=True)
    _save_gemma_tokenizer(tok, out)


def build_phi2(out: Path) -> None:
    from transformers import PhiConfig, PhiForCausalLM

    tok = gpt2_tokenizer(whitespace_tokens=6)
    eot = tok.token_to_id("<|endoftext|>")
    config = PhiConfig(
        **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
        vocab_size=tok.get_vocab_size(),
        partial_rotary_factor=0.5,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    save_model(out, config, PhiForCausalLM, seed=13)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="CodeGenTokenizer",
        add_prefix_space=False,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        return_token_type_ids=False,
    )


def build_gptneox(out: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = neox_tokenizer()
    config = GPTNeoXConfig(
        **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
        vocab_size=tok.get_vocab_size(),
        rotary_pct=0.25,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    save_model(out, config, GPTNeoXForCausalLM, seed=14)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPTNeoXTokenizer",
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_stablelm(out: Path) -> None:
    from transformers import StableLmConfig, StableLmForCausalLM

    tok = qwen_tokenizer(nfc=False)
    config = StableLmConfig(
        **{**SMALL, "num_key_value_heads": 4},
        vocab_size=tok.get_vocab_size(),
        use_qkv_bias=True,
        partial_rotary_factor=0.25,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    save_model(out, config, StableLmForCausalLM, seed=15)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPT2Tokenizer",
        clean_up_tokenization_spaces=True,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_falcon(out: Path) -> None:
    from transformers import FalconConfig, FalconForCausalLM

    tok = falcon_tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    config = FalconConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    save_model(out, config, FalconForCausalLM, seed=16)
    save_tokenizer(
        tok, out, tokenizer_class="PreTrainedTokenizerFast", eos_token="<|endoftext|>", add_prefix_space=False
    )


def build_olmo2(out: Path) -> None:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    tok = olmo2_tokenizer()
    config = Olmo2Config(
        **SMALL,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        tie_word_embeddings=False,
    )
    save_model(out, config, Olmo2ForCausalLM, seed=17)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPT2Tokenizer",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        chat_template=OLMO2_CHAT,
    )


def build_granite(out: Path) -> None:
    from transformers import GraniteConfig, GraniteForCausalLM

    specials = ("<|end_of_text|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>")
    tok = starcoder_tokenizer(specials)
    tok.add_special_tokens(_special("<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"))
    config = GraniteConfig(
        **SMALL,
        vocab_size=tok.get_vocab_size(),
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    save_model(out, config, GraniteForCausalLM, seed=18)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPT2Tokenizer",
        clean_up_tokenization_spaces=True,
        add_prefix_space=False,
        bos_token="<|end_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<|end_of_text|>",
        chat_template=GRANITE_CHAT,
    )


def build_starcoder2(out: Path) -> None:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    tok = starcoder_tokenizer(("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"))
    config = Starcoder2Config(
        **SMALL,
        vocab_size=tok.get_vocab_size(),
        sliding_window=None,
        norm_epsilon=1e-6,  # not the default 1e-5, which a converter that misses the name would write
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    save_model(out, config, Starcoder2ForCausalLM, seed=19)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="GPT2Tokenizer",
        clean_up_tokenization_spaces=True,
        add_prefix_space=False,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_smollm3(out: Path) -> None:
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tok = llama3_tokenizer(extra_specials=("<|im_start|>", "<|im_end|>"))
    config = SmolLM3Config(
        **{**SMALL, "num_hidden_layers": 4},  # layer 4 uses no rope
        vocab_size=tok.get_vocab_size(),
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    save_model(out, config, SmolLM3ForCausalLM, seed=20)
    save_tokenizer(
        tok,
        out,
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHATML,
    )


@dataclass(frozen=True)
class Builder:
    build: Callable[[Path], None]
    chat: bool = True  # the tokenizer has a chat template (prompts may be message lists)


BUILDERS: dict[str, Builder] = {
    "llama2": Builder(build_llama2),
    "llama2-rope-linear": Builder(lambda out: build_llama2(out, rope={"rope_type": "linear", "factor": 4.0})),
    "llama3": Builder(build_llama3),
    "llama3-rope-yarn": Builder(
        lambda out: build_llama3(
            out, rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        )
    ),
    "mistral": Builder(build_mistral),
    "mixtral": Builder(build_mixtral),
    "qwen2": Builder(build_qwen2),
    "qwen2moe": Builder(build_qwen2moe),
    "qwen3": Builder(build_qwen3),
    "qwen3moe": Builder(build_qwen3moe),
    "gemma": Builder(build_gemma),
    "gemma2": Builder(build_gemma2),
    "gemma3": Builder(build_gemma3),
    "phi2": Builder(build_phi2, chat=False),
    "phi3": Builder(build_phi3),
    "gpt2": Builder(build_gpt2, chat=False),
    "distilgpt2": Builder(lambda out: build_gpt2(out, n_layer=3), chat=False),
    "dialogpt": Builder(lambda out: build_gpt2(out, chat=True)),
    "gptneox": Builder(build_gptneox, chat=False),
    "stablelm": Builder(build_stablelm),
    "falcon": Builder(build_falcon, chat=False),
    "olmo2": Builder(build_olmo2),
    "granite": Builder(build_granite),
    "starcoder2": Builder(build_starcoder2, chat=False),
    "smollm3": Builder(build_smollm3),
}


def build(name: str, out: Path) -> Path:
    """Build checkpoint ``name`` into the (new) folder ``out``."""
    out.mkdir(parents=True, exist_ok=False)
    BUILDERS[name].build(out)
    return out


def prompts_for(name: str) -> list[Any]:
    return CHAT_PROMPTS if BUILDERS[name].chat else TEXT_PROMPTS


# ---------------------------------------------------------------------------------------------------
# Parity of one family: build, convert (F32, F16), compare transformers and llama.cpp
# ---------------------------------------------------------------------------------------------------


# Top-1 is measured over >= 1000 positions: 99.9 % then tolerates one near-tie in a thousand rather than
# meaning "no flip at all" on a few hundred positions.
LOGIT_TEXTS = [" ".join(ENGLISH[i : i + 12]) for i in range(40, 40 + 12 * 9, 12)]


@dataclass
class Parity:
    """What the family test asserts and benchmarks/convert.py tabulates."""

    name: str
    hf_dir: Path
    f32: Path
    fields: dict[str, Any]  # the F32 GGUF's key/values (tokenizer arrays left out)
    tokenizer_checks: int = 0
    tokenizer_mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    greedy_mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    greedy_generated: list[list[int]] = field(default_factory=list)
    positions: int = 0
    top1_f32: float = 0.0
    max_diff_f32: float = 0.0  # max |log_softmax(HF) - log_softmax(llama.cpp F32)|
    # F32 top-1 flips at a transformers margin wider than twice llama.cpp's own logit error at the position
    # (|F32 - HF|): a disagreement that is not a near-tie
    f32_unexplained_flips: int = 0
    top1_f16: float | None = None
    # F16 top-1 flips (vs transformers) larger than llama.cpp's own half-precision error explains: the HF
    # margin between the two tokens exceeds twice the position's |F16 - F32| (llama.cpp) plus |F32 - HF|.
    f16_unexplained_flips: int | None = None
    # models with a tanh-GELU: F32 top-1 and max |log_softmax diff| against transformers with ggml's CPU
    # GELU (an fp16 table) swapped in, which separates llama.cpp's GELU arithmetic from conversion errors
    top1_f32_ggml_gelu: float | None = None
    max_diff_f32_ggml_gelu: float | None = None


def gguf_fields(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    skip = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
    )
    return {n: f.contents() for n, f in reader.fields.items() if n not in skip}


def convert_built(name: str, workdir: Path) -> tuple[Path, Path]:
    """(HF folder, F32 GGUF) of family ``name`` under ``workdir`` (built and converted once)."""
    from gguf_factory.convert import convert

    hf_dir = workdir / f"tiny-{name}"
    f32 = workdir / f"tiny-{name}-F32.gguf"
    if not f32.is_file():
        if not (hf_dir / "config.json").is_file():
            build(name, hf_dir)
        convert(hf_dir, f32, outtype="f32")
    return hf_dir, f32


def _prompt_ids(tok: Any, prompts: list[Any]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(list(tok(p)["input_ids"]))
        else:
            text = tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
            out.append(list(tok.encode(text, add_special_tokens=False)))
    return out


# transformers' tanh-approximated GELU modules (gelu_pytorch_tanh, gelu_new...): the ones ggml's CPU backend
# computes through its fp16 table
TANH_GELU_MODULES = ("GELUTanh", "NewGELUActivation", "FastGELUActivation")


def ggml_gelu_module() -> Any:
    """A torch module computing GELU the way ggml's CPU backend does (ggml-cpu/vec.h with GGML_GELU_FP16,
    its default): x <= -10 -> 0, x >= 10 -> x, else the tanh approximation evaluated in float32 at x rounded
    to fp16, and the result rounded to fp16 (its 65,536-entry table). Used only to tell llama.cpp's GELU
    arithmetic apart from conversion errors: the parity figures are reported against transformers as is."""
    import torch

    class GgmlGelu(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            h = x.to(torch.float16).to(torch.float32)
            inner = 0.7978845608028654 * h * (1.0 + 0.044715 * h * h)
            y = (0.5 * h * (1.0 + torch.tanh(inner))).to(torch.float16).to(torch.float32)
            return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))

    return GgmlGelu()


def swap_in_ggml_gelu(model: Any) -> int:
    """Replace every tanh-GELU module of ``model`` with :func:`ggml_gelu_module`; the number replaced."""
    n = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child).__name__ in TANH_GELU_MODULES:
                setattr(module, name, ggml_gelu_module())
                n += 1
    return n


def _hf_logits(hf_dir: Path, all_ids: list[list[int]], *, ggml_gelu: bool = False) -> Any:
    """transformers' F32 logits at every position; ``ggml_gelu``: with ggml's GELU (None if the model has
    no tanh-GELU)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()  # no dropout
    if ggml_gelu and not swap_in_ggml_gelu(model):
        return None
    with torch.no_grad():
        return np.concatenate([model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in all_ids])


def hf_position_logits(hf_dirs: list[Path], prompts: list[Any]) -> tuple[Any, list[Any]]:
    """Logits of several HF checkpoints (e.g. an original and its GGUF -> HF rebuild) on the same ids (the
    first one's tokenizer): (first, [the others])."""
    from transformers import AutoTokenizer

    all_ids = _prompt_ids(AutoTokenizer.from_pretrained(str(hf_dirs[0])), prompts)
    logits = [_hf_logits(d, all_ids) for d in hf_dirs]
    return logits[0], logits[1:]


def position_logits(gguf_paths: list[Path], hf_dir: Path, prompts: list[Any], n_threads: int = 2) -> Any:
    """Logits at every prompt position: (transformers, [each GGUF through llama.cpp]), prompts tokenized by
    the HF tokenizer (message lists through its chat template) and fed as the same ids to both engines."""
    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    all_ids = _prompt_ids(AutoTokenizer.from_pretrained(str(hf_dir)), prompts)
    hf = _hf_logits(hf_dir, all_ids)
    n_ctx = max(len(ids) for ids in all_ids) + 8
    outs = []
    for path in gguf_paths:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=n_threads,
            type_k=llama_cpp.GGML_TYPE_F32,  # llama.cpp's F16 KV cache would add its own noise
            type_v=llama_cpp.GGML_TYPE_F32,
            verbose=False,
        )
        rows = []
        try:
            for ids in all_ids:
                llm.reset()
                llm.eval(ids)
                rows.append(
                    np.array(llm.scores[: len(ids)], dtype=np.float32)
                )  # a copy: the buffer is reused
        finally:
            llm.close()
        outs.append(np.concatenate(rows))
    return hf, outs


def _log_softmax(x: Any) -> Any:
    import numpy as np

    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def run_parity(name: str, workdir: Path, *, f16: bool = True, n_threads: int = 2) -> Parity:
    import numpy as np

    from gguf_factory.convert import convert
    from gguf_factory.verify import check_greedy_parity, check_tokenizer_parity

    hf_dir, f32 = convert_built(name, workdir)
    result = Parity(name, hf_dir, f32, gguf_fields(f32))
    tok = check_tokenizer_parity(f32, hf_dir, PARITY_TEXTS)
    result.tokenizer_checks, result.tokenizer_mismatches = tok.n_checks, tok.mismatches
    greedy = check_greedy_parity(f32, hf_dir, prompts_for(name), max_new_tokens=10, n_threads=n_threads)
    result.greedy_mismatches, result.greedy_generated = greedy.mismatches, greedy.generated

    paths = [f32]
    if f16:
        f16_path = workdir / f"tiny-{name}-F16.gguf"
        if not f16_path.is_file():
            convert(hf_dir, f16_path, outtype="f16")
        paths.append(f16_path)
    hf, outs = position_logits(paths, hf_dir, prompts_for(name) + LOGIT_TEXTS, n_threads)
    ll32 = outs[0]
    top = hf.argmax(-1)
    result.positions = len(top)
    result.top1_f32 = float((top == ll32.argmax(-1)).mean())
    result.max_diff_f32 = float(np.abs(_log_softmax(hf) - _log_softmax(ll32)).max())
    rows = np.arange(len(top))
    pick32 = ll32.argmax(-1)
    f32_err = np.abs(ll32 - hf).max(-1)
    result.f32_unexplained_flips = int(
        ((pick32 != top) & (hf[rows, top] - hf[rows, pick32] > 2 * f32_err)).sum()
    )
    from transformers import AutoTokenizer

    all_ids = _prompt_ids(AutoTokenizer.from_pretrained(str(hf_dir)), prompts_for(name) + LOGIT_TEXTS)
    matched = _hf_logits(hf_dir, all_ids, ggml_gelu=True)
    if matched is not None:
        result.top1_f32_ggml_gelu = float((matched.argmax(-1) == pick32).mean())
        result.max_diff_f32_ggml_gelu = float(np.abs(_log_softmax(matched) - _log_softmax(ll32)).max())
    if f16:
        ll16 = outs[1]
        pick = ll16.argmax(-1)
        result.top1_f16 = float((top == pick).mean())
        gap = hf[rows, top] - hf[rows, pick]
        half_err = np.abs(ll16 - ll32).max(-1)
        result.f16_unexplained_flips = int(((pick != top) & (gap > 2 * (half_err + f32_err))).sum())
    return result
