"""LM Studio's folder layout, release folders (GGUFs, SHA256SUMS, README.md, Modelfile) and their check."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FactoryError, InputError
from ..files import atomic_path, check_output_dir, prepare_output_dir, sha256_file
from ..splitset import PART_NAME
from .card import card_data, check_card, model_card, read_ladder
from .info import read_model_info
from .modelfile import modelfile_for, ollama_model_name, parse_modelfile, place_parts, split_warning

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_component(s: str, what: str) -> str:
    out = _UNSAFE_NAME.sub("-", s).strip(".-")
    if not out:
        raise InputError(f"{what} {s!r} has no usable characters for a folder name")
    return out


# ---------------------------------------------------------------------------------------------------
# LM Studio
# ---------------------------------------------------------------------------------------------------


@dataclass
class LMStudioExport:
    gguf: Path
    folder: Path


def export_lmstudio(
    model: str | os.PathLike[str],
    models_dir: str | os.PathLike[str],
    *,
    publisher: str = "gguf-factory",
    name: str | None = None,
    copy: bool = False,
) -> LMStudioExport:
    """Place the GGUF as ``models_dir/<publisher>/<name>-GGUF/<file>.gguf``, LM Studio's models layout.

    ``name`` defaults to the file's ``general.basename``. The file is hard-linked (copied with ``copy``
    or across file systems); ``models_dir`` may not exist yet but its parent must.
    """
    info = read_model_info(model)
    pub = _safe_component(publisher, "publisher")
    base = _safe_component(name or info.basename, "model name")
    folder_name = base if base.endswith("-GGUF") else f"{base}-GGUF"
    root = prepare_output_dir(models_dir)
    folder = root / pub / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    dest = place_parts(info.parts or [info.path], folder, copy=copy)[0]  # LM Studio loads a split set whole
    return LMStudioExport(dest, folder)


# ---------------------------------------------------------------------------------------------------
# release
# ---------------------------------------------------------------------------------------------------


class PushError(FactoryError):
    """The release folder could not be uploaded to the Hugging Face Hub (it is kept as written)."""


@dataclass
class ReleaseResult:
    folder: Path
    ggufs: list[Path]
    """Every GGUF file of the release (each part of a split set)."""
    modelfile: Path
    card: Path
    sums: Path
    warnings: list[str] = field(default_factory=list)
    card_data: dict[str, object] = field(default_factory=dict)
    """The model card's Hugging Face metadata, as huggingface_hub reads it back."""
    pushed: str | None = None
    """The Hub repository's URL after ``push``."""


def export_release(
    ggufs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    ladder: str | os.PathLike[str] | None = None,
    system: str | None = None,
    name: str | None = None,
    publisher: str = "gguf-factory",
    base_model: str | None = None,
    license: str | None = None,
    push: str | None = None,
) -> ReleaseResult:
    """A release folder: the GGUFs (copied; every part of a split set given by its first part),
    ``Modelfile`` (for the first GGUF), ``README.md`` and ``SHA256SUMS``. Built in a temporary folder
    beside ``out_dir`` and renamed into place; an existing non-empty ``out_dir`` is refused.

    README.md opens with the Hugging Face model-card metadata (:func:`gguf_factory.package.card.card_data`:
    base_model, license, tags, quantized_by, pipeline_tag, language, from the files' ``general.*`` keys;
    ``base_model`` / ``license`` override them), checked by reading it back with huggingface_hub.

    ``push``: a Hub repository id (``org/name``): the finished folder is uploaded with huggingface_hub
    (``create_repo(exist_ok=True)``, then one ``upload_folder`` call; ``HF_TOKEN`` and the rest of
    huggingface_hub's environment are honoured). A failed upload (no network, ``HF_HUB_OFFLINE=1``, no
    permission) raises :class:`PushError` naming the repository and the reason; the folder is kept."""
    if not ggufs:
        raise InputError("export release needs at least one GGUF file")
    if push is not None:
        _check_repo_id(push)
    infos = [read_model_info(p) for p in ggufs]
    files = [q for i in infos for q in (i.parts or [i.path])]
    names = [q.name for q in files]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two input GGUFs have the same file name: {', '.join(dup)}")
    if any(n in (SUMS, "README.md", "Modelfile") for n in names):
        raise InputError("a GGUF may not be named SHA256SUMS, README.md or Modelfile")
    out = check_output_dir(out_dir, inputs=[*files, ladder])
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    need = sum(i.size_bytes for i in infos)
    free = shutil.disk_usage(out.parent if str(out.parent) else Path(".")).free
    if need > free:
        raise InputError(f"not enough disk space for {out}: {need} bytes needed, {free} free")
    rungs = read_ladder(ladder) if ladder is not None else None
    warnings: list[str] = []
    if rungs is not None and not any(i.path.name in rungs for i in infos):
        warnings.append(f"{ladder}: the ladder JSON lists none of the release's files; no quality figures")
    main = infos[0]
    templates = {i.chat_template for i in infos}
    if len(templates) > 1:
        warnings.append(
            f"the files do not all carry the same chat template; the Modelfile follows {main.path.name}"
        )
    if len(main.parts) > 1:
        warnings.append(split_warning(main))
    ollama_name = ollama_model_name(name or main.basename)
    modelfile_text, template, mf_warnings = modelfile_for(
        main, main.path.name, system, ollama_name=ollama_name
    )
    warnings += mf_warnings
    metadata = card_data(infos, base_model=base_model, license=license)
    card = model_card(
        infos,
        template=template,
        ollama_name=ollama_name,
        modelfile_from=main.path.name,
        ladder=rungs,
        publisher=publisher,
        metadata=metadata,
    )
    read_back = check_card(card)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        (tmp / "Modelfile").write_text(modelfile_text, encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        listed = sorted(p.name for p in tmp.iterdir() if p.is_file())
        sums = "".join(f"{sha256_file(tmp / n)}  {n}\n" for n in listed)
        (tmp / SUMS).write_text(sums, encoding="utf-8")
    for w in warnings:
        log.warning("%s", w)
    result = ReleaseResult(
        folder=out,
        ggufs=[out / n for n in names],
        modelfile=out / "Modelfile",
        card=out / "README.md",
        sums=out / SUMS,
        warnings=warnings,
        card_data=read_back,
    )
    if push is not None:
        result.pushed = push_release(out, push)
    return result


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise InputError(f"--push {repo!r} is not a Hugging Face repository id: {_one_line(e)}") from None
    if "/" not in repo:
        raise InputError(f"--push {repo!r}: give the repository as OWNER/NAME")


def push_release(folder: str | os.PathLike[str], repo: str) -> str:
    """Upload a release folder to the Hub model repository ``repo`` (created if missing) in one
    ``upload_folder`` call; returns the repository's URL. Any failure raises :class:`PushError` (one line:
    the repository, the reason, and that the folder is kept)."""
    import huggingface_hub

    _check_repo_id(repo)
    root = Path(folder)
    try:
        url = huggingface_hub.create_repo(repo, repo_type="model", exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo,
            folder_path=root,
            repo_type="model",
            commit_message=f"Upload {root.name} (gguf-factory release)",
        )
    except Exception as e:  # the library's HTTP, offline-mode, auth and network errors alike
        reason = _one_line(e)
        if huggingface_hub.constants.HF_HUB_OFFLINE and "offline" not in reason.lower():
            reason = f"HF_HUB_OFFLINE is set: {reason}"
        elif "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            reason = f"cannot reach the Hub (no network?): {reason}"
        raise PushError(
            f"cannot push {root} to the Hugging Face repository {repo}: {type(e).__name__}: {reason} "
            f"(the release folder is kept at {root})"
        ) from None
    return str(url)


# ---------------------------------------------------------------------------------------------------
# verify-release
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFinding:
    code: str  # checksum-mismatch | missing-file | unlisted-gguf | bad-sums-line | gguf-invalid | ...
    file: str
    message: str


@dataclass
class ReleaseReport:
    folder: Path
    findings: list[ReleaseFinding]
    checked: list[str]  # files whose checksum matched
    notes: list[str] = field(default_factory=list)  # doctor warnings that do not fail the release

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0


def _listed_name(name: str) -> str | None:
    """The release-relative path of a SHA256SUMS entry, or None when it points outside the folder."""
    name = name.removeprefix("./")
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        return None
    return name


def _walk(root: Path) -> tuple[list[str], set[str]]:
    """(symbolic links, regular files) inside ``root``, as release-relative POSIX paths; links to folders
    are not entered."""
    links: list[str] = []
    regular: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                links.append(rel)
            elif name in filenames and p.is_file():
                regular.add(rel)
    return sorted(links), regular


def _later_part(rel: str, present: set[str]) -> bool:
    """``rel`` is part 2, 3... of a split set whose first part is in the release too."""
    m = PART_NAME.match(Path(rel).name)
    if not m or int(m.group("no")) == 1:
        return False
    first = Path(rel).with_name(f"{m.group('prefix')}-00001-of-{m.group('count')}.gguf").as_posix()
    return first in present


def _through_link(rel: str, links: list[str]) -> bool:
    return any(rel.startswith(link + "/") for link in links)


def verify_release(
    folder: str | os.PathLike[str], *, smoke: bool = False, data: bool = True
) -> ReleaseReport:
    """Check a release folder: every SHA256SUMS line, no unlisted GGUF, each GGUF through the doctor's
    validation (error-level findings fail; ``smoke`` adds llama.cpp's load-and-generate test), the
    Modelfile's FROM names a file present, the README names every GGUF."""
    from ..doctor.validate import Severity, validate

    root = Path(folder)
    if root.is_symlink() or not root.is_dir():
        what = "is a symbolic link, not a folder" if root.is_symlink() else "not found"
        raise InputError(f"release folder {what}: {root}")
    findings: list[ReleaseFinding] = []
    checked: list[str] = []
    notes: list[str] = []
    listed: set[str] = set()
    # links are reported and never followed: a release holds files (a link could point anywhere, and
    # checking it would read, hash or echo what it points to)
    links, regular = _walk(root)
    for rel in links:
        findings.append(
            ReleaseFinding("symlink", rel, f"{rel} is a symbolic link: a release holds files; not followed")
        )

    def plain(rel: str) -> bool:
        """A regular file inside the release, reached without a link."""
        return rel in regular

    sums = root / SUMS
    if not plain(SUMS):
        if SUMS not in links:
            findings.append(ReleaseFinding("missing-file", SUMS, f"{SUMS} is missing"))
    else:
        try:
            lines = sums.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            lines = []
            findings.append(ReleaseFinding("bad-sums-line", SUMS, f"cannot read {SUMS}: {e}"))
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            m = SUM_LINE.match(line)
            rel = _listed_name(m.group(2)) if m else None
            if m is None or rel is None:
                msg = f"{SUMS} line {n} is not '<sha256>  <file>': {line[:200]!r}"
                findings.append(ReleaseFinding("bad-sums-line", SUMS, msg))
                continue
            listed.add(rel)
            path = root / rel
            if not plain(rel):
                if rel not in links and not _through_link(rel, links):
                    findings.append(
                        ReleaseFinding("missing-file", rel, f"{rel} is listed in {SUMS} but missing")
                    )
                continue
            digest = sha256_file(path)
            if digest != m.group(1).lower():
                findings.append(
                    ReleaseFinding(
                        "checksum-mismatch",
                        rel,
                        f"{rel}: SHA-256 {digest} does not match {SUMS} ({m.group(1).lower()})",
                    )
                )
            else:
                checked.append(rel)
    ggufs = sorted(rel for rel in regular if rel.lower().endswith(".gguf"))
    for rel in ggufs:
        if rel not in listed:
            findings.append(ReleaseFinding("unlisted-gguf", rel, f"{rel} is not listed in {SUMS}"))
    for rel in ggufs:
        if _later_part(rel, set(ggufs)):
            continue  # validated with its set, from the first part
        report = validate(root / rel, smoke=smoke, data=data)
        for f in report.findings:
            if f.severity == Severity.ERROR or report.unusable:
                findings.append(ReleaseFinding("gguf-invalid", rel, f"{rel}: {f.code}: {f.message}"))
            elif f.severity == Severity.WARNING:
                notes.append(f"{rel}: {f.code}: {f.message}")
    modelfile = root / "Modelfile"
    if not plain("Modelfile"):
        if "Modelfile" not in links:
            findings.append(ReleaseFinding("missing-file", "Modelfile", "Modelfile is missing"))
    else:
        try:
            commands = parse_modelfile(modelfile.read_text(encoding="utf-8"))
        except (InputError, UnicodeDecodeError) as e:
            commands = []
            findings.append(ReleaseFinding("modelfile-invalid", "Modelfile", f"Modelfile: {e}"))
        froms = [v for k, v in commands if k == "from"]
        if not froms and commands:
            findings.append(ReleaseFinding("modelfile-invalid", "Modelfile", "Modelfile has no FROM line"))
        for v in froms:
            rel_from = _listed_name(v.strip())
            if rel_from is None or not plain(rel_from):
                findings.append(
                    ReleaseFinding(
                        "modelfile-from-missing",
                        "Modelfile",
                        f"Modelfile: FROM {v} does not name a file in the release",
                    )
                )
    card = root / "README.md"
    if not plain("README.md"):
        if "README.md" not in links:
            findings.append(ReleaseFinding("missing-file", "README.md", "README.md (model card) is missing"))
    else:
        text = card.read_text(encoding="utf-8", errors="replace")
        for rel in ggufs:
            if Path(rel).name not in text:
                findings.append(
                    ReleaseFinding("card-missing-file", "README.md", f"README.md does not mention {rel}")
                )
    return ReleaseReport(root, findings, checked, notes)
