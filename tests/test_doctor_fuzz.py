"""Property-based fuzzing of the hostile-file-safe GGUF reader with hypothesis (the long mutation run with
100 000 cases is benchmarks/doctor_fuzz.py): whatever the bytes, only GGUFFormatError escapes, with a
code from the catalogue, and what does parse goes through the structure and metadata checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_factory.doctor import GGUFFormatError
from gguf_factory.doctor.reader import read_gguf_bytes
from gguf_factory.doctor.validate import CATALOG, check_metadata, check_structure

# a mutation: (kind, position as a fraction of the header region, payload)
MUTATION = st.tuples(
    st.sampled_from(["overwrite", "insert", "delete", "truncate", "u64"]),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.binary(min_size=1, max_size=16),
)


@pytest.fixture(scope="module")
def base_bytes(tiny_f16_gguf: Path) -> bytes:
    return tiny_f16_gguf.read_bytes()


def mutate(data: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, where, payload in mutations:
        # most of the interesting structure (counts, lengths, offsets) lives in the first 16 KiB
        pos = int(where * (min(len(buf), 16384) - 1)) if buf else 0
        if kind == "overwrite":
            buf[pos : pos + len(payload)] = payload
        elif kind == "insert":
            buf[pos:pos] = payload
        elif kind == "delete":
            del buf[pos : pos + len(payload)]
        elif kind == "truncate":
            del buf[int(where * len(buf)) :]
        else:  # a huge or odd 64-bit value where a count or length may be
            buf[pos : pos + 8] = (payload * 8)[:8]
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_reader_raises_only_our_error(base_bytes: bytes, mutations: list[tuple[str, float, bytes]]) -> None:
    data = mutate(base_bytes, mutations)
    try:
        g = read_gguf_bytes(data, "fuzzed.gguf")
    except GGUFFormatError as e:
        assert e.code in CATALOG, e.code
        return
    check_structure(g)
    check_metadata(g)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096))
def test_reader_on_arbitrary_bytes(data: bytes) -> None:
    try:
        read_gguf_bytes(b"GGUF" + data, "random.gguf")
    except GGUFFormatError as e:
        assert e.code in CATALOG, e.code
