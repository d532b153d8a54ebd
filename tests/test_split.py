"""Split GGUF sets (llama.cpp's gguf-split layout): written by convert, quantize and repair, read whole from
their first part by every verb that reads a GGUF. Real tiny models, real files, llama.cpp runs them."""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.convert import convert
from gguf_factory.doctor import inspect_gguf, validate
from gguf_factory.doctor.reader import GGUFFormatError, read_gguf
from gguf_factory.doctor.repair import repair
from gguf_factory.errors import InputError
from gguf_factory.quantize import default_output_path, quantize
from gguf_factory.splitset import PART_NAME, SplitSetError, output_paths, set_size

N_PARTS = 3
PROMPT = "Hello, how are you?"
GREEDY_TOKENS = 24


# ----------------------------------------------------------------------------------------------- helpers


def split_fields(path: Path) -> dict[str, tuple[int, gguf.GGUFValueType]]:
    """The split.* keys of one file as gguf-py reads them: key -> (value, value type)."""
    r = gguf.GGUFReader(path)
    out = {}
    for key in ("split.no", "split.count", "split.tensors.count"):
        f = r.fields.get(key)
        if f is not None:
            out[key] = (int(f.contents()), f.types[0])
    return out


def tensor_bytes(paths: list[Path]) -> dict[str, bytes]:
    """Every tensor's raw bytes over the given files (gguf-py's reader, each file alone)."""
    out: dict[str, bytes] = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            assert t.name not in out
            out[t.name] = np.asarray(t.data).tobytes()
    return out


def greedy(path: Path) -> list[int]:
    """GREEDY_TOKENS greedy tokens after PROMPT by llama.cpp itself (llama_cpp.Llama on ``path``)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, n_batch=64, seed=1, verbose=False)
    try:
        ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True)
        out: list[int] = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            out.append(int(tok))  # on through an end of turn: more tokens to compare
            if len(out) >= GREEDY_TOKENS:
                break
        return out
    finally:
        llm.close()


def patch_value(path: Path, key: str, fmt: str, value: int) -> None:
    """Overwrite the scalar value of ``key`` in the header of ``path`` (little-endian, same width)."""
    data = bytearray(path.read_bytes())
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw) + 4  # past the key and value type
    struct.pack_into("<" + fmt, data, at, value)
    path.write_bytes(bytes(data))


def no_leftovers(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]
    assert not left, left


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def n_tensors(tiny_f16_gguf: Path) -> int:
    return len(read_gguf(tiny_f16_gguf).tensors)


@pytest.fixture(scope="module")
def per_part(n_tensors: int) -> int:
    return math.ceil(n_tensors / N_PARTS)


@pytest.fixture(scope="module")
def split_f16(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory, per_part: int) -> list[Path]:
    """The tiny model converted to F16 in llama.cpp's split layout (3 parts)."""
    out = tmp_path_factory.mktemp("split") / "tiny-F16.gguf"
    r = convert(tiny_hf_model, out, outtype="f16", split_max_tensors=per_part)
    assert r.path == r.parts[0]
    return r.parts


@pytest.fixture(scope="module")
def unsplit_greedy(tiny_f16_gguf: Path) -> list[int]:
    return greedy(tiny_f16_gguf)


def copy_set(parts: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(p, folder / p.name)) for p in parts]


# ----------------------------------------------------------------------------------------------- convert


def test_convert_writes_llama_cpp_split_layout(
    split_f16: list[Path], tiny_f16_gguf: Path, n_tensors: int, per_part: int
) -> None:
    folder = split_f16[0].parent
    assert [p.name for p in split_f16] == [f"tiny-F16-{i:05d}-of-{N_PARTS:05d}.gguf" for i in (1, 2, 3)]
    assert not (folder / "tiny-F16.gguf").exists()
    no_leftovers(folder)
    counts = []
    for i, p in enumerate(split_f16):
        fields = split_fields(p)  # as llama.cpp's gguf-split writes them: u16, u16, i32
        assert fields == {
            "split.no": (i, gguf.GGUFValueType.UINT16),
            "split.count": (N_PARTS, gguf.GGUFValueType.UINT16),
            "split.tensors.count": (n_tensors, gguf.GGUFValueType.INT32),
        }
        r = gguf.GGUFReader(p)
        counts.append(len(r.tensors))
        if i:  # the other parts hold only their tensors and the split keys
            assert set(r.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(fields)
    assert sum(counts) == n_tensors and max(counts) <= per_part
    # the same tensors, byte for byte, as the unsplit conversion; the same metadata in the first part
    assert tensor_bytes(split_f16) == tensor_bytes([tiny_f16_gguf])
    whole = read_gguf(tiny_f16_gguf)
    first = read_gguf(split_f16[0], split=False)
    assert {k: v for k, v in first.metadata_values.items() if not k.startswith("split.")}.keys() == (
        whole.metadata_values.keys()
    )


def test_split_set_loads_in_llama_cpp_with_identical_greedy_output(
    split_f16: list[Path], unsplit_greedy: list[int]
) -> None:
    assert len(unsplit_greedy) > 4
    assert greedy(split_f16[0]) == unsplit_greedy


def test_split_max_size_and_cli(tiny_hf_model: Path, tmp_path: Path, tiny_f16_gguf: Path) -> None:
    biggest = max(t.n_bytes or 0 for t in read_gguf(tiny_f16_gguf).tensors)
    total = sum(t.n_bytes or 0 for t in read_gguf(tiny_f16_gguf).tensors)
    limit = max(biggest, total // 3)
    proc = run_cli(
        "convert",
        tiny_hf_model,
        "-o",
        tmp_path / "m.gguf",
        "--outtype",
        "f16",
        "--split-max-size",
        str(limit),
    )
    assert proc.returncode == 0, proc.stderr
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) >= 3 and "m-00001-of-" in proc.stdout
    for p in parts:
        data = sum(len(t.data.tobytes()) for t in gguf.GGUFReader(p).tensors)
        assert data <= limit or len(gguf.GGUFReader(p).tensors) == 1
    assert set_size(parts[0]) == sum(p.stat().st_size for p in parts)
    no_leftovers(tmp_path)


def test_one_part_is_one_file(tiny_hf_model: Path, tmp_path: Path, n_tensors: int) -> None:
    r = convert(tiny_hf_model, tmp_path / "one.gguf", outtype="f16", split_max_tensors=n_tensors)
    assert r.parts == [tmp_path / "one.gguf"] and "split.count" not in split_fields(r.path)


def test_bad_split_options(tiny_hf_model: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="split-max-tensors"):
        convert(tiny_hf_model, tmp_path / "x.gguf", split_max_tensors=0)
    proc = run_cli("convert", tiny_hf_model, "-o", tmp_path / "x.gguf", "--split-max-size", "lots")
    assert_one_line_error(proc, "--split-max-size", "lots")
    assert not list(tmp_path.iterdir())


def test_output_names() -> None:
    assert output_paths("d/m.gguf", 1) == [Path("d/m.gguf")]
    assert output_paths("d/m.gguf", 2) == [Path("d/m-00001-of-00002.gguf"), Path("d/m-00002-of-00002.gguf")]
    assert output_paths("d/m-00001-of-00007.gguf", 2)[1] == Path("d/m-00002-of-00002.gguf")
    assert output_paths("d/m-00001-of-00007.gguf", 1) == [Path("d/m.gguf")]
    assert default_output_path("d/tiny-F16-00001-of-00003.gguf", "Q8_0") == Path("d/tiny-Q8_0.gguf")
    assert PART_NAME.match("a-00002-of-00003.gguf") and not PART_NAME.match("a-2-of-3.gguf")


# ----------------------------------------------------------------------------------------------- readers


def test_inspect_and_validate_read_the_whole_set(
    split_f16: list[Path], tiny_f16_gguf: Path, n_tensors: int
) -> None:
    r = inspect_gguf(split_f16[0])
    assert r.n_tensors == n_tensors and r.parts == split_f16
    assert r.file_size == sum(p.stat().st_size for p in split_f16)
    assert r.n_params == inspect_gguf(tiny_f16_gguf).n_params
    whole = validate(tiny_f16_gguf, smoke=False)
    v = validate(split_f16[0], smoke=True)
    assert not v.unusable and v.smoke is not None and v.smoke.ok, v.findings
    assert sorted(v.codes) == sorted(whole.codes) and v.exit_code == whole.exit_code
    assert v.checked_tensors == n_tensors
    proc = run_cli("inspect", split_f16[0], "--json")
    assert proc.returncode == 0, proc.stderr
    assert f'"n_tensors": {n_tensors}' in proc.stdout and split_f16[2].name in proc.stdout
    proc = run_cli("validate", split_f16[0], "--no-smoke")
    assert proc.returncode == whole.exit_code, proc.stdout + proc.stderr


def test_missing_part_is_a_clean_error(split_f16: list[Path], tmp_path: Path) -> None:
    parts = copy_set(split_f16, tmp_path / "set")
    parts[1].unlink()
    with pytest.raises(GGUFFormatError, match="part 2 of 3") as e:
        read_gguf(parts[0])
    assert e.value.code == "split-part-missing" and parts[1].name in str(e.value)
    v = validate(parts[0], smoke=False)
    assert v.unusable and v.exit_code == 2 and v.codes == ["split-part-missing"]
    assert_one_line_error(run_cli("inspect", parts[0]), parts[1].name, "missing")
    proc = run_cli("validate", parts[0])  # validate reports an unusable file as its finding, exit 2
    assert proc.returncode == 2 and "split-part-missing" in proc.stdout and "Traceback" not in proc.stderr
    proc = run_cli("quantize", parts[0], "-o", tmp_path / "q.gguf", "--type", "Q8_0")
    assert_one_line_error(proc, parts[1].name, "missing")
    with pytest.raises(SplitSetError, match="missing"):
        quantize(parts[0], tmp_path / "q.gguf", "Q8_0", threads=1)
    assert_one_line_error(run_cli("repair", parts[0], "-o", tmp_path / "r.gguf"), parts[1].name)
    assert_one_line_error(run_cli("export", "release", parts[0], "-o", tmp_path / "rel"), parts[1].name)
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "rel").exists()


def test_inconsistent_parts_are_clean_errors(split_f16: list[Path], tmp_path: Path, n_tensors: int) -> None:
    cases = {
        "split-count-mismatch": (2, "split.count", "H", 4, "split.count"),
        "split-part-mismatch": (2, "split.no", "H", 1, "split.no"),
        "split-tensor-count-mismatch": (0, "split.tensors.count", "i", n_tensors + 1, str(n_tensors)),
    }
    for code, (which, key, fmt, value, needle) in cases.items():
        parts = copy_set(split_f16, tmp_path / code)
        patch_value(parts[which], key, fmt, value)
        with pytest.raises(GGUFFormatError) as e:
            read_gguf(parts[0])
        assert e.value.code == code, (code, str(e.value))
        assert parts[which].name in str(e.value) and needle in str(e.value)
        assert validate(parts[0], smoke=False).exit_code == 2
        assert_one_line_error(run_cli("inspect", parts[0]), parts[which].name)
    # a later part given alone, and a renamed first part
    with pytest.raises(GGUFFormatError, match="give its first part") as e:
        read_gguf(split_f16[1])
    assert e.value.code == "split-not-first"
    assert_one_line_error(run_cli("inspect", split_f16[1]), split_f16[0].name)
    renamed = tmp_path / "renamed.gguf"
    shutil.copyfile(split_f16[0], renamed)
    with pytest.raises(GGUFFormatError, match="-00001-of-00003") as e:
        read_gguf(renamed)
    assert e.value.code == "split-bad-name"


# ----------------------------------------------------------------------------------------------- quantize


@pytest.fixture(scope="module")
def q8_whole(tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize(tiny_f16_gguf, tmp_path_factory.mktemp("q8") / "whole-Q8_0.gguf", "Q8_0", threads=1).path


def test_quantize_split_input_to_one_file(split_f16: list[Path], q8_whole: Path, tmp_path: Path) -> None:
    r = quantize(split_f16[0], tmp_path / "q.gguf", "Q8_0", threads=1)
    assert r.parts == [tmp_path / "q.gguf"] and "split.count" not in split_fields(r.path)
    assert r.input_bytes == set_size(split_f16[0])
    assert tensor_bytes([r.path]) == tensor_bytes([q8_whole])
    assert greedy(r.path) == greedy(q8_whole)
    no_leftovers(tmp_path)


def test_quantize_keep_split_uses_llama_cpp(split_f16: list[Path], q8_whole: Path, tmp_path: Path) -> None:
    r = quantize(split_f16[0], tmp_path / "q.gguf", "Q8_0", threads=1, keep_split=True)
    assert [p.name for p in r.parts] == [f"q-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for i, p in enumerate(r.parts):
        assert split_fields(p)["split.no"] == (i, gguf.GGUFValueType.UINT16)
        assert len(gguf.GGUFReader(p).tensors) == len(gguf.GGUFReader(split_f16[i]).tensors)
    assert tensor_bytes(r.parts) == tensor_bytes([q8_whole])
    assert greedy(r.parts[0]) == greedy(q8_whole)
    no_leftovers(tmp_path)


def test_quantize_to_new_split_through_cli(
    tiny_f16_gguf: Path, q8_whole: Path, tmp_path: Path, n_tensors: int
) -> None:
    proc = run_cli(
        "quantize", tiny_f16_gguf, "-o", tmp_path / "q.gguf", "-t", "Q8_0", "--split-max-tensors", "5",
        "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    parts = sorted(tmp_path.glob("q-*-of-*.gguf"))
    assert len(parts) == math.ceil(n_tensors / 5)
    assert split_fields(parts[-1])["split.tensors.count"] == (n_tensors, gguf.GGUFValueType.INT32)
    assert tensor_bytes(parts) == tensor_bytes([q8_whole])
    assert greedy(parts[0]) == greedy(q8_whole)
    assert_one_line_error(
        run_cli(
            "quantize", tiny_f16_gguf, "-o", tmp_path / "k.gguf", "--keep-split", "--split-max-tensors", "2"
        ),
        "--keep-split",
    )
    no_leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------- other verbs


def test_chat_eval_and_serve_load_the_set(
    split_f16: list[Path], tiny_f16_gguf: Path, tiny_data_dir: Path
) -> None:
    from starlette.testclient import TestClient

    from gguf_factory import load
    from gguf_factory.evaluate import evaluate
    from gguf_factory.serve import ModelPool, create_app

    messages = [{"role": "user", "content": "Hello"}]
    whole = load(tiny_f16_gguf, n_threads=1)
    want = whole.chat(messages, max_tokens=16, temperature=0.0)
    split = load(split_f16[0], n_threads=1)
    assert split.chat(messages, max_tokens=16, temperature=0.0) == want

    r = evaluate(split_f16[0], tiny_data_dir / "test.jsonl", ref=tiny_f16_gguf, limit=4, threads=1)
    scores = r.models[0]
    assert scores.size_bytes == set_size(split_f16[0])
    assert scores.top1 == 1.0 and scores.kld_mean < 1e-6

    pool = ModelPool({"split": split_f16[0]}, n_threads=1, queue_timeout=30)
    try:
        with TestClient(create_app(pool), base_url="http://127.0.0.1") as client:
            resp = client.post(
                "/v1/chat/completions",
                json={"model": "split", "messages": messages, "max_tokens": 16, "temperature": 0},
            )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"].strip() == want.strip()
    finally:
        pool.close()


def test_repair_reads_a_set_and_writes_one_or_a_set(split_f16: list[Path], tmp_path: Path) -> None:
    r = repair(split_f16[0], tmp_path / "fixed.gguf")
    assert r.path == tmp_path / "fixed.gguf" and "split.count" not in split_fields(r.path)
    assert r.after.exit_code == validate(split_f16[0], smoke=False).exit_code
    assert tensor_bytes([r.path]) == tensor_bytes(split_f16)
    r2 = repair(split_f16[0], tmp_path / "fixed2.gguf", split_max_tensors=10)
    parts = sorted(tmp_path.glob("fixed2-*-of-*.gguf"))
    assert len(parts) >= 2 and r2.path == parts[0]
    assert not r2.after.unusable and tensor_bytes(parts) == tensor_bytes(split_f16)
    no_leftovers(tmp_path)


def test_export_copies_every_part(split_f16: list[Path], tmp_path: Path) -> None:
    from gguf_factory.convert.from_gguf import gguf_to_hf
    from gguf_factory.package import export_lmstudio, export_ollama, export_release, verify_release

    rel = export_release([split_f16[0]], tmp_path / "release")
    assert sorted(p.name for p in rel.ggufs) == [p.name for p in split_f16]
    assert any("split GGUF" in w for w in rel.warnings)
    card = rel.card.read_text()
    assert all(p.name in card for p in split_f16)
    report = verify_release(rel.folder)
    assert not report.findings, report.findings
    assert len(report.checked) == N_PARTS + 2  # the parts, Modelfile, README.md

    ol = export_ollama(split_f16[0], tmp_path / "ollama", copy=True)
    assert all((ol.modelfile.parent / p.name).is_file() for p in split_f16)
    lm = export_lmstudio(split_f16[0], tmp_path / "lms", copy=True)
    assert sorted(p.name for p in lm.folder.iterdir()) == [p.name for p in split_f16]

    hf = gguf_to_hf(split_f16[0], tmp_path / "hf")  # convert, GGUF -> Hugging Face, from the set
    assert hf.n_tensors > 0 and (tmp_path / "hf" / "config.json").is_file()
