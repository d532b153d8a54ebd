"""Split GGUF sets, as llama.cpp names and checks them.

llama.cpp's ``gguf-split`` (and gguf-py's ``GGUFWriter`` with ``split_max_tensors`` / ``split_max_size``)
writes one model as ``<prefix>-00001-of-0000N.gguf`` ... ``<prefix>-0000N-of-0000N.gguf``. Every part
carries ``split.no`` (UINT16, 0-based), ``split.count`` (UINT16) and ``split.tensors.count`` (INT32, the
tensors of the whole set); the first part alone carries the model's other key/values. llama.cpp loads a
set given its first part: it finds the others by name (``llama_split_prefix`` / ``llama_split_path``)
and refuses a set whose tensor count disagrees with ``split.tensors.count``.

This module holds the naming rule and the consistency checks, for every reader of this project (the
doctor's hostile-file-safe reader and the quick header scan of :mod:`gguf_factory.quantize`); it knows
nothing of the GGUF encoding itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
MAX_PARTS = 99999  # five digits in the name

PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
"""``<prefix>-00001-of-00003.gguf``: llama.cpp's ``%s-%05d-of-%05d.gguf``."""


class SplitSetError(InputError):
    """A split set that llama.cpp could not load: a part missing, misnamed or disagreeing with the
    first. ``code`` names the defect (the doctor's finding codes); the message names the file."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def part_path(prefix: str | os.PathLike[str], no: int, count: int) -> Path:
    """Part ``no`` (1-based) of ``count``: ``<prefix>-0000<no>-of-0000<count>.gguf``."""
    return Path(f"{os.fspath(prefix)}-{no:05d}-of-{count:05d}.gguf")


def output_prefix(out: str | os.PathLike[str]) -> Path:
    """The prefix a split output is named from: ``model.gguf`` -> ``model``; a name already in the split
    form (``model-00001-of-00003.gguf``) -> ``model``; other names are kept whole (``model.bin``)."""
    p = Path(out)
    m = PART_NAME.match(p.name)
    if m:
        return p.with_name(m.group("prefix"))
    return p.with_suffix("") if p.suffix.lower() == ".gguf" else p


def output_paths(out: str | os.PathLike[str], count: int) -> list[Path]:
    """The files a model written to ``out`` in ``count`` parts occupies (``[out]`` for one part; a name
    in the split form then loses its suffix: a single file is no set)."""
    if count <= 1:
        p = Path(out)
        return [p.with_name(output_prefix(p).name + ".gguf")] if PART_NAME.match(p.name) else [p]
    if count > MAX_PARTS:
        raise InputError(f"{count} parts for {out}: llama.cpp's names allow at most {MAX_PARTS}")
    prefix = output_prefix(out)
    return [part_path(prefix, i, count) for i in range(1, count + 1)]


def named_parts(path: str | os.PathLike[str]) -> list[Path]:
    """The parts of the set whose first part is ``path``, by name alone (those present on disk); ``[path]``
    for any other file. For sizes and copies; :func:`set_paths` is the checked form."""
    p = Path(path)
    m = PART_NAME.match(p.name)
    if not m or int(m.group("no")) != 1 or int(m.group("count")) <= 1:
        return [p]
    count = int(m.group("count"))
    prefix = p.with_name(m.group("prefix"))
    return [p, *(q for i in range(2, count + 1) if (q := part_path(prefix, i, count)).is_file())]


def set_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a GGUF, every part of a split set included."""
    return sum(q.stat().st_size for q in named_parts(path))


def _int(meta: Mapping[str, Any], key: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        return -1  # present but not a number: refused by the caller
    return int(v)


def split_count(meta: Mapping[str, Any], path: str | os.PathLike[str]) -> int:
    """``split.count`` of a file's key/values (1 when absent): > 1 means ``path`` belongs to a set."""
    n = _int(meta, SPLIT_COUNT)
    if n is None:
        return 1
    if n < 1 or n > MAX_PARTS:
        raise SplitSetError("split-bad-key", f"{path}: {SPLIT_COUNT} is {meta.get(SPLIT_COUNT)!r}")
    return n


def set_paths(first: str | os.PathLike[str], meta: Mapping[str, Any]) -> list[Path]:
    """Every part of the set whose first part is ``first`` (with key/values ``meta``), checked as
    llama.cpp finds them: ``first`` must be part 1 and named ``<prefix>-00001-of-0000N.gguf``, and
    every other part must exist. ``[first]`` for a file that is not split."""
    p = Path(first)
    count = split_count(meta, p)
    if count == 1:
        return [p]
    no = _int(meta, SPLIT_NO)
    if no is None or no < 0 or no >= count:
        raise SplitSetError("split-bad-key", f"{p}: {SPLIT_NO} is {meta.get(SPLIT_NO)!r} in a set of {count}")
    m = PART_NAME.match(p.name)
    if no != 0:
        hint = f": give its first part {part_path(p.with_name(m.group('prefix')), 1, count)}" if m else ""
        raise SplitSetError(
            "split-not-first",
            f"{p} is part {no + 1} of {count} of a split GGUF{hint} (llama.cpp loads a set from its "
            "first part)",
        )
    if not m or int(m.group("no")) != 1 or int(m.group("count")) != count:
        raise SplitSetError(
            "split-bad-name",
            f"{p}: first part of a {count}-part split GGUF, but its name does not end in "
            f"-00001-of-{count:05d}.gguf, so its other parts cannot be found (llama.cpp names them so)",
        )
    prefix = p.with_name(m.group("prefix"))
    paths = [p]
    for i in range(2, count + 1):
        q = part_path(prefix, i, count)
        if not q.is_file():
            what = "is not a regular file" if q.exists() else "not found"
            raise SplitSetError(
                "split-part-missing", f"{p}: part {i} of {count} of the split GGUF is missing: {q} {what}"
            )
        paths.append(q)
    return paths


def check_part(path: Path, index: int, count: int, first: Path, meta: Mapping[str, Any]) -> None:
    """Part ``index`` (0-based) of ``count`` must say so in its own ``split.*`` keys."""
    n = _int(meta, SPLIT_COUNT)
    if n != count:
        got = "no split.count" if n is None else f"split.count {meta.get(SPLIT_COUNT)!r}"
        raise SplitSetError(
            "split-count-mismatch", f"{path}: {got}, but its first part {first.name} has split.count {count}"
        )
    no = _int(meta, SPLIT_NO)
    if no != index:
        raise SplitSetError(
            "split-part-mismatch",
            f"{path}: {SPLIT_NO} is {meta.get(SPLIT_NO)!r}, but its name makes it part {index + 1} of "
            f"{count} ({SPLIT_NO} {index})",
        )


def check_tensor_count(first: Path, metas: list[Mapping[str, Any]], counts: list[int]) -> None:
    """``split.tensors.count`` (of the first part, and of every part that has it) must be the tensors of
    all parts together: llama.cpp refuses the set otherwise."""
    total = sum(counts)
    for i, meta in enumerate(metas):
        want = _int(meta, SPLIT_TENSORS_COUNT)
        if want is None and i > 0:
            continue
        if want != total:
            where = first if i == 0 else part_path(output_prefix(first), i + 1, len(metas))
            said = (
                f"{SPLIT_TENSORS_COUNT} {meta.get(SPLIT_TENSORS_COUNT)!r}"
                if want is not None
                else f"no {SPLIT_TENSORS_COUNT}"
            )
            per = " + ".join(str(c) for c in counts)
            raise SplitSetError(
                "split-tensor-count-mismatch",
                f"{where}: {said}, but the {len(metas)} parts hold {total} tensors ({per})",
            )


def scan_gguf_set(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[tuple[str, int, list[int]]], list[Path]]:
    """:func:`gguf_factory.gguf_header.scan_gguf_header` over a whole split set given its first part: the
    first part's scalar metadata, the tensors of every part (in order), and the part paths, the set
    checked as llama.cpp checks it (:class:`SplitSetError` names the part at fault). A file that is not
    split: its own header and ``[path]``."""
    from .gguf_header import scan_gguf_header

    meta, tensors = scan_gguf_header(path)
    paths = set_paths(path, meta)
    if len(paths) == 1:
        return meta, tensors, paths
    metas, counts = [meta], [len(tensors)]
    tensors = list(tensors)
    for i, q in enumerate(paths[1:], 1):
        part_meta, part_tensors = scan_gguf_header(q)
        check_part(q, i, len(paths), paths[0], part_meta)
        metas.append(part_meta)
        counts.append(len(part_tensors))
        tensors += part_tensors
    check_tensor_count(paths[0], metas, counts)
    return meta, tensors, paths
