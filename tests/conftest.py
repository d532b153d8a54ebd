"""Shared fixtures: a real tiny chat model trained here, its GGUFs converted by us, run by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest

# Two small chatterbot-corpus categories: real chat data, a few seconds of training.
TINY_CATEGORIES = ["greetings", "humor", "food"]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_factory.data import prepare

    out = tmp_path_factory.mktemp("tiny") / "data"
    prepare(None, out, categories=TINY_CATEGORIES, val_fraction=0.15, test_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_data_dir: Path) -> Path:
    """A tiny Llama trained from scratch by `train` (tokenizer included) on the tiny dataset."""
    from gguf_factory.train import train
    from gguf_factory.train.scratch import ModelPreset

    preset = ModelPreset(
        name="test-tiny",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=512,
        max_seq_len=128,
        epochs=4,
        lr=3e-3,
        batch_size=16,
    )
    out = tiny_data_dir.parent / "model-hf"
    train(tiny_data_dir, out, preset=preset, progress=False, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_f32_gguf(tiny_hf_model: Path) -> Path:
    from gguf_factory.convert import convert

    out = tiny_hf_model.parent / "tiny-F32.gguf"
    convert(tiny_hf_model, out, outtype="f32")
    return out


@pytest.fixture(scope="session")
def tiny_f16_gguf(tiny_hf_model: Path) -> Path:
    from gguf_factory.convert import convert

    out = tiny_hf_model.parent / "tiny-F16.gguf"
    convert(tiny_hf_model, out, outtype="f16")
    return out
