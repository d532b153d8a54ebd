"""The only place that writes outputs: temp-then-rename, so nothing is left half-written at a final path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
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


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate an output path before any work: its folder must exist and it must not be a folder itself."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output folder does not exist: {parent} (for {p})")
    if not parent.is_dir():
        raise InputError(f"output folder is not a folder: {parent} (for {p})")
    if p.is_dir():
        raise InputError(f"output path is a folder, expected a file: {p}")
    return p


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Validate an output folder before any work: it may not exist yet, but its parent must."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and not p.is_dir():
        raise InputError(f"output path exists and is not a folder: {p}")
    if not parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {parent} (for {p})")
    return p


def prepare_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create an output folder whose parent must already exist (a typo'd parent is an error, no mkdir -p)."""
    p = check_output_dir(path)
    p.mkdir(exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``, on error delete it.

    Works for a file or a folder written at the yielded path.
    """
    final = check_output_path(final) if not Path(final).is_dir() else Path(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (file or folder)
    try:
        yield tmp
        if not tmp.exists():
            raise InputError(f"nothing was written for {final}")
        if final.is_dir() and not tmp.is_dir():
            raise InputError(f"output path is a folder, expected a file: {final}")
        if final.is_dir():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


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
