"""Ollama Modelfiles: writing one for a GGUF, and reading one back the way Ollama's parser does.

Facts of Ollama's Modelfile syntax used here: one instruction per line (FROM, TEMPLATE, SYSTEM,
PARAMETER name value...), ``#`` comments; a value is bare text to the end of the line, ``"..."`` or
``\"\"\"...\"\"\"`` (may span lines); no escape sequences are processed, and characters outside Go's
strconv.IsPrint other than space, tab and newlines are dropped. FROM paths are relative to the
Modelfile's folder. ``PARAMETER stop`` may repeat.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..files import atomic_path, atomic_write_text, check_output_path, prepare_output_dir
from .info import ModelInfo, read_model_info
from .ollama_template import OllamaTemplate, TemplateExportError, _go_printable, derive_ollama_template

log = logging.getLogger(__name__)


@dataclass
class OllamaExport:
    modelfile: Path
    gguf: Path
    template: OllamaTemplate | None
    num_ctx: int | None
    warnings: list[str] = field(default_factory=list)
    tools: bool = False  # the TEMPLATE renders tools, tool calls and tool results (see tools_summary)

    @property
    def tools_summary(self) -> str:
        """One line: whether the TEMPLATE renders tools, and why not."""
        if self.template is None:
            return "not rendered (no TEMPLATE: the GGUF has no chat template)"
        return self.template.tools_summary()


def _printable(s: str) -> bool:
    return all(ch in "\n\t\r" or _go_printable(ch) for ch in s)


def quote_value(value: str, what: str) -> str:
    """A Modelfile value that Ollama reads back as exactly ``value``."""
    if '"""' in value:
        raise InputError(f'{what} cannot contain """ (a Modelfile has no escapes): {value[:60]!r}')
    if not _printable(value):
        raise InputError(f"{what} contains characters Ollama's Modelfile parser drops: {value[:60]!r}")
    if "\n" in value or "\r" in value or value.endswith('"'):
        if value.endswith('"') or value.startswith('"'):
            raise InputError(f"{what} cannot start or end with a double quote: {value[:60]!r}")
        return f'"""{value}"""'
    return f'"{value}"'


def render_modelfile(
    from_path: str,
    template: OllamaTemplate | None,
    num_ctx: int | None,
    system: str | None = None,
    header: str | None = None,
) -> str:
    lines = []
    if header:
        lines += [f"# {line}" for line in header.splitlines()] + [""]
    lines.append(f"FROM {from_path}")
    if template is not None:
        lines.append(f"TEMPLATE {quote_value(template.template, 'the Ollama template')}")
    if system is not None:
        lines.append(f"SYSTEM {quote_value(system, 'the system prompt')}")
    stops = template.stops if template is not None else []
    for stop in stops:
        try:
            lines.append(f"PARAMETER stop {quote_value(stop, 'a stop string')}")
        except InputError as e:
            log.warning("left out a stop string: %s", e)
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, value) pairs, instruction lower-case (PARAMETER gives ("parameter name", value)).

    Raises :class:`InputError` on an unterminated quoted value or a malformed line.
    """
    out: list[tuple[str, str]] = []
    i, n, line = 0, len(text), 1
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            line += ch == "\n"
            i += 1
            continue
        if ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        j = i
        while j < n and text[j].isascii() and text[j].isalpha():
            j += 1
        name = text[i:j].lower()
        if not name or j >= n or text[j] not in " \t":
            raise InputError(f"Modelfile line {line}: expected an instruction followed by a value")
        i = j
        while i < n and text[i] in " \t":
            i += 1
        if name in ("parameter", "message"):
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            name = f"{name} {text[i:j]}"
            i = j
            while i < n and text[i] in " \t":
                i += 1
        if text.startswith('"""', i):
            end = text.find('"""', i + 3)
            if end < 0:
                raise InputError(f'Modelfile line {line}: unterminated """ value')
            value = text[i + 3 : end]
            line += value.count("\n")
            i = end + 3
        else:
            j = text.find("\n", i)
            j = n if j < 0 else j
            value = text[i:j].strip()
            i = j
            if value.startswith('"'):
                if len(value) < 2 or not value.endswith('"'):
                    raise InputError(f'Modelfile line {line}: unterminated " value')
                value = value[1:-1]
        out.append((name, value))
    return out


def place_file(src: Path, dest: Path, copy: bool = False) -> Path:
    """Put ``src`` at ``dest`` atomically: a hard link when allowed and ``copy`` is false, else a copy."""
    if dest.exists() and os.path.samefile(src, dest):
        return dest
    with atomic_path(dest) as tmp:
        linked = False
        if not copy:
            try:
                os.link(src, tmp)
                linked = True
            except OSError:
                linked = False
        if not linked:
            shutil.copyfile(src, tmp)
    return dest


def place_parts(parts: list[Path], folder: Path, copy: bool = False) -> list[Path]:
    """:func:`place_file` for every part of a GGUF (one file, or a split set) into ``folder``; the first
    part last, so that a reader never finds a first part whose other parts are not there yet."""
    placed = {p: place_file(p, folder / p.name, copy=copy) for p in reversed(parts)}
    return [placed[p] for p in parts]


def split_warning(info: ModelInfo) -> str:
    return (
        f"{info.path.name} is the first of {len(info.parts)} parts of a split GGUF: llama.cpp and LM Studio "
        "load the set from it, but Ollama may not import a split GGUF; if `ollama create` refuses it, merge "
        "the parts first (llama.cpp's `llama-gguf-split --merge`)"
    )


def ollama_template_for(info: ModelInfo) -> OllamaTemplate | None:
    """The derived TEMPLATE, or None when the file has no chat template."""
    if info.chat_template is None:
        return None
    try:
        return derive_ollama_template(info.chat_template, info.bos, info.eos, info.add_bos)
    except TemplateExportError as e:
        raise TemplateExportError(f"{info.path.name}: {e}") from None


def check_system(template: OllamaTemplate | None, system: str | None, what: str) -> None:
    if system is not None and template is not None and template.system_note:
        raise InputError(f"{what}: cannot set a system prompt: {template.system_note}")


def ollama_model_name(name: str) -> str:
    """A name for ``ollama create``: lower case, letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip(".-") or "model"


def modelfile_for(
    info: ModelInfo,
    from_name: str,
    system: str | None = None,
    num_ctx: int | None = None,
    ollama_name: str | None = None,
) -> tuple[str, OllamaTemplate | None, list[str]]:
    template = ollama_template_for(info)
    check_system(template, system, str(info.path))
    warnings = list(template.warnings) if template else []
    if template is None:
        warnings.append(
            f"{info.path.name} has no chat template (tokenizer.chat_template): the Modelfile has no TEMPLATE"
        )
    header = (
        f"Ollama Modelfile for {info.path.name}, written by gguf-factory.\n"
        f"ollama create {ollama_name or ollama_model_name(info.basename)} -f Modelfile"
    )
    if template is not None and template.strip_bos:
        header += (
            f"\nThe TEMPLATE leaves out the BOS string {template.bos!r}: Ollama adds the BOS token itself."
        )
    text = render_modelfile(f"./{from_name}", template, num_ctx or info.num_ctx, system, header=header)
    return text, template, warnings


def export_ollama(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    system: str | None = None,
    num_ctx: int | None = None,
    copy: bool = False,
) -> OllamaExport:
    """Write ``out_dir/Modelfile`` next to the GGUF (hard-linked, or copied with ``copy``).

    ``ollama create NAME -f out_dir/Modelfile`` then builds the model. Raises
    :class:`TemplateExportError` when the chat template cannot be reproduced (see ollama_template).
    """
    info = read_model_info(model)
    if num_ctx is not None and num_ctx <= 0:
        raise InputError(f"num_ctx must be positive, got {num_ctx}")
    text, template, warnings = modelfile_for(info, info.path.name, system, num_ctx)
    parts = info.parts or [info.path]
    if len(parts) > 1:
        warnings.append(split_warning(info))
    out = Path(out_dir)
    if out.is_dir() and not out.is_symlink():  # before anything is written: never over the GGUF itself
        check_output_path(out / "Modelfile", inputs=parts)
        for part in parts:
            dest = out / part.name
            if not (dest.exists() and os.path.samefile(dest, part)):
                check_output_path(dest, inputs=parts)
    out = prepare_output_dir(out_dir)
    dest = place_parts(parts, out, copy=copy)[0]
    modelfile = atomic_write_text(out / "Modelfile", text)
    for w in warnings:
        log.warning("%s", w)
    tools = template is not None and template.tools
    return OllamaExport(modelfile, dest, template, num_ctx or info.num_ctx, warnings, tools=tools)
