"""LM Studio's folder layout, release folders (GGUFs, SHA256SUMS, README.md, Modelfile) and their check."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..files import atomic_path, check_output_dir, prepare_output_dir, sha256_file
from .card import model_card, read_ladder
from .info import read_model_info
from .modelfile import modelfile_for, ollama_model_name, parse_modelfile, place_file

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
    dest = place_file(info.path, folder / info.path.name, copy=copy)
    return LMStudioExport(dest, folder)


# ---------------------------------------------------------------------------------------------------
# release
# ---------------------------------------------------------------------------------------------------


@dataclass
class ReleaseResult:
    folder: Path
    ggufs: list[Path]
    modelfile: Path
    card: Path
    sums: Path
    warnings: list[str] = field(default_factory=list)


def export_release(
    ggufs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    ladder: str | os.PathLike[str] | None = None,
    system: str | None = None,
    name: str | None = None,
    publisher: str = "gguf-factory",
) -> ReleaseResult:
    """A release folder: the GGUFs (copied), ``Modelfile`` (for the first GGUF), ``README.md`` and
    ``SHA256SUMS``. Built in a temporary folder beside ``out_dir`` and renamed into place; an existing
    non-empty ``out_dir`` is refused."""
    if not ggufs:
        raise InputError("export release needs at least one GGUF file")
    infos = [read_model_info(p) for p in ggufs]
    names = [i.path.name for i in infos]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two input GGUFs have the same file name: {', '.join(dup)}")
    if any(n in (SUMS, "README.md", "Modelfile") for n in names):
        raise InputError("a GGUF may not be named SHA256SUMS, README.md or Modelfile")
    out = check_output_dir(out_dir, inputs=[*(i.path for i in infos), ladder])
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    need = sum(i.size_bytes for i in infos)
    free = shutil.disk_usage(out.parent if str(out.parent) else Path(".")).free
    if need > free:
        raise InputError(f"not enough disk space for {out}: {need} bytes needed, {free} free")
    rungs = read_ladder(ladder) if ladder is not None else None
    warnings: list[str] = []
    if rungs is not None and not any(n in rungs for n in names):
        warnings.append(f"{ladder}: the ladder JSON lists none of the release's files; no quality figures")
    main = infos[0]
    templates = {i.chat_template for i in infos}
    if len(templates) > 1:
        warnings.append(
            f"the files do not all carry the same chat template; the Modelfile follows {main.path.name}"
        )
    ollama_name = ollama_model_name(name or main.basename)
    modelfile_text, template, mf_warnings = modelfile_for(
        main, main.path.name, system, ollama_name=ollama_name
    )
    warnings += mf_warnings
    card = model_card(
        infos,
        template=template,
        ollama_name=ollama_name,
        modelfile_from=main.path.name,
        ladder=rungs,
        publisher=publisher,
    )
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for info in infos:
            shutil.copyfile(info.path, tmp / info.path.name)
        (tmp / "Modelfile").write_text(modelfile_text, encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        listed = sorted(p.name for p in tmp.iterdir() if p.is_file())
        sums = "".join(f"{sha256_file(tmp / n)}  {n}\n" for n in listed)
        (tmp / SUMS).write_text(sums, encoding="utf-8")
    for w in warnings:
        log.warning("%s", w)
    return ReleaseResult(
        folder=out,
        ggufs=[out / n for n in names],
        modelfile=out / "Modelfile",
        card=out / "README.md",
        sums=out / SUMS,
        warnings=warnings,
    )


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
