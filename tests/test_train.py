"""Real (tiny) training runs: from scratch, fine-tuning GPT-2 and Llama bases, masking, seeding, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gguf_factory.errors import InputError, ModelError, TrainingError
from gguf_factory.train import PRESETS, ModelPreset, TrainResult, train
from gguf_factory.train.loop import IGNORE_INDEX, encode_conversation
from gguf_factory.train.scratch import build_model
from gguf_factory.train.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START

TINY = ModelPreset(
    name="tiny",
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    vocab_size=400,
    max_seq_len=96,
    epochs=4,
    lr=3e-3,
    batch_size=8,
)

COLOURS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "blood": "red",
    "banana": "yellow",
    "orange": "orange",
    "plum": "purple",
}
ANIMALS = {"cat": "meows", "dog": "barks", "cow": "moos", "duck": "quacks", "lion": "roars", "bee": "buzzes"}


def _conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            thing, colour = rng.choice(sorted(COLOURS.items()))
            msgs = [
                {"role": "user", "content": f"What colour is the {thing}?"},
                {"role": "assistant", "content": f"The {thing} is {colour}."},
            ]
        else:
            animal, sound = rng.choice(sorted(ANIMALS.items()))
            msgs = [
                {"role": "user", "content": f"What does a {animal} say?"},
                {"role": "assistant", "content": f"A {animal} {sound}."},
            ]
        if i % 5 == 0:
            msgs = [
                {"role": "system", "content": "You are a helpful bot."},
                *msgs,
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."},
            ]
        out.append({"messages": msgs, "domain": "test", "source": f"test:{i}"})
    return out


def write_dataset(folder: Path, n_train: int = 48, n_val: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", 4, 3)):
        rows = _conversations(n, seed)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def scratch_run(data_dir, tmp_path_factory) -> tuple[TrainResult, Path]:
    out = tmp_path_factory.mktemp("models") / "tiny"
    result = train(data_dir, out, preset=TINY, epochs=6, progress=False, threads=1)
    return result, out


def _bpe(texts: list[str], specials: list[str], vocab: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _texts() -> list[str]:
    return [m["content"] for c in _conversations(60, 9) for m in c["messages"]]


def _labelled_text(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ presets


def test_presets_sizes_and_widths():
    ids = {ENDOFTEXT: 0, IM_END: 2}
    counts = {}
    for name, p in PRESETS.items():
        assert p.hidden_size % 256 == 0 and p.intermediate_size % 256 == 0, name
        model = build_model(p, p.vocab_size, max_seq_len=p.max_seq_len, special_ids=ids)
        counts[name] = sum(t.numel() for t in model.parameters())
        assert model.config.tie_word_embeddings
    assert 2e6 <= counts["nano"] <= 5e6, counts
    assert 20e6 <= counts["small"] <= 50e6, counts


# ------------------------------------------------------------------------------------------------ scratch


def test_scratch_training_learns_and_saves(scratch_run):
    result, out = scratch_run
    assert result.model_dir == out
    assert result.epochs_run == len(result.train_losses) == len(result.val_losses)
    assert result.train_losses[-1] < result.train_losses[0] - 0.5
    assert result.val_losses[-1] < result.val_losses[0]
    # the kept epoch is the one with the best held-out top-1 accuracy (the default monitor)
    assert result.monitor == "accuracy" and len(result.val_accuracies) == result.epochs_run
    assert result.best_val_accuracy == max(result.val_accuracies)
    assert result.best_val_accuracy == result.val_accuracies[result.best_epoch - 1]
    assert result.best_val_loss == result.val_losses[result.best_epoch - 1]
    assert 0.0 < result.best_val_accuracy <= 1.0
    assert result.n_params > 10_000 and result.steps > 0 and result.seconds > 0
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "training.json",
    ):
        assert (out / f).is_file(), f
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"
    record = json.loads((out / "training.json").read_text())
    assert record["kind"] == "scratch" and record["n_params"] == result.n_params
    assert record["val_losses"] == [round(x, 6) for x in result.val_losses]
    assert record["preset"]["name"] == "tiny"


def test_scratch_output_loads_and_chats(scratch_run):
    _, out = scratch_run
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert model.config.pad_token_id == tok.convert_tokens_to_ids(ENDOFTEXT)
    msgs = [{"role": "user", "content": "What does a cat say?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat does a cat say?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_labels_mask_only_assistant_turns(scratch_run):
    _, out = scratch_run
    tok = AutoTokenizer.from_pretrained(out)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does a dog say?"},
        {"role": "assistant", "content": "A dog barks."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ex = encode_conversation(tok, msgs, 512)
    assert ex is not None
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert _labelled_text(tok, ex) == "A dog barks.<|im_end|>You are welcome.<|im_end|>"
    im_start = tok.convert_tokens_to_ids(IM_START)
    # every labelled token is its own input id; the role headers and user/system turns are masked
    for t, lab in zip(ex.input_ids, ex.labels, strict=True):
        assert lab in (IGNORE_INDEX, t)
        if t == im_start:
            assert lab == IGNORE_INDEX
    # truncated: the first reply only partly fits, the second not at all
    short = encode_conversation(tok, msgs, len(tok(full.split("A dog")[0] + "A dog")["input_ids"]))
    assert short is not None and _labelled_text(tok, short).strip() == "A dog"
    # nothing left of any reply -> None
    assert encode_conversation(tok, msgs, 8) is None
    assert encode_conversation(tok, msgs[:2], 512) is None  # no assistant turn


def test_masking_follows_a_non_chatml_template():
    bpe = _bpe(_texts(), ["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
    )
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "The sky is blue."},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "A cat meows."},
    ]
    ex = encode_conversation(tok, msgs, 512)
    assert _labelled_text(tok, ex) == "The sky is blue.</s>A cat meows.</s>"


def test_truncation_to_nothing_is_an_error(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="no usable training example"):
        train(data_dir, tmp_path / "m", preset=TINY, max_seq_len=8, progress=False)
    assert not (tmp_path / "m").exists()


def test_seeded_runs_are_reproducible(data_dir, tmp_path):
    kw = dict(preset=TINY, max_steps=5, progress=False, threads=1)
    a = train(data_dir, tmp_path / "a", seed=7, **kw)
    b = train(data_dir, tmp_path / "b", seed=7, **kw)
    c = train(data_dir, tmp_path / "c", seed=8, **kw)
    assert a.steps == b.steps == 5
    assert a.train_losses == b.train_losses and a.val_losses == b.val_losses
    assert c.train_losses != a.train_losses
    ma = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    mb = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("monitor", ["accuracy", "loss"])
def test_early_stopping_keeps_best(data_dir, tmp_path, monitor):
    # a learning rate too small to move the model: epoch 1 is the best, then `patience` epochs without gain
    r = train(
        data_dir, tmp_path / "m", preset=TINY, epochs=10, lr=1e-9, patience=2, progress=True, monitor=monitor
    )
    assert r.monitor == monitor
    assert r.stopped_early and r.epochs_run == 3 and r.best_epoch == 1
    assert r.best_val_loss == r.val_losses[0] and r.best_val_accuracy == r.val_accuracies[0]


def test_loss_monitor_keeps_the_lowest_val_loss(data_dir, tmp_path):
    r = train(data_dir, tmp_path / "m", preset=TINY, epochs=4, progress=False, monitor="loss", threads=1)
    assert r.best_val_loss == min(r.val_losses) == r.val_losses[r.best_epoch - 1]


def _saved_val_loss(data_dir: Path, model_dir: Path) -> float:
    """The validation loss of the weights actually saved in ``model_dir``, recomputed from disk."""
    from gguf_factory.train.loop import encode_splits, evaluate, load_splits

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _, val = encode_splits(tok, load_splits(data_dir), 96)
    return evaluate(model, val.examples, 16, tok.pad_token_id if tok.pad_token_id is not None else 0)[0]


def test_keep_last_saves_the_last_epoch_and_keep_best_the_best(data_dir, tmp_path):
    # a learning rate so high that the validation loss goes up again after epoch 2: best != last
    kw = dict(preset=TINY, epochs=5, lr=0.02, patience=10, progress=False, threads=1, monitor="loss")
    last = train(data_dir, tmp_path / "last", keep="last", **kw)
    best = train(data_dir, tmp_path / "best", keep="best", **kw)
    assert last.val_losses == best.val_losses  # same seed, same run
    assert last.kept_epoch == last.epochs_run == 5 and best.kept_epoch == best.best_epoch
    assert best.best_epoch != 5, best.val_losses  # the premise of this test
    assert _saved_val_loss(data_dir, tmp_path / "last") == pytest.approx(last.val_losses[-1], rel=1e-4)
    assert _saved_val_loss(data_dir, tmp_path / "best") == pytest.approx(min(best.val_losses), rel=1e-4)
    record = json.loads((tmp_path / "last" / "training.json").read_text())
    assert record["settings"]["keep"] == "last" and record["kept_epoch"] == 5


def test_nano_keeps_its_last_epoch_by_default():
    assert PRESETS["nano"].keep == "last" and PRESETS["nano"].patience >= 5


def test_unknown_monitor_is_refused(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="unknown monitor 'bleu'"):
        train(data_dir, tmp_path / "m", preset=TINY, epochs=1, progress=False, monitor="bleu")
    assert not (tmp_path / "m").exists()


def test_replaces_existing_output_and_cleans_up_on_failure(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train(data_dir, out, preset=TINY, max_steps=2, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()

    from gguf_factory.train import scratch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scratch, "run_loop", boom)
    with pytest.raises(KeyboardInterrupt):
        train(data_dir, tmp_path / "n", preset=TINY, progress=False)
    assert not (tmp_path / "n").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_settings(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="unknown model preset"):
        train(data_dir, tmp_path / "m", preset="huge")
    with pytest.raises(TrainingError, match="epochs"):
        train(data_dir, tmp_path / "m", preset=TINY, epochs=0)
    with pytest.raises(TrainingError, match="learning rate"):
        train(data_dir, tmp_path / "m", preset=TINY, lr=-1.0)
    with pytest.raises(InputError, match="does not exist"):
        train(data_dir, tmp_path / "no" / "m", preset=TINY)
    with pytest.raises(InputError):
        train(tmp_path / "nothing", tmp_path / "m", preset=TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        train(data_dir, tmp_path / "file", preset=TINY)


# ------------------------------------------------------------------------------------------------ finetune


def _gpt2_base(folder: Path) -> Path:
    bpe = _bpe(_texts(), [ENDOFTEXT])
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT
    )
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _llama_base(folder: Path, *, template: str | None) -> Path:
    bpe = _bpe(_texts(), ["<unk>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if template:
        tok.chat_template = template
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_finetune_gpt2_adds_chatml(data_dir, tmp_path):
    base = _gpt2_base(tmp_path / "gpt2")
    n_base = len(AutoTokenizer.from_pretrained(base))
    out = tmp_path / "ft"
    r = train(data_dir, out, base=base, epochs=3, lr=3e-3, batch_size=8, progress=False)
    assert r.train_losses[-1] < r.train_losses[0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt2"
    assert len(tok) == n_base + 2 == model.get_input_embeddings().weight.shape[0]
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    assert IM_START in tok.all_special_tokens and IM_END in tok.all_special_tokens
    assert tok.convert_ids_to_tokens(tok("<|im_start|>user")["input_ids"])[0] == IM_START
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert model.generation_config.eos_token_id in (im_end, [im_end, 0])
    msgs = [{"role": "user", "content": "What colour is the sky?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.generate(**enc, max_new_tokens=4, do_sample=False)
    record = json.loads((out / "training.json").read_text())
    assert record["kind"] == "finetune" and record["chat"]["chat_template"] == "chatml"


def test_finetune_llama_keeps_its_template(data_dir, tmp_path):
    template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
    )
    base = _llama_base(tmp_path / "llama", template=template)
    out = tmp_path / "ft"
    r = train(data_dir, out, base=base, epochs=2, lr=3e-3, progress=False, max_seq_len=64)
    assert r.epochs_run == 2 and len(r.val_losses) == 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == template and tok.eos_token == "</s>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert json.loads((out / "training.json").read_text())["settings"]["max_seq_len"] == 64


def test_finetune_llama_without_template_gets_chatml(data_dir, tmp_path):
    base = _llama_base(tmp_path / "llama", template=None)
    out = tmp_path / "ft"
    train(data_dir, out, base=base, max_steps=3, lr=1e-3, progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == IM_END
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    AutoModelForCausalLM.from_pretrained(out)


def test_bad_base_folder(data_dir, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        train(data_dir, tmp_path / "m", base=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="config.json") as e:
        train(data_dir, tmp_path / "m", base=empty)
    assert str(empty) in str(e.value)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="no weights"):
        train(data_dir, tmp_path / "m", base=noweights)
    notcausal = tmp_path / "notcausal"
    notcausal.mkdir()
    (notcausal / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    (notcausal / "model.safetensors").write_bytes(b"")
    (notcausal / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="notcausal"):
        train(data_dir, tmp_path / "m", base=notcausal)
    assert not (tmp_path / "m").exists()
