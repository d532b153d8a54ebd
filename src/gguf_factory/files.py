"""The only place that writes outputs: temp-then-rename, so nothing is left half-written at a final path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError


def require_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a Path if it is an existing regular file, else raise :class:`InputError`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if not p.is_file():
        raise InputError(f"{what} is not a file: {p}")
    return p


def require_dir(path: str | os.PathLike[str], what: str = "folder") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if not p.is_dir():
        raise InputError(f"{what} is not a folder: {p}")
    return p


Paths = Sequence[str | os.PathLike[str] | None]


def _same(a: Path, b: Path) -> bool:
    """Same file or folder (same device and inode: through symlinks, hard links, ``..``)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(child: Path, folder: Path) -> bool:
    """``child`` lies somewhere inside ``folder`` (both resolved: symlinks followed)."""
    try:
        c, f = child.resolve(), folder.resolve()
    except (OSError, RuntimeError):
        return False
    return c != f and c.is_relative_to(f)


def _refuse_symlink(p: Path, what: str) -> None:
    if p.is_symlink():
        raise InputError(
            f"{what} {p} is a symbolic link: refusing to write through it (remove the link or choose "
            "another path)"
        )


def _check_against_inputs(p: Path, inputs: Paths, what: str) -> None:
    """The output rule's input half: ``p`` may not be an input (same file or folder, however reached),
    may not replace an existing file or folder inside an input folder (the writer may be reading it),
    and, for a folder that is written whole, may not hold an input."""
    for raw in inputs:
        if raw is None:
            continue
        inp = Path(raw)
        if not inp.exists():
            continue
        if p.exists() and _same(p, inp):
            raise InputError(f"{what} {p} is the input {inp}: it would overwrite its own input")
        if inp.is_dir() and p.exists() and _inside(p, inp):
            raise InputError(
                f"{what} {p} would overwrite a file inside the input folder {inp}: choose a path outside it"
            )
        if p.exists() and p.is_dir() and _inside(inp, p):
            raise InputError(f"{what} {p} holds the input {inp}: writing it would destroy that input")


def check_output_path(path: str | os.PathLike[str], inputs: Paths = (), what: str = "output") -> Path:
    """Validate an output file path before any work (the one output rule, used by every writer).

    Its folder must exist; it may not be a folder or a symbolic link (written through, a link would
    change whatever it points to); it may not be any of ``inputs`` (same file through symlinks, hard
    links or another spelling) nor replace a file inside an input folder. Outputs are then written with
    :func:`atomic_path` (temporary file, renamed over the final path)."""
    p = Path(path)
    _refuse_symlink(p, what)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output folder does not exist: {parent} (for {p})")
    if not parent.is_dir():
        raise InputError(f"output folder is not a folder: {parent} (for {p})")
    if p.is_dir():
        raise InputError(f"output path is a folder, expected a file: {p}")
    _check_against_inputs(p, inputs, what)
    return p


def check_output_dir(path: str | os.PathLike[str], inputs: Paths = (), what: str = "output folder") -> Path:
    """Validate an output folder before any work: it may not exist yet, but its parent must; it may not be
    a symbolic link, an input, a folder holding an input (a folder is written whole, replaced by
    :func:`atomic_path`), nor an existing folder inside an input folder."""
    p = Path(path)
    _refuse_symlink(p, what)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and not p.is_dir():
        raise InputError(f"output path exists and is not a folder: {p}")
    if not parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {parent} (for {p})")
    _check_against_inputs(p, inputs, what)
    return p


def prepare_output_dir(path: str | os.PathLike[str], inputs: Paths = ()) -> Path:
    """Create an output folder whose parent must already exist (a typo'd parent is an error, no mkdir -p).

    Files are then written into it one by one: check each with :func:`check_output_path` and ``inputs``."""
    p = Path(path)
    _refuse_symlink(p, "output folder")
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and not p.is_dir():
        raise InputError(f"output path exists and is not a folder: {p}")
    if not parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {parent} (for {p})")
    for raw in inputs:
        if raw is not None and p.exists() and _same(p, Path(raw)) and not Path(raw).is_dir():
            raise InputError(f"output folder {p} is the input {raw}")
    p.mkdir(exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``, on error delete it.

    Works for a file or a folder written at the yielded path. ``final`` may not be a symbolic link.
    """
    final = Path(final)
    _refuse_symlink(final, "output")
    final = check_output_path(final) if not final.is_dir() else final
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (file or folder)
    try:
        yield tmp
        if not tmp.exists():
            raise InputError(f"nothing was written for {final}")
        _refuse_symlink(final, "output")  # made a link while we wrote
        if final.is_dir() and not tmp.is_dir():
            raise InputError(f"output path is a folder, expected a file: {final}")
        if final.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent or "."))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_paths(finals: Sequence[str | os.PathLike[str]], inputs: Paths = ()) -> Iterator[list[Path]]:
    """:func:`atomic_path` for an output made of several files (the parts of a split GGUF).

    Every final path is checked first (:func:`check_output_path` with ``inputs``); one temporary file
    beside each is yielded; only when the block ends without error, and every temporary file exists,
    are they renamed, the first part last (a reader finds a split set from its first part, so the set
    appears complete or not at all). On any error every temporary file is deleted, and parts already
    renamed by a failing rename are deleted again."""
    paths = [check_output_path(f, inputs=inputs) for f in finals]
    if len({str(p.resolve()) for p in paths}) != len(paths):
        raise InputError(f"the same output path is named twice: {', '.join(map(str, paths))}")
    tmps: list[Path] = []
    done: list[Path] = []
    try:
        for final in paths:
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent or ".")
            os.close(fd)
            tmps.append(Path(name))
            tmps[-1].unlink()  # the writer creates it
        yield list(tmps)
        for final, tmp in zip(paths, tmps, strict=True):
            if not tmp.is_file():
                raise InputError(f"nothing was written for {final}")
        for final, tmp in reversed(list(zip(paths, tmps, strict=True))):
            _refuse_symlink(final, "output")  # made a link while we wrote
            if final.is_dir():
                raise InputError(f"output path is a folder, expected a file: {final}")
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if done and len(done) < len(paths):
            for final in done:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def manifest_path(root: str | os.PathLike[str], value: str, where: str, *, absolute: bool) -> Path:
    """A path written in a manifest (factory.yaml, router.yaml), resolved against the manifest's folder.

    A relative path may not climb out of that folder with ``..`` (a manifest from elsewhere may not reach
    for ``../../.ssh/id_rsa``). An absolute path is taken as written where the manifest's documentation
    allows one (``absolute=True``), refused elsewhere. Symbolic links inside the folder are followed: a
    link, like an absolute path, is a deliberate choice on this machine (release folders, which are
    shipped, are the exception: ``verify-release`` flags every link)."""
    base = Path(root)
    p = Path(value)
    if p.is_absolute() or p.anchor:
        if not absolute:
            raise InputError(f"{where}: {value!r} is an absolute path; write it relative to {base}")
        return p
    norm = os.path.normpath(value)
    if norm == ".." or norm.startswith(".." + os.sep) or (os.altsep and norm.startswith(".." + os.altsep)):
        hint = " (an absolute path is allowed here)" if absolute else ""
        raise InputError(f"{where}: {value!r} climbs out of the manifest's folder {base} with '..'{hint}")
    return base / p


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3, "M": 10**6, "G": 10**9,
    "TB": 10**12, "T": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes from ``50MB``, ``2.5 GiB``, ``800k`` or a plain number (KB/MB/GB are powers of 1000, as in
    file managers and ``human_size``; KiB/MiB/GiB powers of 1024)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise InputError(f"{what}: cannot read {text!r} as a size (examples: 50MB, 2.5GiB, 800KB)")
        value, unit = float(m.group(1)), m.group(2).upper()
    n = int(value * _SIZE_UNITS[unit])
    if n <= 0:
        raise InputError(f"{what} must be positive, got {text!r}")
    return n
