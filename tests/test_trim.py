"""trim-vocab on a real trained tiny model: same pieces for the data, same logits for kept tokens, and the
trimmed tokenizer reproduced exactly by llama.cpp after conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError, ModelError
from gguf_factory.trim import trim_vocab

GREETINGS = ["Hello", "Hi", "Good morning", "Hey there", "Good evening", "How are you?", "Hello again",
             "Hi friend", "Good night", "Hey", "Morning!", "Howdy"]  # fmt: skip


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset far narrower than the tiny model's training data: it uses few of its 512 tokens."""
    from gguf_factory.data import prepare

    root = tmp_path_factory.mktemp("trim-data")
    src = root / "greetings.jsonl"
    rows = [{"messages": [{"role": "user", "content": g}, {"role": "assistant", "content": g + " to you."}]}
            for g in GREETINGS]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare([src], root / "data", val_fraction=0.15, test_fraction=0.25)
    return root / "data"


@pytest.fixture(scope="module")
def trimmed(tiny_hf_model: Path, small_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("trim") / "trimmed"
    return trim_vocab(tiny_hf_model, small_data, out, vocab_size=300)


def test_trim_shrinks_and_keeps_what_the_data_uses(trimmed, tiny_hf_model: Path, small_data: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gguf_factory.data import load_split

    r = trimmed
    before = json.loads((tiny_hf_model / "config.json").read_text())
    after = json.loads((r.out_dir / "config.json").read_text())
    assert r.vocab_before == before["vocab_size"] == 512
    assert after["vocab_size"] == r.vocab_after
    assert r.data_tokens <= r.vocab_after < 512
    assert r.params_before - r.params_after == (512 - r.vocab_after) * before["hidden_size"] * (
        1 if before.get("tie_word_embeddings") else 2
    )
    assert r.vocab_after == 300 and r.data_tokens < 300
    assert 0.0 <= r.heldout_identical <= 1.0 and r.heldout_token_ratio >= 1.0
    assert json.loads(r.report_path.read_text())["vocab_after"] == r.vocab_after

    tok_a = AutoTokenizer.from_pretrained(tiny_hf_model)
    tok_b = AutoTokenizer.from_pretrained(r.out_dir)
    assert tok_b.eos_token == tok_a.eos_token and tok_b.eos_token_id == after["eos_token_id"]
    assert tok_b.convert_ids_to_tokens(after["eos_token_id"]) == tok_a.eos_token
    model_a = AutoModelForCausalLM.from_pretrained(tiny_hf_model).eval()
    model_b = AutoModelForCausalLM.from_pretrained(r.out_dir).eval()
    rows = [tok_a.convert_tokens_to_ids(t) for t in tok_b.convert_ids_to_tokens(list(range(len(tok_b))))]
    conv = load_split(small_data / "train.jsonl")[0]
    text = tok_a.apply_chat_template([{"role": m.role, "content": m.content} for m in conv.messages],
                                     tokenize=False)  # fmt: skip
    ids_a, ids_b = tok_a(text)["input_ids"], tok_b(text)["input_ids"]
    assert tok_a.convert_ids_to_tokens(ids_a) == tok_b.convert_ids_to_tokens(ids_b)  # same pieces
    assert ids_a != ids_b  # ... under new ids
    with torch.no_grad():
        la = model_a(torch.tensor([ids_a])).logits[0][:, rows]
        lb = model_b(torch.tensor([ids_b])).logits[0]
    assert torch.equal(la, lb)
    # text the data never used still tokenizes, into shorter pieces
    rare = "Zyxwvut quokka 東京 ünïcödé"
    assert tok_b.decode(tok_b(rare)["input_ids"]) == tok_a.decode(tok_a(rare)["input_ids"])


def test_trimmed_model_converts_with_exact_tokenizer_parity(trimmed, tiny_data_dir: Path) -> None:
    from gguf_factory.convert import convert
    from gguf_factory.verify import verify

    gguf = trimmed.out_dir.parent / "trimmed-F32.gguf"
    convert(trimmed.out_dir, gguf, outtype="f32")
    report = verify(gguf, trimmed.out_dir, data=tiny_data_dir, max_prompts=4, max_new_tokens=8)
    assert report.tokenizer.mismatches == [] and report.tokenizer.n_texts > 100  # multilingual included
    assert report.greedy.mismatches == []
    assert report.logits.top1_agreement >= 0.999 and report.ok


def test_trim_refuses_bad_input(tiny_hf_model: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="at least 256"):
        trim_vocab(tiny_hf_model, tiny_data_dir, tmp_path / "x", vocab_size=100)
    with pytest.raises(InputError, match="would overwrite the input model"):
        trim_vocab(tiny_hf_model, tiny_data_dir, tiny_hf_model / "inner")
    unigram = tmp_path / "unigram"
    unigram.mkdir()
    for f in tiny_hf_model.iterdir():
        (unigram / f.name).write_bytes(f.read_bytes())
    tj = json.loads((unigram / "tokenizer.json").read_text())
    tj["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}
    (unigram / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelError, match="only BPE vocabularies can be trimmed .this one is Unigram"):
        trim_vocab(unigram, tiny_data_dir, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    proc = run_cli("trim-vocab", unigram, "--data", tiny_data_dir, "-o", tmp_path / "z")
    assert_one_line_error(proc, "Unigram")
    assert not (tmp_path / "z").exists()
