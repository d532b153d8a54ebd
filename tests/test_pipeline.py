"""End to end on a real tiny model: data -> trained HF model -> GGUF -> llama.cpp, checked against HF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_factory.data import load_split
from gguf_factory.verify import check_greedy_parity, check_tokenizer_parity

pytestmark = pytest.mark.slow


def held_out(tiny_data_dir: Path) -> list:
    return load_split(tiny_data_dir / "test.jsonl") + load_split(tiny_data_dir / "val.jsonl")


def test_tokenizer_parity_on_the_whole_held_out_set(tiny_f32_gguf: Path, tiny_hf_model: Path, tiny_data_dir):
    texts = [m.content for c in held_out(tiny_data_dir) for m in c.messages]
    assert len(texts) > 20
    parity = check_tokenizer_parity(tiny_f32_gguf, tiny_hf_model, texts)
    assert parity.n_texts >= len(texts)
    assert parity.ok, parity.mismatches[:3]


def test_f32_greedy_output_equals_transformers(tiny_f32_gguf: Path, tiny_hf_model: Path, tiny_data_dir):
    prompts = [
        [{"role": "user", "content": next(m.content for m in c.messages if m.role == "user")}]
        for c in held_out(tiny_data_dir)[:8]
    ]
    parity = check_greedy_parity(tiny_f32_gguf, tiny_hf_model, prompts, max_new_tokens=16)
    assert parity.n_prompts == len(prompts)
    assert parity.ok, parity.mismatches[:3]


def test_cli_path_from_data_file_to_an_answer(tmp_path: Path) -> None:
    """The README's verbs, as a user types them, on a user's own JSONL file."""
    things = [
        "colour",
        "food",
        "book",
        "film",
        "song",
        "game",
        "sport",
        "city",
        "season",
        "animal",
        "drink",
        "fruit",
        "flower",
        "number",
        "planet",
        "tree",
    ]
    rows = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"What is your favourite {thing}?"},
                    {"role": "assistant", "content": f"I really like {thing}."},
                ]
            }
        )
        for thing in things
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(rows) + "\n")

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "gguf_factory.cli", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    cli("prepare", "chats.jsonl", "-o", "data")
    cli("train", "data", "-o", "model", "--preset", "nano", "--epochs", "1", "--max-seq-len", "64")
    assert (tmp_path / "model" / "model.safetensors").exists()
    cli("convert", "model", "-o", "m-F16.gguf", "--outtype", "f16")
    out = cli("quantize", "m-F16.gguf", "-o", "m-Q8_0.gguf", "--type", "Q8_0")
    assert "Q8_0" in out
    answer = cli("generate", "m-Q8_0.gguf", "What is your favourite song?", "--max-tokens", "8")
    assert answer.strip()
