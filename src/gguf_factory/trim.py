"""The ``trim-vocab`` verb: keep the part of a BPE vocabulary that your chat data and common text use.

A 135M-parameter model with a 49k vocabulary spends a fifth of its weights on embedding rows, most of
which a chatbot's data never touches. Trimming removes those rows from the embedding (and an untied
output head) and rebuilds the tokenizer so that it can no longer produce them:

* kept: every special/added token, every single-character token (the byte alphabet of byte-level BPE, or
  SentencePiece's byte-fallback pieces), every token the data uses when rendered with the model's own chat
  template (``train`` and ``val`` splits, never ``test``), and then the best-ranked merges of the original
  tokenizer until ``vocab_size`` is reached — a merge's rank is the order in which BPE learnt it, i.e. how
  common the pair was in the tokenizer's training corpus;
* closure: a kept token's own merge parents are kept, so every kept token stays reachable;
* merges: those whose two parts and result are all kept, in their original order.

With that rule any text whose original tokens are all kept tokenizes to exactly the same pieces (every merge
applied in its original derivation is kept, and removing other merges never makes a lower-ranked one
apply first); other text falls back to shorter pieces. The model's logits for kept tokens are unchanged
(the same hidden states, the same output rows). The report says how much held-out text tokenizes
identically and how many more tokens it takes.

Supported: tokenizer.json BPE models (byte-level like GPT-2 / Llama 3 / SmolLM / Qwen, or SentencePiece-
style with byte fallback like Llama 2 / Mistral / Gemma). Unigram and WordPiece vocabularies are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import InputError, ModelError

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 16384
REPORT_NAME = "trim_report.json"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# files of the source folder not copied: rewritten here, or a second tokenizer that would disagree
_REWRITTEN = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
_DROPPED = {"vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "training.json"}
_WEIGHTS = re.compile(r"^(model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?)$")


@dataclass
class TrimResult:
    out_dir: Path
    vocab_before: int
    vocab_after: int
    params_before: int
    params_after: int
    data_tokens: int
    """Distinct tokens the train/val data uses (all kept)."""
    heldout_texts: int
    heldout_identical: float
    """Share of held-out texts (test split, through the chat template) tokenized exactly as before."""
    heldout_token_ratio: float
    """Tokens of the held-out texts after / before trimming (1.0: no longer at all)."""
    seconds: float
    report_path: Path

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["report_path"] = str(self.out_dir), str(self.report_path)
        return d


# --------------------------------------------------------------------------------------------- vocab


@dataclass
class _Bpe:
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    added: dict[str, int]
    """Added/special tokens (content -> id)."""

    def parents(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for a, b in self.merges:
            out.setdefault(a + b, (a, b))
        return out


def _read_bpe(tok_json: dict[str, Any], where: Path) -> _Bpe:
    model = tok_json.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ModelError(f"{where}: only BPE vocabularies can be trimmed (this one is {kind or 'unknown'})")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ModelError(f"{where}: BPE with subword prefixes/suffixes cannot be trimmed")
    vocab = model.get("vocab")
    merges_raw = model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges_raw, list):
        raise ModelError(f"{where}: model.vocab / model.merges missing")
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(merges_raw):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ModelError(f"{where}: model.merges[{i}] is not a pair of strings")
        merges.append((pair[0], pair[1]))
    added = {}
    for t in tok_json.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
            added[t["content"]] = t["id"]
    return _Bpe({str(k): int(v) for k, v in vocab.items()}, merges, added)


def choose_tokens(bpe: _Bpe, used: Iterable[str], vocab_size: int) -> set[str]:
    """The kept vocabulary (see the module docstring): specials, single characters, ``used`` (with their
    merge ancestors) and then merge results by rank until ``vocab_size`` tokens are kept."""
    parents = bpe.parents()
    keep: set[str] = set(bpe.added)
    keep.update(t for t in bpe.vocab if len(t) == 1 or _BYTE_PIECE.match(t))

    def add(tok: str) -> None:
        stack = [tok]
        while stack:
            t = stack.pop()
            if t in keep or t not in bpe.vocab:
                continue
            keep.add(t)
            if t in parents:
                stack.extend(parents[t])

    for t in used:
        add(t)
    for a, b in bpe.merges:  # in rank order: each merge's parts were added before it (or are characters)
        if len(keep) >= vocab_size:
            break
        if a in keep and b in keep:
            keep.add(a + b)
    return keep


def _remap_ids(value: Any, mapping: dict[int, int]) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return mapping.get(value)
    if isinstance(value, list):
        return [mapping.get(v) for v in value if isinstance(v, int) and v in mapping]
    return value


def _rewrite_tokenizer(
    tok_json: dict[str, Any], bpe: _Bpe, keep: set[str]
) -> tuple[dict[str, Any], dict[int, int]]:
    """(new tokenizer.json, old id -> new id)."""
    id_of = {**bpe.vocab, **bpe.added}
    old_ids = sorted({id_of[t] for t in keep if t in id_of})
    mapping = {old: new for new, old in enumerate(old_ids)}
    out = json.loads(json.dumps(tok_json))  # deep copy, JSON types only
    model = out["model"]
    model["vocab"] = {t: mapping[i] for t, i in bpe.vocab.items() if i in mapping and t in keep}
    string_merges = bool(tok_json["model"]["merges"]) and isinstance(tok_json["model"]["merges"][0], str)
    kept = [(a, b) for a, b in bpe.merges if a in keep and b in keep and a + b in keep]
    model["merges"] = [f"{a} {b}" for a, b in kept] if string_merges else [[a, b] for a, b in kept]
    for t in out.get("added_tokens") or []:
        t["id"] = mapping[t["id"]]
    post = out.get("post_processor")
    for node in _walk(post):
        if isinstance(node, dict) and isinstance(node.get("special_tokens"), dict):
            for spec in node["special_tokens"].values():
                if isinstance(spec, dict) and isinstance(spec.get("ids"), list):
                    spec["ids"] = [mapping[i] for i in spec["ids"]]
        for key in ("sep", "cls"):  # RobertaProcessing/BertProcessing: [token, id]
            if isinstance(node, dict) and isinstance(node.get(key), list) and len(node[key]) == 2:
                node[key][1] = mapping.get(node[key][1], node[key][1])
    return out, mapping


def _walk(node: Any) -> Iterable[Any]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, dict):
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


# --------------------------------------------------------------------------------------------- data


def _rendered_texts(tokenizer: Any, conversations: Sequence[Any]) -> list[str]:
    out = []
    for conv in conversations:
        messages = [{"role": m.role, "content": m.content} for m in conv.messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            out.append(text if isinstance(text, str) else text[0])
        else:
            out.extend(m["content"] for m in messages)
    return out


def _pieces(tokenizer: Any, texts: Sequence[str]) -> list[list[str]]:
    return [
        tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts
    ]


# --------------------------------------------------------------------------------------------- verb


def trim_vocab(
    model: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> TrimResult:
    """Write a copy of ``model`` (any model source: :func:`gguf_factory.bases.resolve_path`) at ``out_dir``
    whose vocabulary keeps what ``data_dir``'s train/val conversations use plus the best-ranked merges, up
    to ``vocab_size`` tokens (more if the data alone needs more). See the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .bases import resolve_path
    from .data import load_dataset
    from .train.loop import quiet_hf_progress

    t0 = time.perf_counter()
    if vocab_size < 256:
        raise InputError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    src = resolve_path(model, what="model")
    out = files.check_output_dir(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not empty; choose a new one")
    s, d = src.resolve(), out.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise InputError(f"output folder {out} would overwrite the input model {src}; choose another")
    tj_path = src / "tokenizer.json"
    if not tj_path.is_file():
        raise ModelError(f"{src}: no tokenizer.json (only fast BPE tokenizers can be trimmed)")
    try:
        tok_json = json.loads(tj_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {tj_path}: {e}") from None
    bpe = _read_bpe(tok_json, tj_path)
    splits = load_dataset(data_dir)

    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    seen = _pieces(tokenizer, _rendered_texts(tokenizer, splits["train"] + splits["val"]))
    used = Counter(p for ps in seen for p in ps)
    keep = choose_tokens(bpe, used, vocab_size)
    new_json, mapping = _rewrite_tokenizer(tok_json, bpe, keep)
    n_before = len({**bpe.vocab, **bpe.added})
    log.info("trimming the vocabulary of %s: %d -> %d tokens (%d used by the data)", src, n_before,
             len(mapping), len(used))  # fmt: skip

    with quiet_hf_progress():
        hf = AutoModelForCausalLM.from_pretrained(src, dtype="auto", local_files_only=True,
                                                  trust_remote_code=False)  # fmt: skip
    params_before = sum(p.numel() for p in hf.parameters())
    rows = torch.tensor(sorted(mapping), dtype=torch.long)
    n_rows = hf.get_input_embeddings().weight.shape[0]
    if int(rows.max()) >= n_rows:
        raise ModelError(f"{src}: the tokenizer has ids up to {int(rows.max())}, the embedding {n_rows} rows")
    _gather_rows(hf, rows)

    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        for f in src.iterdir():
            if f.is_file() and f.name not in _REWRITTEN | _DROPPED and not _WEIGHTS.match(f.name):
                shutil.copy2(f, tmp / f.name)
        (tmp / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False), encoding="utf-8")
        _rewrite_tokenizer_config(src, tmp, mapping)
        with quiet_hf_progress():
            hf.save_pretrained(tmp)  # config.json (vocab_size, token ids) and generation_config.json
        _remap_config_ids(tmp, mapping)
        new_tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        changed = [i for i, (a, b) in enumerate(zip(seen, _pieces(new_tok, _rendered_texts(new_tok, splits[
            "train"] + splits["val"])), strict=True)) if a != b]  # fmt: skip
        if changed:
            raise ModelError(f"trimmed tokenizer of {src} splits {len(changed)} training texts differently "
                             "(it should not: please report this)")  # fmt: skip
        held = _rendered_texts(tokenizer, splits["test"])
        before, after = _pieces(tokenizer, held), _pieces(new_tok, held)
        identical = sum(a == b for a, b in zip(before, after, strict=True)) / max(1, len(held))
        ratio = sum(map(len, after)) / max(1, sum(map(len, before)))
        result = TrimResult(
            out_dir=out, vocab_before=n_before, vocab_after=len(mapping), params_before=params_before,
            params_after=sum(p.numel() for p in hf.parameters()), data_tokens=len(used),
            heldout_texts=len(held), heldout_identical=identical, heldout_token_ratio=ratio,
            seconds=time.perf_counter() - t0, report_path=out / REPORT_NAME,
        )  # fmt: skip
        (tmp / REPORT_NAME).write_text(json.dumps({**result.to_json(), "source": str(src)}, indent=2) + "\n")
    log.info("wrote %s (%d -> %d tokens, %.1f M -> %.1f M parameters)", out, n_before, len(mapping),
             params_before / 1e6, result.params_after / 1e6)  # fmt: skip
    return result


def _gather_rows(hf: Any, rows: Any) -> None:
    """Keep ``rows`` of the input embedding and of an untied output head, in place."""
    import torch

    emb = hf.get_input_embeddings()
    head = hf.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = torch.nn.Embedding(len(rows), emb.weight.shape[1], dtype=emb.weight.dtype)
    new_emb.weight.data = emb.weight.data[rows].clone()
    hf.set_input_embeddings(new_emb)
    if head is not None:
        if tied:
            head.weight = new_emb.weight
        else:
            new_head = torch.nn.Linear(head.weight.shape[1], len(rows), bias=head.bias is not None,
                                       dtype=head.weight.dtype)  # fmt: skip
            new_head.weight.data = head.weight.data[rows].clone()
            if head.bias is not None:
                new_head.bias.data = head.bias.data[rows].clone()
            hf.set_output_embeddings(new_head)
    hf.config.vocab_size = len(rows)
    if hasattr(hf.config, "get_text_config"):
        hf.config.get_text_config().vocab_size = len(rows)


def _remap_config_ids(folder: Path, mapping: dict[int, int]) -> None:
    for name in ("config.json", "generation_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        cfg = json.loads(p.read_text(encoding="utf-8"))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
            if key in cfg and cfg[key] is not None:
                cfg[key] = _remap_ids(cfg[key], mapping)
        p.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _rewrite_tokenizer_config(src: Path, dst: Path, mapping: dict[int, int]) -> None:
    p = src / "tokenizer_config.json"
    if not p.is_file():
        return
    cfg = json.loads(p.read_text(encoding="utf-8"))
    dec = cfg.get("added_tokens_decoder")
    if isinstance(dec, dict):
        cfg["added_tokens_decoder"] = {str(mapping[int(k)]): v for k, v in dec.items() if int(k) in mapping}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")  # fmt: skip
