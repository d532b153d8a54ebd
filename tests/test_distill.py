"""Knowledge distillation on real tiny models: an HF teacher and its F32 GGUF (llama.cpp) teach a student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError, ModelError, TrainingError
from gguf_factory.train import ModelPreset, train
from gguf_factory.train.distill import (
    DistillSettings,
    GGUFTeacher,
    HFTeacher,
    TopK,
    kl_full,
    kl_topk,
)
from gguf_factory.train.loop import collate, encode_splits, evaluate, load_splits
from gguf_factory.train.tokenizer import save_hf_tokenizer, train_bpe_tokenizer

# Smaller than the teacher (hidden 64, 2 layers): hidden 32, 1 layer; its vocabulary is the teacher's.
STUDENT = ModelPreset(
    name="student", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
    vocab_size=512, max_seq_len=128, epochs=3, lr=3e-3, batch_size=8,
)  # fmt: skip


def _distil(data: Path, out: Path, teacher: Path, **kw):
    kw.setdefault("keep", "last")
    return train(data, out, preset=STUDENT, distill_from=teacher, threads=1, progress=False, **kw)


def _siblings(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.slow
def test_distillation_brings_student_closer_to_teacher(tiny_data_dir, tiny_hf_model, tmp_path):
    # Same student, seed and epochs; the only difference is the teacher's weight in the loss. Measured over
    # seeds 0-9 the distilled student's KL is 0.48-0.62 x the plain one's; 0.8 leaves a margin.
    for seed in (0, 1):
        plain = _distil(tiny_data_dir, tmp_path / f"plain{seed}", tiny_hf_model, alpha=0.0, seed=seed)
        dist = _distil(tiny_data_dir, tmp_path / f"dist{seed}", tiny_hf_model, seed=seed)
        p, d = plain.distill, dist.distill
        assert d.teacher_kind == "hf" and d.top_k is None and (d.temperature, d.alpha) == (2.0, 0.5)
        assert d.val_tokens > 100 and d.val_tokens == p.val_tokens
        assert d.kl_student_to_teacher < 0.8 * p.kl_student_to_teacher, (d, p)
        # the teacher is scored the same way in both runs (it does not train)
        assert d.teacher_val_loss == pytest.approx(p.teacher_val_loss, abs=1e-6)
        assert d.student_val_loss == pytest.approx(dist.val_losses[-1], abs=1e-4)  # keep="last"

    out = tmp_path / "dist1"
    record = json.loads((out / "training.json").read_text())
    assert record["kind"] == "distill"
    rep = record["distill"]
    assert rep["kl_student_to_teacher"] == pytest.approx(dist.distill.kl_student_to_teacher)
    for key in ("student_val_loss", "student_val_accuracy", "teacher_val_loss", "teacher_val_accuracy"):
        assert isinstance(rep[key], float)
    # the student: smaller than the teacher, with the teacher's tokenizer (not a new one)
    cfg = json.loads((out / "config.json").read_text())
    tcfg = json.loads((tiny_hf_model / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (32, 1)
    assert cfg["vocab_size"] == tcfg["vocab_size"]
    assert dist.n_params < sum(
        t.numel() for t in LlamaForCausalLM.from_pretrained(tiny_hf_model).parameters()
    )
    s_tok, t_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_hf_model)
    assert s_tok.get_vocab() == t_tok.get_vocab()
    assert s_tok.chat_template == t_tok.chat_template


@pytest.mark.slow
def test_gguf_teacher_gives_the_hf_teacher_distributions(tiny_data_dir, tiny_hf_model, tiny_f32_gguf):
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    tr, va = encode_splits(tok, load_splits(tiny_data_dir), 128)
    vocab = len(tok)
    hf, gg = HFTeacher(tiny_hf_model), GGUFTeacher(tiny_f32_gguf, threads=1)
    try:
        assert gg.tokens() == hf.tokens()
        batch = list(range(6))
        collated = collate(tr.examples, batch, tok.pad_token_id)
        h = hf.rows(tr.examples, batch, collated, vocab)
        g = gg.rows(tr.examples, batch, collated, vocab)
        assert h.shape == g.shape and h.shape[0] == sum(tr.examples[i].n_target for i in batch)
        # F32 GGUF through llama.cpp = the transformers model: same top-64 logits (ties aside)
        hv, _ = h.topk(64, dim=-1)
        gv, gi = g.topk(64, dim=-1)
        torch.testing.assert_close(gv, hv, atol=2e-3, rtol=0)
        torch.testing.assert_close(h.gather(1, gi), gv, atol=2e-3, rtol=0)

        # the cache built once before training: top-k of llama.cpp's rows and logsumexp(row / T)
        ds = DistillSettings(temperature=2.0, top_k=64)
        gg.prepare(tr.examples, vocab, ds)
        cached = gg.train_rows(tr.examples, batch, collated, vocab)
        assert isinstance(cached, TopK) and cached.values.shape == (h.shape[0], 64)
        torch.testing.assert_close(h.gather(1, cached.indices), cached.values, atol=2e-3, rtol=0)
        torch.testing.assert_close(cached.lse, torch.logsumexp(h / 2.0, dim=-1), atol=2e-3, rtol=0)

        # top-k + tail bucket KL: exact when k covers the vocabulary, a lower bound otherwise
        student = torch.randn_like(h) * 2
        full = kl_full(student, h, 2.0)
        values, indices = h.topk(vocab, dim=-1)
        every = TopK(values, indices, torch.logsumexp(h / 2.0, dim=-1))
        assert float(kl_topk(student, every, 2.0)) == pytest.approx(float(full), rel=1e-4)
        assert 0 < float(kl_topk(student, cached, 2.0)) <= float(full) + 1e-4
    finally:
        gg.close()

    # teacher scores reported by a GGUF-taught run = the HF teacher's own (exact F32)
    t_loss, t_acc = evaluate(hf.model, va.examples, 16, tok.pad_token_id)
    out = tiny_f32_gguf.parent / "student-from-gguf"
    r = _distil(tiny_data_dir, out, tiny_f32_gguf, seed=3)
    d = r.distill
    assert d.teacher_kind == "gguf" and d.top_k == 64 and d.teacher == str(tiny_f32_gguf)
    assert d.teacher_val_loss == pytest.approx(t_loss, abs=2e-3)
    assert d.teacher_val_accuracy == pytest.approx(t_acc, abs=1e-9)
    # the student trained: well below the loss of a uniform guess over the vocabulary
    assert r.train_losses[-1] < r.train_losses[0]
    assert d.student_val_loss < math.log(vocab) - 0.2
    assert math.isfinite(d.kl_student_to_teacher) and d.kl_student_to_teacher > 0
    # a from-scratch student of a GGUF teacher takes the GGUF's tokenizer
    s_tok = AutoTokenizer.from_pretrained(out)
    assert s_tok.get_vocab() == tok.get_vocab()
    msgs = [{"role": "user", "content": "Do you like pizza?"}, {"role": "assistant", "content": "Yes."}]
    assert s_tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def _base_student(folder: Path, tokenizer_from: Path | None) -> Path:
    """A tiny Llama base folder: with the teacher's tokenizer, or with a BPE learnt on other text."""
    folder.mkdir()
    if tokenizer_from is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        tok.save_pretrained(folder)
    else:
        texts = [f"user\nnumber {i} is {i * i}, colour {c}" for i in range(200) for c in ("red", "blue")]
        save_hf_tokenizer(train_bpe_tokenizer(texts, 300), folder, model_max_length=64)
        tok = AutoTokenizer.from_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_base_student(tiny_data_dir, tiny_hf_model, tiny_f32_gguf, tmp_path):
    other = _base_student(tmp_path / "other-vocab", None)
    before = _siblings(tmp_path)
    for teacher in (tiny_hf_model, tiny_f32_gguf):
        with pytest.raises(TrainingError, match="vocabulary mismatch") as e:
            train(tiny_data_dir, tmp_path / "out", base=other, distill_from=teacher, progress=False)
        assert str(other) in str(e.value) and str(teacher) in str(e.value)
        assert _siblings(tmp_path) == before  # nothing written

    same = _base_student(tmp_path / "same-vocab", tiny_hf_model)
    r = train(
        tiny_data_dir, tmp_path / "out", base=same, distill_from=tiny_f32_gguf, epochs=1, lr=3e-3,
        threads=1, progress=False, alpha=1.0, temperature=1.0,
    )  # fmt: skip
    assert r.distill.teacher_kind == "gguf" and (r.distill.alpha, r.distill.temperature) == (1.0, 1.0)
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["base"] == str(same.resolve()) and record["distill"]["alpha"] == 1.0


@pytest.mark.parametrize(
    ("option", "kw"),
    [
        ("--distill-temperature", {"temperature": 0.0}),
        ("--distill-temperature", {"temperature": -1.0}),
        ("--distill-temperature", {"temperature": float("nan")}),
        ("--distill-alpha", {"alpha": 1.5}),
        ("--distill-alpha", {"alpha": -0.1}),
        ("--distill-alpha", {"alpha": float("inf")}),
    ],
)
def test_bad_settings_name_the_option(tiny_data_dir, tmp_path, option, kw):
    teacher = tmp_path / "teacher.gguf"
    teacher.write_bytes(b"GGUF")  # checked after the settings: the settings error comes first
    with pytest.raises(TrainingError, match=option):
        _distil(tiny_data_dir, tmp_path / "out", teacher, **kw)
    assert _siblings(tmp_path) == {"teacher.gguf"}


def test_bad_teacher_or_combination(tiny_data_dir, tmp_path):
    # resolved as a model source first (gguf_factory.bases): an InputError naming the teacher
    with pytest.raises(InputError, match="teacher.* not found"):
        _distil(tiny_data_dir, tmp_path / "out", tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="neither a HF model folder nor a GGUF"):
        _distil(tiny_data_dir, tmp_path / "out", junk)
    with pytest.raises(TrainingError, match="--lora"):
        train(tiny_data_dir, tmp_path / "out", base=tmp_path, lora=True, distill_from=junk)
    assert _siblings(tmp_path) == {"junk.gguf"}


def test_cli_distill_error(tiny_data_dir, tmp_path):
    out = tmp_path / "cli-student"
    bad = run_cli("train", tiny_data_dir, "-o", out, "--distill-from", tmp_path, "--distill-alpha", "2")
    assert_one_line_error(bad, "--distill-alpha")
    assert not out.exists()


@pytest.mark.slow
def test_cli_distill(tiny_data_dir, tiny_f32_gguf, tmp_path):
    out = tmp_path / "cli-student"
    proc = run_cli(
        "train", tiny_data_dir, "-o", out, "--distill-from", tiny_f32_gguf, "--epochs", "1", "--threads", "1",
        "--distill-temperature", "1.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"distilled from {tiny_f32_gguf} (T=1.5, alpha=0.5)" in proc.stdout
    assert "KL(teacher||student)" in proc.stdout and "teacher loss" in proc.stdout
    record = json.loads((out / "training.json").read_text())
    assert record["distill"]["temperature"] == 1.5 and record["distill"]["teacher_kind"] == "gguf"
