"""Parity checks of a GGUF (run by llama.cpp) against its Hugging Face source (run by transformers).

Used by the tests and the demo: the tokenizer must give the same ids, and greedy decoding from the same
prompt ids must give the same tokens.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FactoryError, InputError, ModelError
from .files import require_dir, require_file

log = logging.getLogger(__name__)

Prompt = str | Sequence[dict[str, str]]


@dataclass
class TokenizerParity:
    n_texts: int
    mismatches: list[tuple[str, list[int], list[int]]]  # (text, HF ids, llama.cpp ids)
    ok: bool
    n_checks: int = 0  # plain texts + chat-template renderings compared


@dataclass
class GreedyParity:
    n_prompts: int
    mismatches: list[tuple[str, list[int], list[int]]]  # (prompt, HF new ids, llama.cpp new ids)
    ok: bool
    generated: list[list[int]] = field(default_factory=list)  # HF greedy ids per prompt


def _llama(gguf_path: str | Path, **kwargs: Any) -> Any:
    from llama_cpp import Llama

    from .runtime import _quiet_stderr
    from .runtime.llamacpp import check_chat_templates

    path = require_file(gguf_path, "GGUF file")
    check_chat_templates(path)  # bounded, before llama-cpp-python compiles the template in this process
    try:
        with _quiet_stderr():  # llama.cpp logs some context notes to fd 2 even with verbose=False
            return Llama(model_path=str(path), verbose=False, **kwargs)
    except ValueError as e:  # llama-cpp-python's way of saying llama.cpp refused the file
        raise ModelError(f"llama.cpp could not load {path}: {e}") from e


def _hf_tokenizer(hf_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(require_dir(hf_dir, "model folder")))
    # parity is about ids, not the model's context: no "sequence longer than the model" warnings
    tok.model_max_length = 1 << 62
    return tok


def check_tokenizer_parity(
    gguf_path: str | Path, hf_dir: str | Path, texts: Sequence[str]
) -> TokenizerParity:
    """Compare HF ids (``add_special_tokens=False``) with llama.cpp's for each text.

    Each text is checked twice: as plain text (llama.cpp ``special=False``) and, when the tokenizer has
    a chat template, rendered as a user turn with the generation prompt (``special=True``, so the
    template's special tokens must map to the same single ids).
    """
    tok = _hf_tokenizer(hf_dir)
    llm = _llama(gguf_path, vocab_only=True)
    mismatches: list[tuple[str, list[int], list[int]]] = []
    n_checks = 0
    try:
        for text in texts:
            hf_ids = list(tok.encode(text, add_special_tokens=False))
            ll_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            n_checks += 1
            if hf_ids != ll_ids:
                mismatches.append((text, hf_ids, ll_ids))
            if getattr(tok, "chat_template", None):
                rendered = tok.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
                hf_ids = list(tok.encode(rendered, add_special_tokens=False))
                ll_ids = list(llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True))
                n_checks += 1
                if hf_ids != ll_ids:
                    mismatches.append((rendered, hf_ids, ll_ids))
    finally:
        llm.close()
    for text, hf_ids, ll_ids in mismatches[:5]:
        log.warning("tokenizer mismatch on %r: HF %s vs llama.cpp %s", text[:80], hf_ids[:20], ll_ids[:20])
    return TokenizerParity(n_texts=len(texts), mismatches=mismatches, ok=not mismatches, n_checks=n_checks)


def _prompt_ids(tok: Any, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(tok(prompt)["input_ids"])
    rendered = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return list(tok.encode(rendered, add_special_tokens=False))


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids: set[int] = set()
    for src in (model.config, getattr(model, "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, list | tuple):
            ids.update(int(x) for x in e)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _hf_greedy(model: Any, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    import torch

    out: list[int] = []
    past = None
    inp = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(torch.argmax(res.logits[0, -1]).item())
            out.append(nxt)
            if nxt in eos:
                break
            inp = torch.tensor([[nxt]], dtype=torch.long)
    return out


def _llama_greedy(llm: Any, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt in eos or nxt == llm.token_eos():
            break
        llm.eval([nxt])
    return out


def check_greedy_parity(
    gguf_path: str | Path,
    hf_dir: str | Path,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 16,
    *,
    n_threads: int | None = None,
) -> GreedyParity:
    """Greedy (argmax) continuations from transformers and llama.cpp on the same HF prompt ids.

    A prompt is a string (tokenised with the tokenizer's own special-token rules) or a list of chat
    messages (rendered with the chat template and the generation prompt). Decoding stops at EOS.
    """
    tok = _hf_tokenizer(hf_dir)
    model = _hf_model(hf_dir)
    eos = _eos_ids(model, tok)
    all_ids = [_prompt_ids(tok, p) for p in prompts]
    n_ctx = max((len(i) for i in all_ids), default=1) + max_new_tokens + 8
    import llama_cpp

    # F32 KV cache: llama.cpp's default F16 cache adds ~1e-3 noise that can flip near-tied argmaxes.
    llm = _llama(
        gguf_path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=n_threads or max(1, min(4, (os.cpu_count() or 2) // 2)),
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    mismatches: list[tuple[str, list[int], list[int]]] = []
    generated: list[list[int]] = []
    try:
        for prompt, ids in zip(prompts, all_ids, strict=True):
            hf_out = _hf_greedy(model, ids, max_new_tokens, eos)
            ll_out = _llama_greedy(llm, ids, max_new_tokens, eos)
            generated.append(hf_out)
            if hf_out != ll_out:
                label = prompt if isinstance(prompt, str) else repr(list(prompt))
                mismatches.append((label, hf_out, ll_out))
                log.warning("greedy mismatch on %s: HF %s vs llama.cpp %s", label[:80], hf_out, ll_out)
    finally:
        llm.close()
    return GreedyParity(n_prompts=len(prompts), mismatches=mismatches, ok=not mismatches, generated=generated)


@dataclass
class LogitAgreement:
    n_prompts: int
    n_positions: int  # prompt positions compared (every position of every prompt)
    top1_agreement: float  # fraction of positions where HF's and llama.cpp's argmax agree
    max_abs_logprob_diff: float  # max |log_softmax(HF) - log_softmax(llama.cpp)| over positions and vocab
    ok: bool  # top1_agreement >= min_top1
    min_top1: float = 0.999


def _hf_model(hf_dir: str | Path) -> Any:
    """The reference model in float32, eager attention (the only one that applies attention soft-capping)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .train.loop import quiet_hf_progress

    with quiet_hf_progress():
        model = AutoModelForCausalLM.from_pretrained(
            str(require_dir(hf_dir, "model folder")), dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    return model


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def check_logit_agreement(
    gguf_path: str | Path,
    hf_dir: str | Path,
    prompts: Sequence[Prompt],
    *,
    min_top1: float = 0.999,
    n_threads: int | None = None,
) -> LogitAgreement:
    """Next-token distributions of llama.cpp (``logits_all=True``) vs transformers at every prompt position.

    Prompts are tokenised by the HF tokenizer (strings with its special-token rules, message lists through
    the chat template) and the same ids are fed to both engines. Returns the top-1 agreement over all
    positions and the largest absolute difference of log-probabilities.
    """
    import llama_cpp
    import torch

    tok = _hf_tokenizer(hf_dir)
    model = _hf_model(hf_dir)
    all_ids = [_prompt_ids(tok, p) for p in prompts]
    all_ids = [ids for ids in all_ids if ids]
    n_ctx = max((len(i) for i in all_ids), default=1) + 8
    llm = _llama(
        gguf_path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=n_threads or max(1, min(4, (os.cpu_count() or 2) // 2)),
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    agree = total = 0
    max_diff = 0.0
    try:
        for ids in all_ids:
            with torch.no_grad():
                hf = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()
            llm.reset()
            llm.eval(ids)
            ll = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            if ll.shape != hf.shape:
                raise ModelError(
                    f"{gguf_path} and {hf_dir} disagree on the vocabulary: llama.cpp gives logits of shape "
                    f"{ll.shape}, transformers {hf.shape}"
                )
            agree += int((hf.argmax(-1) == ll.argmax(-1)).sum())
            total += len(ids)
            max_diff = max(max_diff, float(np.abs(_log_softmax(hf) - _log_softmax(ll)).max()))
    finally:
        llm.close()
    top1 = agree / total if total else 0.0
    log.info("logit agreement: top-1 %.4f over %d positions, max |Δ log-softmax| %.4g", top1, total, max_diff)
    return LogitAgreement(
        n_prompts=len(all_ids),
        n_positions=total,
        top1_agreement=top1,
        max_abs_logprob_diff=max_diff,
        ok=total > 0 and top1 >= min_top1,
        min_top1=min_top1,
    )


# ---------------------------------------------------------------------------------------------------
# verify: all three checks on one GGUF, with thresholds by GGUF type
# ---------------------------------------------------------------------------------------------------

# Minimum top-1 agreement by the GGUF's main tensor type; ``None``: quantized, reported only. Greedy parity
# is required only of F32 (F16/BF16 rounding may flip near-tied argmaxes along a generation).
TOP1_THRESHOLDS: dict[str, float] = {"F32": 0.999, "F16": 0.99, "BF16": 0.99}
GREEDY_REQUIRED = frozenset({"F32"})

# Built-in prompts, used with (or without) held-out data; chat-message prompts need a chat template.
BUILTIN_PROMPTS: list[str] = [
    "The quick brown fox jumps over the lazy dog",
    "Hello! How are you today?",
    "Once upon a time, in a small village by the sea,",
    "Numbers: 1, 2, 3, 42 and 3.14159; emoji 😀 and café.",
]
BUILTIN_TEXTS: list[str] = [
    "Hello, world!",
    "I don't know; it's 3:45pm.",
    "multiple   spaces    here",
    "line1\nline2\n\n\nline3\n",
    "tabs\tand\ttabs",
    " leading space",
    "trailing space ",
    "Café naïve façade — «quoted» Zürich",
    "emoji 😀🎉👍🏽 done",
    "you'll we've they're I'm he'd DON'T",
    "<b>html</b> & &amp; {json: [1, 2]}",
    "",
]


@dataclass
class VerifyReport:
    """The result of :func:`verify`: the three checks, the thresholds applied and an overall verdict."""

    gguf: Path
    hf_dir: Path
    gguf_type: str  # the main tensor type (F32, F16, BF16, Q8_0, Q4_K...)
    tokenizer: TokenizerParity
    greedy: GreedyParity
    logits: LogitAgreement
    min_top1: float | None  # None: reported only (quantized)
    greedy_required: bool
    corpus: dict[str, int]  # texts per source (held-out data, built-in, each chatterbot language)
    seconds: float

    @property
    def tokenizer_ok(self) -> bool:
        return self.tokenizer.ok

    @property
    def greedy_ok(self) -> bool:
        return self.greedy.ok or not self.greedy_required

    @property
    def logits_ok(self) -> bool:
        return self.min_top1 is None or (
            self.logits.n_positions > 0 and self.logits.top1_agreement >= self.min_top1
        )

    @property
    def ok(self) -> bool:
        return self.tokenizer_ok and self.greedy_ok and self.logits_ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def checks(self) -> list[dict[str, Any]]:
        """One row per check: name, measured result, requirement, status (pass | FAIL | info)."""
        tok, gr, lg = self.tokenizer, self.greedy, self.logits
        return [
            {
                "check": "tokenizer parity",
                "result": f"{len(tok.mismatches)} mismatches in {tok.n_checks} encodings "
                f"({tok.n_texts} texts)",
                "required": "0 mismatches",
                "status": "pass" if self.tokenizer_ok else "FAIL",
            },
            {
                "check": "greedy parity",
                "result": f"{gr.n_prompts - len(gr.mismatches)}/{gr.n_prompts} prompts identical",
                "required": "all identical" if self.greedy_required else "reported only",
                "status": "pass" if gr.ok else ("FAIL" if self.greedy_required else "info"),
            },
            {
                "check": "top-1 agreement",
                "result": f"{lg.top1_agreement:.2%} of {lg.n_positions} positions",
                "required": "reported only" if self.min_top1 is None else f"≥ {self.min_top1:.1%}",
                "status": "info" if self.min_top1 is None else ("pass" if self.logits_ok else "FAIL"),
            },
            {
                "check": "max |Δ log-softmax|",
                "result": f"{lg.max_abs_logprob_diff:.3g}",
                "required": "reported only",
                "status": "info",
            },
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "gguf": str(self.gguf),
            "hf_dir": str(self.hf_dir),
            "gguf_type": self.gguf_type,
            "ok": self.ok,
            "checks": self.checks(),
            "tokenizer": {
                "texts": self.tokenizer.n_texts,
                "encodings": self.tokenizer.n_checks,
                "mismatches": [
                    {"text": t, "hf": h, "llama_cpp": ll} for t, h, ll in self.tokenizer.mismatches[:20]
                ],
            },
            "greedy": {
                "prompts": self.greedy.n_prompts,
                "required": self.greedy_required,
                "mismatches": [
                    {"prompt": p, "hf": h, "llama_cpp": ll} for p, h, ll in self.greedy.mismatches
                ],
            },
            "logits": {
                "prompts": self.logits.n_prompts,
                "positions": self.logits.n_positions,
                "top1_agreement": self.logits.top1_agreement,
                "max_abs_logprob_diff": self.logits.max_abs_logprob_diff,
                "min_top1": self.min_top1,
            },
            "corpus": self.corpus,
            "seconds": round(self.seconds, 2),
        }


def gguf_main_type(gguf_path: str | Path) -> str:
    """The GGUF's main tensor type: the type holding most elements among its 2-D tensors (e.g. ``F16``).

    From the bounded header scan (:func:`gguf_factory.gguf_header.scan_gguf_header`): a hostile header costs
    no more than its size."""
    import gguf

    from .gguf_header import scan_gguf_header

    path = require_file(gguf_path, "GGUF file")
    try:
        meta, tensors = scan_gguf_header(path)
    except InputError as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from e
    gtype = meta.get(gguf.Keys.General.TYPE)
    if gtype is not None and gtype != gguf.GGUFType.MODEL:
        raise ModelError(f"{path} is a GGUF {gtype!r}, not a model: nothing to verify")
    counts: dict[str, int] = {}
    for name, type_id, dims in tensors:
        if len(dims) >= 2:
            try:
                tname = gguf.GGMLQuantizationType(type_id).name
            except ValueError:
                raise ModelError(f"{path}: tensor {name!r} has unknown ggml type {type_id}") from None
            counts[tname] = counts.get(tname, 0) + math.prod(dims)
    if not counts:
        raise ModelError(f"{path} has no 2-D weight tensors")
    return max(counts, key=lambda k: counts[k])


def _data_texts_and_prompts(data: str | Path) -> tuple[list[str], list[Prompt]]:
    """Held-out texts (every message) and chat prompts (each conversation up to its first user turn)."""
    from .data import load_split

    p = Path(data)
    if p.is_dir():
        p = p / "test.jsonl"
    convs = load_split(p)
    texts = [m.content for c in convs for m in c.messages]
    prompts: list[Prompt] = []
    for c in convs:
        turns: list[dict[str, str]] = []
        for m in c.messages:
            turns.append({"role": m.role, "content": m.content})
            if m.role == "user":
                break
        if turns and turns[-1]["role"] == "user":
            prompts.append(turns)
    return texts, prompts


def multilingual_texts(per_language: int = 4) -> dict[str, list[str]]:
    """A bounded sample of the installed chatterbot-corpus package's non-English lines, by language.

    Read at run time from the package's data folder; ``{}`` when the package is not installed.
    """
    import yaml

    try:
        from .data import chatterbot_data_dir

        root = chatterbot_data_dir()
    except FactoryError:
        log.warning("chatterbot-corpus is not installed: no multilingual texts in the tokenizer corpus")
        return {}
    out: dict[str, list[str]] = {}
    for lang_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "english"):
        lines: list[str] = []
        for f in sorted(lang_dir.glob("*.yml")):
            try:
                doc = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                continue
            convs = doc.get("conversations") if isinstance(doc, dict) else None
            for conv in convs or []:
                if isinstance(conv, list):
                    lines.extend(s.strip() for s in conv if isinstance(s, str) and s.strip())
        if lines:
            step = max(1, len(lines) // per_language)
            out[lang_dir.name] = lines[::step][:per_language]
    return out


def verify(
    gguf_path: str | Path,
    hf_dir: str | Path,
    *,
    data: str | Path | None = None,
    max_texts: int = 300,
    max_prompts: int = 8,
    per_language: int = 4,
    max_new_tokens: int = 16,
    n_threads: int | None = None,
) -> VerifyReport:
    """Check a GGUF against the Hugging Face model it was made from, through llama.cpp and transformers.

    * tokenizer parity on the held-out data (``data``: a prepared dataset folder or its ``test.jsonl``),
      built-in edge cases and a sample of every non-English chatterbot-corpus language;
    * greedy parity on a prompt set (held-out first user turns through the chat template, plus built-in
      text prompts);
    * logit agreement at every prompt position (top-1 agreement, max |Δ log-softmax|).

    Thresholds follow the GGUF's main tensor type (:data:`TOP1_THRESHOLDS`): F32 needs top-1 ≥ 99.9 % and
    identical greedy tokens, F16/BF16 top-1 ≥ 99 %; quantized types are reported only. The tokenizer must
    match exactly for every type.
    """
    import time

    t0 = time.perf_counter()
    gguf_path = require_file(gguf_path, "GGUF file")
    from .bases import resolve_path

    hf_dir = resolve_path(hf_dir, what="--against model")
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"not a Hugging Face model folder: {hf_dir / 'config.json'} is missing")
    gtype = gguf_main_type(gguf_path)

    corpus: dict[str, int] = {}
    texts: list[str] = []
    data_prompts: list[Prompt] = []
    if data is not None:
        held_texts, data_prompts = _data_texts_and_prompts(data)
        held_texts = list(dict.fromkeys(held_texts))[:max_texts]
        texts += held_texts
        corpus["held-out data"] = len(held_texts)
    texts += BUILTIN_TEXTS
    corpus["built-in"] = len(BUILTIN_TEXTS)
    for lang, lines in multilingual_texts(per_language).items():
        texts += lines
        corpus[f"chatterbot:{lang}"] = len(lines)

    tok = _hf_tokenizer(hf_dir)
    prompts: list[Prompt] = list(BUILTIN_PROMPTS)
    if getattr(tok, "chat_template", None):
        prompts = data_prompts[:max_prompts] + prompts
    else:
        prompts = [
            str(p[0]["content"]) for p in data_prompts[:max_prompts] if not isinstance(p, str)
        ] + prompts

    tokenizer = check_tokenizer_parity(gguf_path, hf_dir, texts)
    greedy = check_greedy_parity(gguf_path, hf_dir, prompts, max_new_tokens, n_threads=n_threads)
    min_top1 = TOP1_THRESHOLDS.get(gtype)
    logits = check_logit_agreement(
        gguf_path, hf_dir, prompts, min_top1=min_top1 if min_top1 is not None else 0.0, n_threads=n_threads
    )
    report = VerifyReport(
        gguf=gguf_path,
        hf_dir=hf_dir,
        gguf_type=gtype,
        tokenizer=tokenizer,
        greedy=greedy,
        logits=logits,
        min_top1=min_top1,
        greedy_required=gtype in GREEDY_REQUIRED,
        corpus=corpus,
        seconds=time.perf_counter() - t0,
    )
    log.info("verify %s (%s): %s", gguf_path.name, gtype, "pass" if report.ok else "FAIL")
    return report


def render_verify(report: VerifyReport) -> Any:
    """A rich table of the checks, with the first mismatches below it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    verdict = "[bold green]PASS[/]" if report.ok else "[bold red]FAIL[/]"
    table = Table(
        title=f"verify {report.gguf.name} ({report.gguf_type}) against {report.hf_dir.name}: {verdict}"
    )
    for col in ("check", "result", "required", "status"):
        table.add_column(col)
    style = {"pass": "green", "FAIL": "bold red", "info": "dim"}
    for row in report.checks():
        table.add_row(
            row["check"], row["result"], row["required"], f"[{style[row['status']]}]{row['status']}[/]"
        )
    lines: list[Any] = [table]
    n_lang = sum(1 for k in report.corpus if k.startswith("chatterbot:"))
    lines.append(
        Text(
            f"corpus: {sum(report.corpus.values())} texts ({report.corpus.get('held-out data', 0)} held-out, "
            f"{report.corpus.get('built-in', 0)} built-in, {n_lang} other languages); {report.seconds:.1f} s"
        )
    )
    for text, hf_ids, ll_ids in report.tokenizer.mismatches[:5]:
        lines.append(
            Text(f"tokenizer mismatch on {text[:60]!r}: HF {hf_ids[:12]} vs llama.cpp {ll_ids[:12]}")
        )
    for prompt, hf_ids, ll_ids in report.greedy.mismatches[:5]:
        lines.append(Text(f"greedy mismatch on {prompt[:60]!r}: HF {hf_ids[:12]} vs llama.cpp {ll_ids[:12]}"))
    return Group(*lines)
