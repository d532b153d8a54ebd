"""The ``prepare`` verb: read chat data, normalise it, drop duplicates, split it and write a dataset folder.

Readers
    * JSON lines (``.jsonl``, ``.json``): one object per line with OpenAI-style ``messages`` (a list of
      ``{"role", "content"}``) and an optional ``domain``. A ``.json`` file holding one JSON array of such
      objects is read too.
    * CSV / TSV (``.csv``, ``.tsv``): question → answer pairs under a header row (``question/answer``,
      ``prompt/response``, ``input/output`` or ``user/assistant``, any case) and an optional ``domain``
      column.
    * Chatterbot YAML (``.yml``, ``.yaml``): ``conversations:`` is a list of lists of lines that alternate
      user / assistant. The bundled ``chatterbot-corpus`` package is read the same way, one domain per file.

A dataset folder holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one :class:`Conversation` per line,
see :meth:`Conversation.to_json`) and ``stats.json``.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.resources
import io
import json
import logging
import math
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import files
from .errors import DataError, InputError

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")
JSONL_SUFFIXES = (".jsonl", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
YAML_SUFFIXES = (".yml", ".yaml")
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES + YAML_SUFFIXES
CHATTERBOT_SOURCE = "chatterbot"
"""A source spelled ``chatterbot`` or ``chatterbot:<language>`` (and not an existing path) means the bundled
corpus."""

# CSV/TSV header names, in order of preference (matched case-insensitively).
QUESTION_COLUMNS = ("question", "prompt", "input", "user")
ANSWER_COLUMNS = ("answer", "response", "output", "assistant")
DOMAIN_COLUMN = "domain"

NO_DOMAIN = "(none)"
"""How conversations without a domain are counted in :class:`DatasetStats`."""

MAX_SKIPPED_IN_STATS = 50

_YAML_TAG = "tag:yaml.org,2002:"
# Plain YAML scalars that safe_load would turn into numbers, booleans or dates are still text in a chat line
# ("- 42", "- yes"): we keep the characters as written.
_YAML_TEXT_TAGS = {_YAML_TAG + t for t in ("str", "int", "float", "bool", "timestamp")}
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Message:
    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str


@dataclass
class Conversation:
    messages: list[Message]
    domain: str | None = None
    source: str = ""
    """Where it came from: ``path:line`` or ``chatterbot:english/greetings.yml:12``."""

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """Identity for de-duplication: the normalised messages (domain and source do not count)."""
        return tuple((m.role, m.content) for m in self.messages)

    @property
    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "domain": self.domain,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Conversation:
        """Build from :meth:`to_json`'s shape (or any JSONL chat row); raise :class:`DataError` if invalid."""
        try:
            return _conversation_from_obj(obj, source=None, default_domain=None)
        except _RowError as e:
            raise DataError(f"invalid conversation: {e}") from None


@dataclass
class ReadResult:
    conversations: list[Conversation]
    skipped: list[str] = field(default_factory=list)
    """One message per invalid row that was skipped (``skip_invalid=True``), e.g. ``data.jsonl:3: ...``."""
    unanswered_dropped: int = 0
    """Chatterbot conversations of odd length end on a user line with no reply; that line is dropped."""

    def extend(self, other: ReadResult) -> None:
        self.conversations.extend(other.conversations)
        self.skipped.extend(other.skipped)
        self.unanswered_dropped += other.unanswered_dropped


@dataclass
class DatasetStats:
    conversations: dict[str, int]
    """Per split (``train``, ``val``, ``test``) and ``total``."""
    domains: dict[str, dict[str, int]]
    """Per domain (``(none)`` for untagged), per split: ``{"greetings": {"train": 20, "val": 2, ...}}``."""
    sources: list[str] = field(default_factory=list)
    read: int = 0
    """Conversations read, before de-duplication."""
    duplicates_dropped: int = 0
    invalid_skipped: int = 0
    unanswered_dropped: int = 0
    messages: int = 0
    avg_turns: float = 0.0
    """Messages per conversation."""
    avg_user_chars: float = 0.0
    avg_assistant_chars: float = 0.0
    max_conversation_chars: int = 0
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)
    """The first few skipped rows' messages."""

    def to_json(self) -> dict[str, Any]:
        return {
            "conversations": dict(self.conversations),
            "domains": {d: dict(c) for d, c in self.domains.items()},
            "sources": list(self.sources),
            "read": self.read,
            "duplicates_dropped": self.duplicates_dropped,
            "invalid_skipped": self.invalid_skipped,
            "unanswered_dropped": self.unanswered_dropped,
            "messages": self.messages,
            "avg_turns": self.avg_turns,
            "avg_user_chars": self.avg_user_chars,
            "avg_assistant_chars": self.avg_assistant_chars,
            "max_conversation_chars": self.max_conversation_chars,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "skipped_examples": list(self.skipped_examples),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DatasetStats:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass
class PrepareResult:
    out_dir: Path
    train_path: Path
    val_path: Path
    test_path: Path
    stats: DatasetStats
    stats_path: Path | None = None
    skipped: list[str] = field(default_factory=list)
    """Every skipped row's message (``stats.json`` keeps only the first few)."""


# --------------------------------------------------------------------------------------------- helpers


class _RowError(Exception):
    """One invalid row; the reader adds ``file:line`` and either raises DataError or skips it."""


def normalise_text(text: str) -> str:
    """Strip, turn ``\\r\\n`` / ``\\r`` into ``\\n``, Unicode NFC."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def _check_roles(messages: list[Message]) -> None:
    roles = {m.role for m in messages}
    if "user" not in roles:
        raise _RowError("no user turn")
    if "assistant" not in roles:
        raise _RowError("no assistant turn")


def _conversation_from_obj(obj: Any, *, source: str | None, default_domain: str | None) -> Conversation:
    if not isinstance(obj, dict):
        raise _RowError(f'expected a JSON object with "messages", got {_json_type(obj)}')
    if "messages" not in obj:
        raise _RowError('missing "messages" (a list of {"role", "content"} objects)')
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise _RowError(f'"messages" must be a list, got {_json_type(raw)}')
    if not raw:
        raise _RowError('"messages" is empty')
    messages: list[Message] = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise _RowError(f"message {i} must be an object with role and content, got {_json_type(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            shown = "missing" if role is None else repr(role)
            raise _RowError(f"message {i} has unknown role {shown} (expected system, user or assistant)")
        content = m.get("content")
        if not isinstance(content, str):
            raise _RowError(f"message {i} ({role}) content must be a string, got {_json_type(content)}")
        content = normalise_text(content)
        if not content:
            raise _RowError(f"message {i} ({role}) has empty content")
        messages.append(Message(role, content))
    _check_roles(messages)
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise _RowError(f'"domain" must be a string, got {_json_type(domain)}')
    domain = normalise_text(domain) if domain else None
    src = obj.get("source", "") if source is None else source
    return Conversation(messages, domain=domain or default_domain, source=str(src or ""))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "a number" if isinstance(v, int | float) else type(v).__name__
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


class _Collector:
    """Collects a file's conversations; turns row errors into DataError or skipped messages."""

    def __init__(self, path: Path | str, skip_invalid: bool) -> None:
        self.path = path
        self.skip_invalid = skip_invalid
        self.result = ReadResult([], [])

    def bad(self, where: str, err: _RowError | str) -> None:
        msg = f"{where}: {err}"
        if not self.skip_invalid:
            raise DataError(msg)
        log.debug("skipping %s", msg)
        self.result.skipped.append(msg)

    def done(self) -> ReadResult:
        if not self.result.conversations:
            extra = f" ({len(self.result.skipped)} invalid rows skipped)" if self.result.skipped else ""
            raise DataError(f"no conversations found in {self.path}{extra}")
        log.debug(
            "%s: %d conversations, %d skipped",
            self.path,
            len(self.result.conversations),
            len(self.result.skipped),
        )
        return self.result


# --------------------------------------------------------------------------------------------- readers


def read_chat_file(
    path: str | os.PathLike[str], *, skip_invalid: bool = False, domain: str | None = None
) -> ReadResult:
    """Read one chat data file, dispatching on its suffix.

    ``domain`` tags conversations that carry no domain of their own (a JSONL ``domain`` field, a CSV
    ``domain`` column, a chatterbot file's first ``categories:`` entry). Invalid rows raise
    :class:`DataError` naming ``file:line`` unless ``skip_invalid``; a file with no valid conversation
    always raises.
    """
    p = files.require_file(path, "chat data file")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        result = _read_jsonl(p, skip_invalid=skip_invalid, domain=domain)
    elif suffix in CSV_SUFFIXES:
        result = _read_csv(p, skip_invalid=skip_invalid, domain=domain)
    elif suffix in YAML_SUFFIXES:
        result = _read_chatterbot_yaml(p, skip_invalid=skip_invalid, domain=domain, source_name=str(p))
    else:
        raise InputError(
            f"unsupported chat data file type {p.suffix or '(no suffix)'!r}: {p} "
            f"(expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    log.info(
        "%s: %d conversations%s",
        p,
        len(result.conversations),
        f", {len(result.skipped)} invalid rows skipped" if result.skipped else "",
    )
    return result


def _read_jsonl(path: Path, *, skip_invalid: bool, domain: str | None) -> ReadResult:
    text = _read_text(path)
    out = _Collector(path, skip_invalid)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        # A whole-file JSON array of rows.
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, obj in enumerate(rows, 1):
            where = f"{path}: item {i}"
            try:
                conv = _conversation_from_obj(obj, source=f"{path}:item{i}", default_domain=domain)
            except _RowError as e:
                out.bad(where, e)
                continue
            out.result.conversations.append(conv)
        return out.done()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.bad(where, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            conv = _conversation_from_obj(obj, source=where, default_domain=domain)
        except _RowError as e:
            out.bad(where, e)
            continue
        out.result.conversations.append(conv)
    return out.done()


def _pick_column(header: list[str], names: Sequence[str]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _read_csv(path: Path, *, skip_invalid: bool, domain: str | None) -> ReadResult:
    text = _read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    out = _Collector(path, skip_invalid)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    q_col = a_col = d_col = None
    prev_end = 0
    while True:
        start = prev_end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            # A broken quote: the rest of the file cannot be trusted.
            raise DataError(f"{path}:{reader.line_num}: malformed {path.suffix[1:].upper()} ({e})") from None
        prev_end = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{start}"
        if header is None:
            header = [c.strip().lower() for c in row]
            q_col = _pick_column(header, QUESTION_COLUMNS)
            a_col = _pick_column(header, ANSWER_COLUMNS)
            d_col = _pick_column(header, (DOMAIN_COLUMN,))
            if q_col is None or a_col is None:
                found = ", ".join(repr(c.strip()) for c in row)
                raise DataError(
                    f"{where}: wrong columns in header row: found {found}; expected a header with "
                    "question,answer or prompt,response or input,output or user,assistant "
                    "(any case; optional domain column)"
                )
            log.debug("%s: using columns %r -> %r", path, header[q_col], header[a_col])
            continue
        assert q_col is not None and a_col is not None
        if len(row) != len(header):
            out.bad(where, f"row has {len(row)} fields, header has {len(header)}")
            continue
        question, answer = normalise_text(row[q_col]), normalise_text(row[a_col])
        if not question:
            out.bad(where, f"empty {header[q_col]!r} cell")
            continue
        if not answer:
            out.bad(where, f"empty {header[a_col]!r} cell")
            continue
        row_domain = normalise_text(row[d_col]) if d_col is not None else ""
        out.result.conversations.append(
            Conversation(
                [Message("user", question), Message("assistant", answer)],
                domain=row_domain or domain,
                source=where,
            )
        )
    if header is None:
        raise DataError(f"no conversations found in {path} (the file is empty)")
    return out.done()


def _yaml_mapping_get(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None


def _read_chatterbot_yaml(
    path: Path, *, skip_invalid: bool, domain: str | None, source_name: str, category_domain: bool = True
) -> ReadResult:
    """Chatterbot corpus format. Composed with the safe loader (nodes only, nothing is constructed), which
    also gives each conversation's line number."""
    text = _read_text(path)
    out = _Collector(source_name, skip_invalid)
    try:
        root = yaml.compose(text, Loader=_SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{source_name}:{mark.line + 1}" if mark is not None else source_name
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataError(f"{where}: invalid YAML ({problem})") from None
    if root is not None:  # aliases may not expand it past its own length (no alias bomb)
        from .schema import MAX_YAML_NODES, check_yaml_expansion

        try:
            check_yaml_expansion(root, source_name, budget=max(MAX_YAML_NODES, len(text)))
        except InputError as e:
            raise DataError(str(e)) from None
    expected = "expected a chatterbot corpus: a mapping with a 'conversations:' list of lists of lines"
    if root is None:
        raise DataError(f"no conversations found in {source_name} (the file is empty)")
    if not isinstance(root, yaml.MappingNode):
        raise DataError(f"{source_name}:{root.start_mark.line + 1}: {expected}")
    if domain is None and category_domain:
        cats = _yaml_mapping_get(root, "categories")
        if isinstance(cats, yaml.SequenceNode) and cats.value and isinstance(cats.value[0], yaml.ScalarNode):
            domain = normalise_text(cats.value[0].value) or None
    convs = _yaml_mapping_get(root, "conversations")
    if convs is None:
        raise DataError(f"{source_name}: no 'conversations:' key; {expected}")
    if isinstance(convs, yaml.ScalarNode) and convs.tag == _YAML_TAG + "null":
        raise DataError(f"no conversations found in {source_name} ('conversations:' is empty)")
    if not isinstance(convs, yaml.SequenceNode):
        raise DataError(
            f"{source_name}:{convs.start_mark.line + 1}: 'conversations:' is not a list; {expected}"
        )
    for item in convs.value:
        where = f"{source_name}:{item.start_mark.line + 1}"
        try:
            messages, dropped = _chatterbot_messages(item)
        except _RowError as e:
            out.bad(where, e)
            continue
        out.result.unanswered_dropped += dropped
        out.result.conversations.append(Conversation(messages, domain=domain, source=where))
    return out.done()


def _chatterbot_messages(item: yaml.Node) -> tuple[list[Message], int]:
    if not isinstance(item, yaml.SequenceNode):
        what = "a single line of text" if isinstance(item, yaml.ScalarNode) else "a mapping"
        raise _RowError(f"conversation must be a list of lines (user, assistant, ...), got {what}")
    lines: list[str] = []
    for j, child in enumerate(item.value, 1):
        if child.tag in (_YAML_TAG + "seq", _YAML_TAG + "map"):
            kind = "a list" if child.tag.endswith("seq") else "a mapping"
            raise _RowError(f"line {j} is {kind}, not text")
        if child.tag == _YAML_TAG + "null":
            raise _RowError(f"line {j} is empty")
        if not isinstance(child, yaml.ScalarNode) or child.tag not in _YAML_TEXT_TAGS:
            raise _RowError(f"line {j} is not text (tag {child.tag})")
        content = normalise_text(child.value)
        if not content:
            raise _RowError(f"line {j} is empty")
        lines.append(content)
    if len(lines) < 2:
        raise _RowError("no assistant turn (a conversation needs a user line and a reply)")
    dropped = len(lines) % 2
    if dropped:
        lines = lines[:-1]
    messages = [Message("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(lines)]
    return messages, dropped


def chatterbot_data_dir() -> Path:
    """The installed ``chatterbot-corpus`` package's ``data`` folder."""
    try:
        root = importlib.resources.files("chatterbot_corpus")
    except ModuleNotFoundError:
        raise InputError(
            "the chatterbot-corpus package is not installed (pip install chatterbot-corpus), "
            "so there is no bundled corpus; pass your own chat data files"
        ) from None
    data = Path(str(root)) / "data"
    if not data.is_dir():
        raise InputError(f"the chatterbot-corpus package has no data folder: {data}")
    return data


def chatterbot_languages() -> list[str]:
    return sorted(p.name for p in chatterbot_data_dir().iterdir() if p.is_dir() and any(p.glob("*.yml")))


def _category_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def read_chatterbot_corpus(
    language: str = "english", categories: Sequence[str] | None = None, *, skip_invalid: bool = True
) -> ReadResult:
    """Read the bundled chatterbot corpus: ``data/<language>/*.yml``, each file's stem its domain.

    The bundled data holds a few odd entries (a plain string instead of a list of lines): by default they are
    skipped and listed in ``skipped``, so the bundled corpus never fails; ``skip_invalid=False`` raises.

    ``categories`` selects files by stem (case-insensitive; ``"tech support"`` matches ``tech_support``).
    """
    data = chatterbot_data_dir()
    lang_dir = data / language.strip().lower()
    if not lang_dir.is_dir():
        raise InputError(
            f"chatterbot corpus has no language {language!r} (available: {', '.join(chatterbot_languages())})"
        )
    paths = sorted(lang_dir.glob("*.yml")) + sorted(lang_dir.glob("*.yaml"))
    if categories is not None:
        by_key = {_category_key(p.stem): p for p in paths}
        wanted = [_category_key(c) for c in categories]
        unknown = [c for c, k in zip(categories, wanted, strict=True) if k not in by_key]
        if unknown:
            raise InputError(
                f"chatterbot corpus ({lang_dir.name}) has no categor{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(map(repr, unknown))} (available: {', '.join(sorted(by_key))})"
            )
        paths = [by_key[k] for k in dict.fromkeys(wanted)]
    result = ReadResult([], [])
    for p in paths:
        name = f"chatterbot:{lang_dir.name}/{p.name}"
        try:
            part = _read_chatterbot_yaml(
                p, skip_invalid=skip_invalid, domain=p.stem, source_name=name, category_domain=False
            )
        except DataError as e:
            if not skip_invalid:
                raise
            result.skipped.append(str(e))
            continue
        result.extend(part)
    if not result.conversations:
        raise DataError(f"no conversations found in chatterbot corpus {lang_dir.name}")
    log.info(
        "chatterbot corpus (%s): %d conversations from %d files, %d invalid entries skipped",
        lang_dir.name,
        len(result.conversations),
        len(paths),
        len(result.skipped),
    )
    return result


def _expand_sources(sources: Iterable[str | os.PathLike[str]]) -> list[str | Path]:
    """Folders become their supported files (sorted, not recursive); chatterbot specs pass through."""
    out: list[str | Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise InputError(f"no chat data files ({', '.join(SUPPORTED_SUFFIXES)}) in folder {p}")
            out.extend(found)
        elif not p.exists() and str(s).split(":", 1)[0] == CHATTERBOT_SOURCE:
            out.append(str(s))
        else:
            out.append(p)
    return out


def read_sources(
    sources: Sequence[str | os.PathLike[str]] | None,
    *,
    skip_invalid: bool = False,
    language: str = "english",
    categories: Sequence[str] | None = None,
) -> ReadResult:
    """Read every source (``None``: the bundled chatterbot corpus). All missing files are checked first."""
    if sources is None:
        return read_chatterbot_corpus(language, categories, skip_invalid=True)
    expanded = _expand_sources(sources)
    if not expanded:
        raise InputError("no chat data sources given")
    for s in expanded:
        if isinstance(s, Path):
            files.require_file(s, "chat data file")
    result = ReadResult([], [])
    for s in expanded:
        if isinstance(s, Path):
            result.extend(read_chat_file(s, skip_invalid=skip_invalid))
        else:
            lang = s.split(":", 1)[1] if ":" in s else language
            result.extend(read_chatterbot_corpus(lang, categories, skip_invalid=True))
    return result


# --------------------------------------------------------------------------------------------- dedupe, split


def dedupe(conversations: Iterable[Conversation]) -> tuple[list[Conversation], int]:
    """Keep the first of each set of conversations with the same normalised messages."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    kept: list[Conversation] = []
    dropped = 0
    for c in conversations:
        k = c.key
        if k in seen:
            dropped += 1
            continue
        seen.add(k)
        kept.append(c)
    return kept, dropped


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _allocate(sizes: list[int], fraction: float, target: int, caps: list[int]) -> list[int]:
    """Split ``target`` items over groups proportionally to ``sizes`` (largest remainder), within ``caps``."""
    quotas = [s * fraction for s in sizes]
    alloc = [min(int(math.floor(q)), c) for q, c in zip(quotas, caps, strict=True)]
    remaining = target - sum(alloc)
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), -sizes[i], i))
    while remaining > 0:
        progressed = False
        for i in order:
            if remaining <= 0:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def split_conversations(
    conversations: Sequence[Conversation],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 1234,
) -> dict[str, list[Conversation]]:
    """Split by conversation, stratified per domain, deterministic for the same input order and seed.

    Split sizes are ``round(n * fraction)`` overall (at least one each for val and test when a fraction is
    positive and there are ≥ 3 conversations; train always keeps at least one). Each domain gets its
    proportional share, leftovers going to the domains with the largest remainders, so a domain too small
    for its own val/test share stays in train unless needed. Each domain is shuffled with its own
    ``random.Random(f"{seed}:{domain}")`` so adding a domain does not reshuffle the others.
    """
    _check_fractions(val_fraction, test_fraction)
    n = len(conversations)
    groups: dict[str, list[Conversation]] = {}
    for c in conversations:
        groups.setdefault(c.domain if c.domain is not None else NO_DOMAIN, []).append(c)
    names = sorted(groups)
    sizes = [len(groups[d]) for d in names]

    def target(fraction: float) -> int:
        if fraction <= 0 or n < 3:
            return 0
        return max(1, _round(n * fraction))

    n_val, n_test = target(val_fraction), target(test_fraction)
    while n_val + n_test > n - 1 and n_val + n_test > 0:  # train keeps at least one
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    # Prefer leaving each domain one training conversation; relax only if the targets cannot be met.
    soft_caps = [max(s - 1, 0) for s in sizes]
    val_alloc = _allocate(sizes, val_fraction, n_val, soft_caps)
    if sum(val_alloc) < n_val:
        val_alloc = _allocate(sizes, val_fraction, n_val, sizes)
    test_caps = [max(c - v, 0) for c, v in zip(soft_caps, val_alloc, strict=True)]
    test_alloc = _allocate(sizes, test_fraction, n_test, test_caps)
    if sum(test_alloc) < n_test:
        test_alloc = _allocate(
            sizes, test_fraction, n_test, [s - v for s, v in zip(sizes, val_alloc, strict=True)]
        )

    out: dict[str, list[Conversation]] = {s: [] for s in SPLITS}
    for name, nv, nt in zip(names, val_alloc, test_alloc, strict=True):
        items = list(groups[name])
        random.Random(f"{seed}:{name}").shuffle(items)
        out["val"].extend(items[:nv])
        out["test"].extend(items[nv : nv + nt])
        out["train"].extend(items[nv + nt :])
    mix = random.Random(seed)
    for s in SPLITS:
        mix.shuffle(out[s])
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(f, int | float) and 0 <= f < 1):
            raise InputError(f"{name} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise InputError(
            f"val_fraction + test_fraction must be below 1 so training keeps some data, "
            f"got {val_fraction} + {test_fraction}"
        )


# --------------------------------------------------------------------------------------------- stats


def compute_stats(
    splits: dict[str, list[Conversation]],
    *,
    read: int = 0,
    duplicates_dropped: int = 0,
    skipped: Sequence[str] = (),
    unanswered_dropped: int = 0,
    sources: Sequence[str] = (),
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
) -> DatasetStats:
    counts = {s: len(splits.get(s, [])) for s in SPLITS}
    counts["total"] = sum(counts.values())
    domains: dict[str, Counter[str]] = {}
    messages = user_chars = user_n = asst_chars = asst_n = max_chars = 0
    for s in SPLITS:
        for c in splits.get(s, []):
            domains.setdefault(c.domain if c.domain is not None else NO_DOMAIN, Counter())[s] += 1
            messages += len(c.messages)
            max_chars = max(max_chars, c.chars)
            for m in c.messages:
                if m.role == "user":
                    user_chars += len(m.content)
                    user_n += 1
                elif m.role == "assistant":
                    asst_chars += len(m.content)
                    asst_n += 1
    total = counts["total"]
    return DatasetStats(
        conversations=counts,
        domains={
            d: {s: domains[d][s] for s in SPLITS} | {"total": sum(domains[d].values())}
            for d in sorted(domains)
        },
        sources=list(sources),
        read=read or total + duplicates_dropped,
        duplicates_dropped=duplicates_dropped,
        invalid_skipped=len(skipped),
        unanswered_dropped=unanswered_dropped,
        messages=messages,
        avg_turns=round(messages / total, 2) if total else 0.0,
        avg_user_chars=round(user_chars / user_n, 1) if user_n else 0.0,
        avg_assistant_chars=round(asst_chars / asst_n, 1) if asst_n else 0.0,
        max_conversation_chars=max_chars,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        skipped_examples=list(skipped[:MAX_SKIPPED_IN_STATS]),
    )


def render_stats_table(stats: DatasetStats) -> Table:
    """A rich table: one row per domain with its train / val / test counts, then the totals."""
    from rich.table import Table

    table = Table(title="Dataset", title_justify="left")
    table.add_column("domain")
    for s in (*SPLITS, "total"):
        table.add_column(s, justify="right")
    for d, c in stats.domains.items():
        table.add_row(d, *(str(c.get(s, 0)) for s in (*SPLITS, "total")))
    table.add_section()
    table.add_row("all", *(str(stats.conversations.get(s, 0)) for s in (*SPLITS, "total")), style="bold")
    table.caption = (
        f"{stats.read} read, {stats.duplicates_dropped} duplicates dropped, "
        f"{stats.invalid_skipped} invalid skipped; {stats.avg_turns} turns/conversation, "
        f"avg chars user {stats.avg_user_chars} / assistant {stats.avg_assistant_chars}"
    )
    return table


# --------------------------------------------------------------------------------------------- prepare


def prepare(
    sources: Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 1234,
    skip_invalid: bool = False,
    language: str = "english",
    categories: Sequence[str] | None = None,
) -> PrepareResult:
    """Read, normalise, de-duplicate and split chat data into ``out_dir``.

    ``sources=None`` reads the bundled chatterbot corpus (``language``, optionally only ``categories``), each
    category a domain; a source spelled ``chatterbot`` or ``chatterbot:<language>`` adds it to your own files.
    Everything is read and checked before anything is written; the four files are written to temporary
    names and renamed into place together, so a failure leaves no half-written file.
    """
    _check_fractions(val_fraction, test_fraction)
    files.check_output_dir(out_dir)
    if Path(out_dir).is_dir():  # each file it will write: never one of the sources
        for name in [*(f"{s}.jsonl" for s in SPLITS), "stats.json"]:
            files.check_output_path(Path(out_dir) / name, inputs=list(sources or ()))
    read = read_sources(sources, skip_invalid=skip_invalid, language=language, categories=categories)
    if not read.conversations:
        raise DataError("no conversations found in the given sources")
    kept, dup = dedupe(read.conversations)
    if dup:
        log.info("dropped %d duplicate conversations", dup)
    if read.skipped:
        log.warning("skipped %d invalid rows, e.g. %s", len(read.skipped), read.skipped[0])
    splits = split_conversations(kept, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if len(kept) < 3:
        log.warning("only %d conversations: val and test are empty", len(kept))
    source_names = (
        [f"chatterbot:{language}" + (f" ({', '.join(categories)})" if categories else "")]
        if sources is None
        else [str(s) for s in sources]
    )
    stats = compute_stats(
        splits,
        read=len(read.conversations),
        duplicates_dropped=dup,
        skipped=read.skipped,
        unanswered_dropped=read.unanswered_dropped,
        sources=source_names,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )

    out = files.prepare_output_dir(out_dir)
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    stats_path = out / "stats.json"
    with contextlib.ExitStack() as stack:
        # Every file goes to a temporary name first; they are renamed only once all four are written.
        tmps = {s: stack.enter_context(files.atomic_path(p)) for s, p in paths.items()}
        tmp_stats = stack.enter_context(files.atomic_path(stats_path))
        for s in SPLITS:
            tmps[s].write_text(_jsonl(splits[s]), encoding="utf-8")
        tmp_stats.write_text(
            json.dumps(stats.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    log.info(
        "wrote %s: %d train, %d val, %d test",
        out,
        stats.conversations["train"],
        stats.conversations["val"],
        stats.conversations["test"],
    )
    return PrepareResult(
        out_dir=out,
        train_path=paths["train"],
        val_path=paths["val"],
        test_path=paths["test"],
        stats=stats,
        stats_path=stats_path,
        skipped=list(read.skipped),
    )


def _jsonl(conversations: Iterable[Conversation]) -> str:
    return "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in conversations)


def write_split(path: str | os.PathLike[str], conversations: Iterable[Conversation]) -> Path:
    """Write conversations in our split format (atomically)."""
    return files.atomic_write_text(path, _jsonl(conversations))


# --------------------------------------------------------------------------------------------- loading


def load_split(path: str | os.PathLike[str]) -> list[Conversation]:
    """Read one of our split files (``train.jsonl``...). An empty file is an empty split."""
    p = files.require_file(path, "dataset split")
    out: list[Conversation] = []
    for lineno, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        try:
            out.append(_conversation_from_obj(obj, source=None, default_domain=None))
        except _RowError as e:
            raise DataError(f"{p}:{lineno}: {e}") from None
    return out


def load_dataset(data_dir: str | os.PathLike[str]) -> dict[str, list[Conversation]]:
    """Load a folder written by :func:`prepare`: ``{"train": [...], "val": [...], "test": [...]}``."""
    d = files.require_dir(data_dir, "dataset folder")
    missing = [f"{s}.jsonl" for s in SPLITS if not (d / f"{s}.jsonl").is_file()]
    if missing:
        raise DataError(
            f"{d} is not a prepared dataset: missing {', '.join(missing)} "
            "(run `gguf-factory prepare` to make one)"
        )
    return {s: load_split(d / f"{s}.jsonl") for s in SPLITS}


def load_stats(data_dir: str | os.PathLike[str]) -> DatasetStats | None:
    """The dataset folder's ``stats.json``, or None if it has none."""
    p = Path(data_dir) / "stats.json"
    if not p.is_file():
        return None
    try:
        return DatasetStats.from_json(json.loads(_read_text(p)))
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{p}: invalid stats file ({e})") from None
