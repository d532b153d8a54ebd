"""Hub-ready releases: the Hugging Face model-card header that `export release` writes (read back with
huggingface_hub itself), and `--push` failing cleanly without network. No test reaches the network."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from gguf_factory.convert import convert
from gguf_factory.errors import InputError
from gguf_factory.package import export_release, read_model_info, verify_release
from gguf_factory.package.card import card_data, card_header, check_card
from gguf_factory.quantize import quantize

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def hub_ggufs(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny model as if it came from the Hub: config ``_name_or_path`` a Hub id, a model card with a
    licence; converted to F16 (the converter records both in general.*) and quantized to Q4_K_M."""
    root = tmp_path_factory.mktemp("hub")
    model = root / "model"
    shutil.copytree(tiny_hf_model, model)
    config = json.loads((model / "config.json").read_text())
    config["_name_or_path"] = HUB_ID
    (model / "config.json").write_text(json.dumps(config))
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    f16 = convert(model, root / "tiny-F16.gguf", outtype="f16").path
    q4 = quantize(f16, root / "tiny-Q4_K_M.gguf", "Q4_K_M", threads=1).path
    return [q4, f16]


def test_card_header_read_back_by_huggingface_hub(hub_ggufs: list[Path], tmp_path: Path) -> None:
    r = export_release(hub_ggufs, tmp_path / "release")
    card = ModelCard.load(r.card)  # huggingface_hub's own parser, from the file
    data = card.data.to_dict()
    assert data["base_model"] == HUB_ID and data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0"
    assert data["quantized_by"] == "gguf-factory" and data["pipeline_tag"] == "text-generation"
    assert data["tags"][:2] == ["gguf", "llama.cpp"] and {"Q4_K_M", "F16"} <= set(data["tags"])
    assert "language" not in data  # the files do not say: left out, not invented
    assert r.card_data == data
    text = r.card.read_text()
    assert text.startswith("---\n") and "\n---\n\n# " in text
    assert "| `tiny-Q4_K_M.gguf` | Q4_K_M |" in card.text  # the markdown body follows the header
    assert verify_release(r.folder).findings == []


def test_card_values_unknown_are_omitted(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    r = export_release([tiny_f16_gguf], tmp_path / "release")
    data = ModelCard.load(r.card).data.to_dict()
    assert set(data) == {"tags", "quantized_by", "pipeline_tag"}  # local source, no licence, no language
    assert data["tags"] == ["gguf", "llama.cpp", "F16"]


def test_card_data_from_general_keys(tiny_f16_gguf: Path) -> None:
    info = read_model_info(tiny_f16_gguf)
    info = dataclasses.replace(
        info,
        general={
            **info.general,
            "general.languages": ["en", "fr"],
            "general.license": "My Custom Licence 1.0",
            "general.license.link": "https://example.com/licence",
            "general.tags": ["chat", "gguf"],
            "general.source.url": f"https://huggingface.co/{HUB_ID}",
        },
    )
    data = card_data([info])
    parsed = check_card(card_header(data) + "\n# body\n")
    assert parsed["language"] == ["en", "fr"]
    assert parsed["license"] == "other" and parsed["license_name"] == "my-custom-licence-1.0"
    assert parsed["license_link"] == "https://example.com/licence"
    assert parsed["tags"] == ["gguf", "llama.cpp", "F16", "chat"]
    assert parsed["base_model"] == HUB_ID and "base_model_relation" not in parsed  # F16: not quantized
    assert (
        check_card(card_header(card_data([info], base_model="org/other", license="MIT")))["license"] == "mit"
    )
    with pytest.raises(InputError, match="not a Hugging Face model id"):
        card_data([info], base_model="not an id")


def _cli(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_factory.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


def test_push_offline_is_one_line_and_keeps_the_folder(hub_ggufs: list[Path], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token", "COLUMNS": "400"}
    out = tmp_path / "release"
    proc = _cli("export", "release", *hub_ggufs, "-o", out, "--push", "someone/tiny-gguf", env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "someone/tiny-gguf" in lines[0] and "offline" in lines[0].lower() and str(out) in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "README.md", "SHA256SUMS", *(p.name for p in hub_ggufs)]
    )
    assert verify_release(out).findings == []  # intact


def test_push_bad_repo_id_writes_nothing(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = _cli("export", "release", tiny_f16_gguf, "-o", tmp_path / "rel", "--push", "not a repo", env=env)
    assert proc.returncode == 2 and "not a repo" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "rel").exists()
