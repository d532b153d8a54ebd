"""The model card (README.md) of a release: the Hugging Face metadata header (YAML), files, quality
figures, model facts, how to run it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

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


# ---------------------------------------------------------------------------------------------------
# the Hugging Face metadata header
# ---------------------------------------------------------------------------------------------------

QUANTIZED_BY = "gguf-factory"
PIPELINE_TAG = "text-generation"
BASE_TAGS = ("gguf", "llama.cpp")
# License identifiers the Hugging Face Hub knows (https://huggingface.co/docs/hub/repositories-licenses);
# any other licence text is written as ``license: other`` with its own ``license_name``.
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda
    cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0
    cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0
    etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research
    intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql
    ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license
    llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other""".split()
)
_HUB_REPO_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([\w.-]+/[\w.-]+?)/?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(value: object) -> str | None:
    """A Hub model id from a ``huggingface.co/<org>/<name>`` URL or a bare ``org/name``, else None."""
    if not isinstance(value, str):
        return None
    m = _HUB_REPO_URL.match(value.strip())
    if m:
        return m.group(1)
    v = value.strip()
    return v if _HUB_ID.match(v) and ".." not in v and not Path(v).exists() else None


def _license_fields(text: str, general: dict[str, object]) -> dict[str, str]:
    """``license`` (a Hub identifier as it is; any other text as ``other`` with a ``license_name``, from
    ``general.license.name`` when present) and ``license_link`` (``general.license.link``)."""
    lic = text.strip()
    if lic.lower() in HUB_LICENSES and lic.lower() != "other":
        return {"license": lic.lower()}
    named = general.get("general.license.name")
    raw = named if isinstance(named, str) and named.strip() else lic
    out = {"license": "other"}
    name = re.sub(r"[^a-z0-9.]+", "-", raw.lower()).strip("-.")
    if name and name != "other":
        out["license_name"] = name
    link = general.get("general.license.link")
    if isinstance(link, str) and link.startswith(("https://", "http://")):
        out["license_link"] = link
    return out


def card_data(
    infos: list[ModelInfo], *, base_model: str | None = None, license: str | None = None
) -> ModelCardData:
    """The Hugging Face model-card metadata of a release, as huggingface_hub's ``ModelCardData``.

    From the files' ``general.*`` keys: ``base_model`` (the model the files were made from:
    ``general.source.repo_url`` or ``general.source.url`` on the Hub, or
    ``gguf_factory.source_model`` when it is a Hub id), ``license`` (``general.license``), ``language``
    (``general.languages``), extra ``tags`` (``general.tags``); and from the release: the tags ``gguf``,
    ``llama.cpp`` and each file's type, ``quantized_by: gguf-factory``, ``pipeline_tag: text-generation``.
    ``base_model`` / ``license`` given here win. A value the files do not hold is left out."""
    from huggingface_hub import ModelCardData

    if not infos:
        raise InputError("a model card needs at least one GGUF file")
    fields: dict[str, Any] = {}
    general: dict[str, object] = {}
    for info in infos:  # the first file that holds a key gives it
        for k, v in info.general.items():
            general.setdefault(k, v)
    if base_model is not None and _hub_id(base_model) is None:
        raise InputError(f"--base-model {base_model!r} is not a Hugging Face model id (org/name)")
    sources = (
        general.get("general.source.repo_url"),
        general.get("general.source.url"),
        next((i.source_model for i in infos if i.source_model), None),
    )
    base = base_model or next((hub for v in sources if (hub := _hub_id(v))), None)
    if base:
        fields["base_model"] = base
        if any(i.qtype not in ("F32", "F16", "BF16") for i in infos):
            fields["base_model_relation"] = "quantized"
    lic = license or general.get("general.license")
    if isinstance(lic, str) and lic.strip():
        fields.update(_license_fields(lic, general))
    langs = general.get("general.languages")
    if isinstance(langs, list) and langs:
        fields["language"] = [str(x) for x in langs]
    tags = list(BASE_TAGS)
    for t in [*(i.qtype for i in infos), *_strs(general.get("general.tags"))]:
        if t and t != "unknown" and t not in tags:
            tags.append(t)
    fields["tags"] = tags
    fields["quantized_by"] = QUANTIZED_BY
    fields["pipeline_tag"] = PIPELINE_TAG
    return ModelCardData(**fields)


def _strs(v: object) -> list[str]:
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def card_header(data: ModelCardData) -> str:
    """The YAML front matter (``---`` ... ``---``) that opens a Hugging Face README.md."""
    return f"---\n{data.to_yaml()}\n---\n"


def check_card(text: str, where: str = "README.md") -> dict[str, Any]:
    """Parse a model card the way huggingface_hub does (``ModelCard``) and return its metadata; a header
    it cannot read raises :class:`InputError`."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: huggingface_hub cannot read the model card's metadata: {e}") from None
    return card.data.to_dict()


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
    metadata: ModelCardData | None = None,
) -> str:
    """Markdown for a release of ``infos`` (the first is the one the Modelfile uses), opened by the
    Hugging Face metadata header ``metadata`` when given (see :func:`card_data`)."""
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
    for i in infos:
        if len(i.parts) > 1:
            rest = ", ".join(f"`{p.name}`" for p in i.parts[1:])
            out += [
                "",
                f"`{i.path.name}` is the first of {len(i.parts)} parts of a split GGUF (with {rest}); "
                "llama.cpp and LM Studio load the whole set from the first part: keep the parts together.",
            ]
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
    body = "\n".join(out) + "\n"
    return (card_header(metadata) + "\n" + body) if metadata is not None else body
