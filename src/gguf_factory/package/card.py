"""The model card (README.md) of a release: files, quality figures, model facts, how to run it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import human_size, require_file
from .info import ModelInfo
from .ollama_template import OllamaTemplate


def read_ladder(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """File name -> rung (reference included) from the JSON that ``gguf-factory ladder`` writes."""
    p = require_file(path, "ladder JSON")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a ladder JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rungs"), list):
        raise InputError(f"{p}: not a ladder JSON (no 'rungs' list)")
    rungs = list(data["rungs"])
    if isinstance(data.get("reference"), dict):
        rungs.insert(0, {**data["reference"], "_reference": True})
    out: dict[str, dict[str, Any]] = {}
    for r in rungs:
        if isinstance(r, dict) and isinstance(r.get("path"), str):
            out[Path(r["path"]).name] = r
    return out


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, int | float) and not isinstance(v, bool) else "—"


def _pct(v: Any) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, int | float) and not isinstance(v, bool) else "—"


def files_table(infos: list[ModelInfo], ladder: dict[str, dict[str, Any]] | None) -> list[str]:
    evals = bool(ladder) and any(i.path.name in ladder for i in infos)  # type: ignore[operator]
    head = ["File", "Type", "Size", "Bits/weight"]
    if evals:
        head += ["PPL", "ΔPPL", "KLD (mean)", "Top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in infos:
        row = [f"`{i.path.name}`", i.qtype, human_size(i.size_bytes), f"{i.bits_per_weight:.2f}"]
        if evals:
            r = (ladder or {}).get(i.path.name, {})
            ref = " (reference)" if r.get("_reference") else ""
            row += [
                _fmt(r.get("perplexity"), ".3f") + ref,
                _fmt(r.get("delta_ppl"), "+.3f"),
                _fmt(r.get("kld_mean"), ".4f"),
                _pct(r.get("top1")),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def model_card(
    infos: list[ModelInfo],
    *,
    template: OllamaTemplate | None,
    ollama_name: str,
    modelfile_from: str,
    ladder: dict[str, dict[str, Any]] | None = None,
    publisher: str = "gguf-factory",
    checksums: bool = True,
) -> str:
    """Markdown for a release of ``infos`` (the first is the one the Modelfile uses)."""
    if not infos:
        raise InputError("a model card needs at least one GGUF file")
    main = infos[0]
    title = main.basename
    lmstudio_dir = f"{publisher}/{title}-GGUF"
    out = [f"# {title} — GGUF", ""]
    out.append(
        f"{len(infos)} GGUF file(s) of **{main.name}** for llama.cpp, Ollama and LM Studio, packaged by "
        "gguf-factory."
    )
    out += ["", "## Files", ""]
    out += files_table(infos, ladder)
    if ladder and any(i.path.name in ladder for i in infos):
        out += [
            "",
            "PPL: perplexity on held-out chat data; ΔPPL against the reference; KLD: mean KL divergence of "
            "the next-token distribution from the reference's; Top-1: how often the most likely next token "
            "agrees with the reference's.",
        ]
    out += ["", "## Model", ""]
    out.append(f"- Architecture: `{main.architecture or 'unknown'}`")
    desc = f"- Parameters: {_count(main.n_params)}"
    if main.n_layers:
        desc += f", {main.n_layers} layers"
    if main.embedding_length:
        desc += f", embedding width {main.embedding_length}"
    out.append(desc)
    if main.context_length:
        out.append(f"- Context length: {main.context_length} tokens (trained)")
    if main.num_ctx:
        out.append(f"- Recommended context (Modelfile `num_ctx`): {main.num_ctx} tokens")
    if main.profile:
        out.append(f"- Profile: {main.profile}")
    if main.license:
        out.append(f"- License: {main.license}")
    out += ["", "## Chat template", ""]
    if main.chat_template is None:
        out.append("The files carry no chat template: prompts are plain text.")
    else:
        out.append(
            "The files carry this Jinja chat template (`tokenizer.chat_template`); llama.cpp and LM Studio "
            "use it as is. The Modelfile's TEMPLATE was derived from it and renders the same prompts."
        )
        fence = "````" if "```" in main.chat_template else "```"
        out += ["", fence + "jinja", main.chat_template, fence]
        if template is not None:
            stops = ", ".join(f"`{s}`" for s in template.stops) or "none"
            out += ["", f"Stop strings: {stops}."]
            for w in template.warnings:
                out.append(f"\n> Note: {w}.")
    out += ["", "## Run it", "", "### llama.cpp", "", "```sh"]
    ctx = f" -c {main.num_ctx}" if main.num_ctx else ""
    out += [
        f"llama-cli -m {main.path.name}{ctx} -cnv",
        f"llama-server -m {main.path.name}{ctx} --jinja",
        "```",
        "",
        "### Ollama",
        "",
        f"The `Modelfile` uses `{modelfile_from}`:",
        "",
        "```sh",
        f"ollama create {ollama_name} -f Modelfile",
        f"ollama run {ollama_name}",
        "```",
        "",
        "### LM Studio",
        "",
        f"Import a file with `lms import {main.path.name}`, or put it in LM Studio's models folder as "
        f"`~/.lmstudio/models/{lmstudio_dir}/{main.path.name}` "
        f"(`gguf-factory export lmstudio FILE -o ~/.lmstudio/models` does that).",
    ]
    if checksums:
        out += ["", "## Checksums", "", "```sh", "sha256sum -c SHA256SUMS", "```"]
    return "\n".join(out) + "\n"
