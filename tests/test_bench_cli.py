"""`gguf-factory bench`: the HF model (transformers) vs its GGUFs (llama.cpp) vs a Bi-LSTM seq2seq baseline,
end to end on the tiny model; and the baseline's own training, saving and loading."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.baseline.lstm import LSTMConfig, load_lstm, train_lstm
from gguf_factory.bench import SEED_TARGETS, run_bench, system_size
from gguf_factory.errors import DataError, InputError, ModelError

pytestmark = pytest.mark.slow

TINY_LSTM = LSTMConfig(embed_dim=32, hidden_dim=48, max_epochs=3, max_len=16, batch_size=8, lr=1e-2)
PROMPTS = ["hi, how are you?", "Tell me a joke", "What is your favourite food?", "Do you like pizza?"]


@pytest.fixture(scope="module")
def tiny_lstm(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lstm") / "lstm"
    r = train_lstm(tiny_data_dir, out, config=TINY_LSTM, threads=1)
    assert r.path == out and 1 <= r.best_epoch <= r.epochs <= TINY_LSTM.max_epochs
    assert r.train_pairs > 20 and r.val_pairs > 0 and r.vocab_size > 50 and r.parameters > 1000
    return out


def test_lstm_save_load_round_trip(tiny_lstm: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in tiny_lstm.iterdir()) == ["config.json", "model.safetensors"]
    raw = (tiny_lstm / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]  # safetensors: a JSON header, then raw tensors; no pickle
    assert 0 < header_len < len(raw) and raw[8:9] == b"{"
    a = load_lstm(tiny_lstm, threads=1)
    assert json.loads((tiny_lstm / "config.json").read_text())["tokenizer"] == "words"
    copy = a.save(tmp_path / "copy")
    b = load_lstm(copy, threads=1)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    replies = []
    for p in PROMPTS:
        ta = list(a.generate_tokens(p, max_tokens=12))
        assert ta == list(b.generate_tokens(p, max_tokens=12))
        assert len(ta) <= 12 and a.reply(p, max_tokens=12) == b.reply(p, max_tokens=12) == a.detokenize(ta)
        replies.append(ta)
    assert any(replies)  # greedy decoding produced words to compare
    # and the whole network computes the same numbers: teacher-forced logits of a batch, bit for bit
    src = torch.tensor([a.encode(PROMPTS[0]), a.encode(PROMPTS[0])])
    tgt = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])
    with torch.inference_mode():
        la, lb = (
            a.model(src, torch.tensor([src.shape[1]] * 2), tgt),
            b.model(src, torch.tensor([src.shape[1]] * 2), tgt),
        )
    assert la.shape == (2, 4, len(a.vocab)) and torch.equal(la, lb)
    # the saved model is the best epoch's, and it is a model of these words: decoding is deterministic
    assert a.vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"] and "joke" in a.index


def test_lstm_load_rejects_bad_folders(tiny_lstm: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_lstm(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_lstm, bad)
    doc = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**doc, "vocab": doc["vocab"][:-1]}))
    with pytest.raises(ModelError, match="do not fit"):
        load_lstm(bad)
    (bad / "config.json").write_text(json.dumps({**doc, "format": "keras"}))
    with pytest.raises(ModelError, match="format"):
        load_lstm(bad)
    (bad / "config.json").write_text(json.dumps({**doc, "config": {**doc["config"], "hidden_dim": -3}}))
    with pytest.raises(ModelError, match="hidden_dim"):
        load_lstm(bad)
    (bad / "config.json").write_text(json.dumps(doc))
    (bad / "model.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="model.safetensors"):
        load_lstm(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="needs config.json and model.safetensors"):
        load_lstm(bad)


def test_bench_end_to_end(
    tiny_hf_model: Path,
    tiny_f32_gguf: Path,
    tiny_f16_gguf: Path,
    tiny_data_dir: Path,
    tiny_lstm: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    proc = run_cli(
        "bench", tiny_f32_gguf, tiny_f16_gguf, "--hf", tiny_hf_model, "--data", tiny_data_dir,
        "--lstm", tiny_lstm, "-o", out, "--runs", "1", "--prompts", "2", "--max-tokens", "8",
        "--quality", "6", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"bench-report.{x}" for x in ("json", "md", "png")]
    doc = json.loads((out / "bench-report.json").read_text())
    systems = {s["name"]: s for s in doc["systems"]}
    assert [s["kind"] for s in doc["systems"]] == ["hf", "gguf", "gguf", "lstm"]
    paths = {"model-hf": tiny_hf_model, "tiny-F32": tiny_f32_gguf, "tiny-F16": tiny_f16_gguf}
    paths["lstm"] = tiny_lstm
    assert set(systems) == set(paths)
    for name, path in paths.items():
        m = systems[name]["measurement"]
        real = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
        assert m["size_bytes"] == real == system_size(path)
        assert m["load_s"] > 0 and m["first_token_ms"] > 0 and m["peak_rss_mb"] > 10 and m["runs"] == 1
        assert [a["prompt"] for a in m["answers"]] == [p["prompt"] for p in doc["prompts"]]
        assert len(m["answers"]) == 2
        assert len(m["quality_replies"]) == doc["quality_prompts"] == 6
        s = systems[name]
        assert 0 <= s["known_word_rate"] <= 1 and 0 <= s["on_topic"] <= 1 and 0 <= s["similarity"] <= 1
        if m["kind"] == "gguf":
            assert set(s["seed_targets"]) == set(SEED_TARGETS) and s["seed_targets"]["size_mb"] is True
            assert s["seed_targets"]["peak_rss_mb"] == (m["peak_rss_mb"] < 200)
        else:
            assert s["seed_targets"] is None
    # a llama.cpp process is far lighter than a torch + transformers one
    rss = {name: s["measurement"]["peak_rss_mb"] for name, s in systems.items()}
    assert rss["tiny-F32"] < rss["model-hf"]
    # the F32 GGUF is an exact conversion: the same greedy replies as the HF model, so the same quality
    hf, f32 = systems["model-hf"], systems["tiny-F32"]
    assert hf["measurement"]["answers"] == f32["measurement"]["answers"]
    assert hf["measurement"]["quality_replies"] == f32["measurement"]["quality_replies"]
    assert (hf["on_topic"], hf["similarity"]) == (f32["on_topic"], f32["similarity"])
    assert 0 < doc["reference_on_topic"] <= 1
    # bits per byte of the same held-out reference replies, every system under its own tokenizer: the HF
    # model and its F32 GGUF agree (same weights, two engines), the F16 nearly; the LSTM pays in full
    bpb = {name: s["bits_per_byte_detail"] for name, s in systems.items()}
    assert len({(b["bytes"], b["n_replies"]) for b in bpb.values()}) == 1
    assert all(b["skipped_replies"] == 0 and 0 < b["bpb"] < 12 for b in bpb.values())
    assert {name: b["kind"] for name, b in bpb.items()} == {n: s["kind"] for n, s in systems.items()}
    assert bpb["model-hf"]["bpb"] == pytest.approx(bpb["tiny-F32"]["bpb"], rel=1e-5)
    assert systems["model-hf"]["bits_per_byte"] == bpb["model-hf"]["bpb"]
    assert bpb["tiny-F16"]["bpb"] == pytest.approx(bpb["tiny-F32"]["bpb"], rel=2e-3)
    lstm_bpb = bpb["lstm"]
    assert lstm_bpb["n_words"] > 0 and lstm_bpb["n_tokens"] == lstm_bpb["n_words"] + lstm_bpb["n_replies"]
    md = (out / "bench-report.md").read_text()
    assert all(name in md for name in paths) and "Seed targets" in md and "bench-report.png" in md
    assert "| bits/byte |" in md and f"| {bpb['tiny-F32']['bpb']:.3f} |" in md and "p(<unk>)" in md
    assert f"{bpb['lstm']['n_oov']} of its {bpb['lstm']['n_words']} reply words" in md
    png = (out / "bench-report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "bench-report.md" in proc.stdout and "on topic: reference answers" in proc.stdout
    assert "bits/B" in proc.stdout


def test_bench_trains_the_lstm(tiny_data_dir: Path, tmp_path: Path) -> None:
    r = run_bench(
        [], tiny_data_dir, tmp_path / "r", train_lstm=True, lstm_config=TINY_LSTM, runs=1, n_prompts=2,
        max_tokens=6, max_quality=4, threads=1,
    )  # fmt: skip
    assert (tmp_path / "r" / "lstm" / "model.safetensors").is_file()
    assert [s.row.kind for s in r.systems] == ["lstm"] and r.systems[0].row.name == "lstm-seq2seq"
    assert r.lstm_training and 1 <= r.lstm_training["best_epoch"] <= r.lstm_training["epochs"] <= 3
    assert json.loads(r.json_path.read_text())["lstm_training"]["vocab_size"] > 50
    assert "LSTM baseline" in r.md_path.read_text() and r.png_path.stat().st_size > 10_000
    b = r.systems[0].bits_per_byte
    assert b is not None and b.kind == "lstm" and b.n_replies > 0 and b.n_end_tokens == b.n_replies
    assert b.bpb == r.systems[0].bpb > 0


@pytest.fixture(scope="module")
def other_family_gguf(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF of another tiny model, with its own tokenizer (another vocabulary size)."""
    from gguf_factory.convert import convert
    from gguf_factory.train import train
    from gguf_factory.train.scratch import ModelPreset

    root = tmp_path_factory.mktemp("other")
    preset = ModelPreset(
        name="other", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
        vocab_size=300, max_seq_len=64, epochs=1, lr=3e-3, batch_size=16,
    )  # fmt: skip
    train(tiny_data_dir, root / "hf", preset=preset, progress=False, seed=1, max_steps=1, threads=1)
    convert(root / "hf", root / "other-F32.gguf", outtype="f32")
    return root / "other-F32.gguf"


def test_bench_bad_inputs(
    tiny_hf_model: Path, tiny_f32_gguf: Path, tiny_data_dir: Path, other_family_gguf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    common = {"runs": 1, "n_prompts": 1, "max_tokens": 4, "threads": 1}
    with pytest.raises(InputError, match="not found"):
        run_bench([tiny_f32_gguf], tiny_data_dir, out, hf=tmp_path / "missing-model", **common)
    with pytest.raises(InputError, match="not found"):
        run_bench([tmp_path / "missing.gguf"], tiny_data_dir, out, **common)
    with pytest.raises(ModelError, match="config.json"):
        run_bench([], tiny_data_dir, out, hf=tiny_data_dir, **common)
    with pytest.raises(ModelError, match="not a GGUF"):
        run_bench([tiny_data_dir / "train.jsonl"], tiny_data_dir, out, **common)
    with pytest.raises(InputError, match="another model family"):
        run_bench([tiny_f32_gguf, other_family_gguf], tiny_data_dir, out, hf=tiny_hf_model, **common)
    with pytest.raises(InputError, match="not both"):
        run_bench([], tiny_data_dir, out, lstm=tmp_path, train_lstm=True, **common)
    with pytest.raises(InputError, match="nothing to benchmark"):
        run_bench([], tiny_data_dir, out, **common)
    with pytest.raises(InputError, match="dataset folder not found"):
        run_bench([tiny_f32_gguf], tmp_path / "no-data", out, **common)
    empty = tmp_path / "empty-data"
    shutil.copytree(tiny_data_dir, empty)
    (empty / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="no held-out conversation"):
        run_bench([tiny_f32_gguf], empty, out, **common)
    assert not out.exists()  # every check ran before anything was written
    # the command line prints one line for each
    proc = run_cli("bench", other_family_gguf, "--hf", tiny_hf_model, "--data", tiny_data_dir, "-o", out)
    assert_one_line_error(proc, "other-F32.gguf", "another model family")
    proc = run_cli("bench", tiny_f32_gguf, "--data", tmp_path / "no-data", "-o", out)
    assert_one_line_error(proc, "no-data")
