"""Writing GGUF files with gguf-py: streamed tensors, split sets, every part written atomically.

:class:`StreamingWriter` is gguf-py's ``GGUFWriter`` (whose ``split_max_tensors`` / ``split_max_size``
decide the parts and write the ``split.*`` keys exactly as llama.cpp's ``gguf-split`` does) with two
additions for large models: long arrays are packed in one go, and a tensor's data is written in chunks.
:func:`write_gguf` writes a prepared writer to temporary files beside the final paths and renames them
(:func:`gguf_factory.files.atomic_paths`); :func:`resplit_gguf` rewrites any GGUF (or split set) as a
split set of other limits, copying key/values and tensor bytes unchanged.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from .errors import ConversionError, InputError
from .files import Paths, atomic_paths, parse_size
from .splitset import SPLIT_KEYS, output_paths

log = logging.getLogger(__name__)

# numpy dtypes of GGUF array element types (for packing long arrays such as the token list in one go)
_ARRAY_DTYPES: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "u1",
    gguf.GGUFValueType.INT8: "i1",
    gguf.GGUFValueType.UINT16: "u2",
    gguf.GGUFValueType.INT16: "i2",
    gguf.GGUFValueType.UINT32: "u4",
    gguf.GGUFValueType.INT32: "i4",
    gguf.GGUFValueType.UINT64: "u8",
    gguf.GGUFValueType.INT64: "i8",
    gguf.GGUFValueType.FLOAT32: "f4",
    gguf.GGUFValueType.FLOAT64: "f8",
}


def split_limits(split_max_size: int | str | None, split_max_tensors: int | None) -> tuple[int, int]:
    """(bytes, tensors) per part for gguf-py's writer, 0 meaning no limit. ``split_max_size`` as in
    llama.cpp's ``--split-max-size``: ``2G``, ``500M`` (powers of 1000), ``1.5GiB`` or a byte count."""
    size = 0 if split_max_size is None else parse_size(split_max_size, "--split-max-size")
    tensors = 0 if split_max_tensors is None else int(split_max_tensors)
    if split_max_tensors is not None and tensors <= 0:
        raise InputError(f"--split-max-tensors must be a positive number of tensors, got {split_max_tensors}")
    return size, tensors


class StreamingWriter(gguf.GGUFWriter):
    """gguf-py's writer with two additions for large models: arrays of numbers or strings are packed in
    one go (a 256 k-token vocabulary takes milliseconds instead of seconds; the bytes are the same), and a
    tensor's data can be written in chunks (``write_tensor_chunks``) so it never sits in memory whole.

    The parts of a split set are gguf-py's own (``split_max_tensors`` / ``split_max_size``); only the
    files they are written to are chosen here (``shard_paths``: temporary files, see :func:`write_gguf`).
    """

    shard_paths: list[Path] | None = None

    def format_shard_names(self, path: Path) -> list[Path]:
        if self.shard_paths is not None:
            if len(self.shard_paths) != len(self.tensors):
                raise ValueError(f"{len(self.tensors)} parts planned, {len(self.shard_paths)} files given")
            return list(self.shard_paths)
        return super().format_shard_names(path)

    def _pack_val(
        self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: gguf.GGUFValueType | None = None
    ) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or isinstance(val, bytes) or len(val) < 64:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        if sub_type is None and any(type(v) is not type(val[0]) for v in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)  # mixed: gguf-py's own error
        ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        if ltype == gguf.GGUFValueType.STRING:
            if not all(isinstance(v, str | bytes) for v in val):
                raise ValueError("All items in a GGUF array should be of the same type")
            enc = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            size = struct.Struct(order + "Q").pack
            body = b"".join(size(len(e)) + e for e in enc)
        elif ltype in _ARRAY_DTYPES:
            body = np.asarray(val, dtype=order + _ARRAY_DTYPES[ltype]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = self._pack("I", vtype) if add_vtype else b""
        return head + self._pack("I", ltype) + self._pack("Q", len(val)) + body

    def write_tensor_chunks(self, chunks: Iterator[np.ndarray], nbytes: int) -> None:
        """Write the next tensor's data from ``chunks`` (C-ordered pieces that total ``nbytes``), into the
        part that holds it (tensors are written in the order their infos were added)."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
            raise ValueError(f"Expected output file to contain tensor info or weights, got {self.state}")
        assert self.fout is not None
        part = next((i for i, t in enumerate(self.tensors) if t), None)
        if part is None:
            raise ConversionError("more tensor data written than tensors declared")
        fout = self.fout[part]
        self.tensors[part].pop(next(iter(self.tensors[part])))
        self.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks:
            if self.endianess != gguf.GGUFEndian.LITTLE:
                chunk = chunk.byteswap(inplace=False)
            fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            written += chunk.nbytes
        if written != nbytes:
            raise ConversionError(f"wrote {written} bytes of tensor data, expected {nbytes}")
        self.write_padding(fout, nbytes)
        self.state = WriterState.WEIGHTS


def write_gguf(
    writer: StreamingWriter,
    out: str | os.PathLike[str],
    write_data: Callable[[StreamingWriter], None],
    *,
    inputs: Paths = (),
) -> list[Path]:
    """Write a writer whose key/values and tensor infos are all added: the header of every part, then
    ``write_data(writer)`` (which writes each tensor's data in order), to temporary files renamed into
    place together. One part: ``out`` itself; several: ``<out less .gguf>-0000i-of-0000N.gguf``. Each
    final path follows the output rule (``inputs`` included). Returns the paths written, first part first.
    """
    if writer.state is not WriterState.NO_FILE:
        raise ValueError(f"expected a writer with nothing written yet, got {writer.state}")
    finals = output_paths(out, len(writer.tensors))
    if len(finals) > 1:
        log.info("writing %d parts: %s ... %s", len(finals), finals[0].name, finals[-1].name)
    elif writer.split_max_size or writer.split_max_tensors:
        log.info("the model fits in one part within the split limits: writing one file %s", finals[0])
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(max(level, logging.WARNING))  # its INFO lines name the temporary files
    try:
        with atomic_paths(finals, inputs=inputs) as tmps:
            writer.shard_paths = tmps
            try:
                writer.write_header_to_file(tmps[0])
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                write_data(writer)
                left = sum(map(len, writer.tensors))
                if left:
                    raise ConversionError(f"{left} tensor(s) declared but not written")
            finally:
                writer.close()
    finally:
        gguf_log.setLevel(level)
    return finals


def resplit_gguf(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split_max_size: int | str | None = None,
    split_max_tensors: int | None = None,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
) -> list[Path]:
    """Rewrite the GGUF ``src`` (a file, or a split set given its first part) at ``out`` split by other
    limits: every key/value (but the ``split.*`` ones, rewritten) and every tensor's bytes as they are,
    read through the doctor's hostile-file-safe reader. Returns the paths written."""
    from .doctor.reader import GGUFFormatError, read_gguf, tensor_data

    size, count = split_limits(split_max_size, split_max_tensors)
    try:
        g = read_gguf(src)
    except GGUFFormatError as e:
        raise InputError(f"cannot split {src}: {e}") from None
    if g.byte_order != "<":
        raise InputError(f"cannot split {src}: a big-endian GGUF")
    if g.issues:
        raise InputError(f"cannot split {src}: {g.issues[0].message}")
    arch = g.architecture
    if arch is None:
        raise InputError(f"cannot split {src}: general.architecture is missing")
    writer = StreamingWriter(None, arch, split_max_tensors=count, split_max_size=size)
    if g.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        writer.data_alignment = g.alignment
    skip = {*SPLIT_KEYS, gguf.Keys.General.ARCHITECTURE}
    for kv in g.kvs:
        if kv.key in skip:
            continue
        value = kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value
        writer.add_key_value(kv.key, value, kv.type, sub_type=kv.subtype)
    blocks: list[tuple[Any, int]] = []
    for t in g.tensors:
        qt, nbytes = t.type, t.n_bytes
        data = tensor_data(g, t)
        if qt is None or nbytes is None or data is None:
            raise InputError(f"cannot split {src}: tensor {t.name!r} cannot be read")
        block, type_size = gguf.GGML_QUANT_SIZES[qt]
        byte_shape = (*reversed(t.dims[1:]), t.dims[0] // block * type_size) if t.dims else (nbytes,)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)
        blocks.append((data, nbytes))

    def data(w: StreamingWriter) -> None:
        for arr, nbytes in blocks:
            w.write_tensor_chunks(iter([arr]), nbytes)

    return write_gguf(writer, out, data, inputs=[*g.paths, *inputs])
