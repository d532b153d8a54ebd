"""`train --lora`: real PEFT LoRA runs on the session's tiny chat Llama (conftest), measured, and the
adapter through llama.cpp (convert-lora, then Llama(lora_path=...)) against the merged model's GGUF.

The LoRA "domain" is a small arithmetic chat set (prepared with `prepare` from a JSONL file): its answers
follow a pattern the held-out split shares, so a few epochs must lower the validation loss measurably.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import TrainingError
from gguf_factory.train import LoraSettings, TrainResult, train

LLAMA_PROJ = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
N_NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_sums_dataset(folder: Path) -> Path:
    """A `prepare`d dataset of "What is a plus b?" chats (one domain, 60 conversations)."""
    from gguf_factory.data import prepare

    rows = [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
        for a in range(1, 10) for b in range(1, 10)
    ]  # fmt: skip
    random.Random(0).shuffle(rows)
    src = folder / "sums.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    prepare([src], folder / "sums", val_fraction=0.2, test_fraction=0.1, seed=3)
    return folder / "sums"


@pytest.fixture(scope="module")
def sums_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sums_dataset(tmp_path_factory.mktemp("lora-data"))


def train_adapter(data: Path, out: Path, base: Path, **kw: Any) -> TrainResult:
    opts: dict[str, Any] = dict(epochs=3, lr=2e-2, batch_size=4, threads=1, progress=False, monitor="loss")
    opts.update(kw)
    return train(data, out, base=base, **opts)


@pytest.fixture(scope="module")
def lora_run(sums_dir: Path, tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("lora") / "sums-lora"
    return train_adapter(sums_dir, out, tiny_hf_model, lora=LoraSettings(rank=4, alpha=8))


def val_loss(model: Any, tokenizer: Any, data: Path) -> float:
    """The validation loss the training loop reports, measured here on a given (possibly PEFT) model."""
    from gguf_factory.train.loop import encode_splits, evaluate, load_splits

    _, va = encode_splits(tokenizer, load_splits(data), 512)
    loss, _ = evaluate(model, va.examples, 8, tokenizer.pad_token_id)
    return loss


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------- training


def test_lora_adapter_loads_changes_logits_and_lowers_val_loss(
    lora_run: TrainResult, tiny_hf_model: Path, sums_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lora_run.model_dir
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training.json"} <= names
    assert not list(out.parent.glob(f".{out.name}*")), "a temp folder was left behind"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == LLAMA_PROJ  # default: every attention and MLP projection
    assert Path(cfg["base_model_name_or_path"]) == tiny_hf_model.resolve()
    record = json.loads((out / "training.json").read_text())
    assert record["kind"] == "lora" and record["lora"]["rank"] == 4 and record["epochs_run"] == 3
    # only the LoRA pairs train: 2 layers x 7 projections x r*(in+out)
    assert 0 < lora_run.n_params == record["n_params"] < record["base_n_params"] / 10

    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_model, dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(tok, "What is 3 plus 4?")])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    base_loss = val_loss(base, tok, sums_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
    lora_loss = val_loss(model, tok, sums_dir)

    assert (lora_logits - base_logits).abs().max() > 0.1
    assert lora_loss == pytest.approx(lora_run.best_val_loss, abs=1e-4)
    assert base_loss == pytest.approx(record["base_val_loss"], abs=1e-4)
    assert lora_loss < base_loss - 0.3, (base_loss, lora_loss)


def test_lora_targets_rank_and_dispatch(sums_dir: Path, tiny_hf_model: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    r = train_adapter(
        sums_dir, tmp_path / "qv", tiny_hf_model, epochs=1, max_steps=2,
        lora=LoraSettings(rank=2, alpha=4, targets=("q_proj", "v_proj"), dropout=0.0),
    )  # fmt: skip
    with safe_open(str(r.model_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert keys and all(".q_proj." in k or ".v_proj." in k for k in keys)
    assert {s[0] for k, s in shapes.items() if "lora_A" in k} == {2}
    assert r.steps == 2
    r2 = train_adapter(sums_dir, tmp_path / "default", tiny_hf_model, epochs=1, max_steps=1, lora=True)
    cfg = json.loads((r2.model_dir / "adapter_config.json").read_text())
    assert cfg["r"] == LoraSettings().rank and cfg["lora_alpha"] == LoraSettings().alpha


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (LoraSettings(rank=0), "--lora-rank"),
        (LoraSettings(rank=2.5), "--lora-rank"),  # type: ignore[arg-type]
        (LoraSettings(alpha=-1), "--lora-alpha"),
        (LoraSettings(alpha=float("nan")), "--lora-alpha"),
        (LoraSettings(dropout=1.0), "--lora-dropout"),
        (LoraSettings(targets=()), "--lora-targets"),
        (LoraSettings(targets=("nope_proj",)), "'nope_proj' matches no module"),
        (LoraSettings(targets=("embed_tokens",)), "'embed_tokens' is not a linear layer"),
    ],
)
def test_bad_lora_settings(
    settings: LoraSettings, needle: str, sums_dir: Path, tiny_hf_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bad"
    with pytest.raises(TrainingError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        train_adapter(sums_dir, out, tiny_hf_model, lora=settings)
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_lora_needs_a_base(sums_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="--base"):
        train(sums_dir, tmp_path / "x", lora=True, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_train_lora_and_its_errors(sums_dir: Path, tiny_hf_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-lora"
    common = ["train", sums_dir, "-o", out, "--base", tiny_hf_model, "--epochs", "1", "--threads", "1"]
    lora = ["--lora", "--lora-rank", "3", "--lora-alpha", "6", "--lora-targets", "q_proj, o_proj"]
    proc = run_cli(*common, *lora, "--lora-dropout", "0")
    assert proc.returncode == 0, proc.stderr
    assert "LoRA adapter" in proc.stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (3, 6, 0)
    assert sorted(cfg["target_modules"]) == ["o_proj", "q_proj"]

    bad = tmp_path / "cli-bad"
    assert_one_line_error(run_cli(*common[:3], bad, *common[4:], "--lora", "--lora-rank", "0"), "--lora-rank")
    assert_one_line_error(run_cli(*common[:3], bad, *common[4:], "--lora-rank", "4"), "--lora")
    assert not bad.exists()


# --------------------------------------------------------------------------------------------- llama.cpp


def llama_greedy(model_path: Path, ids_list: list[list[int]], lora: Path | None = None) -> tuple[list, list]:
    """Greedy continuations and the prompts' last-position logits, computed by llama.cpp."""
    import llama_cpp

    extra = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=128, n_batch=128, logits_all=True, n_threads=1, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **extra,
    )  # fmt: skip
    outs, logits = [], []
    try:
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[llm.n_tokens - 1]))
            out: list[int] = []
            for _ in range(N_NEW):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(nxt)
                llm.eval([nxt])
            outs.append(out)
    finally:
        llm.close()
    return outs, logits


@pytest.mark.slow
def test_gguf_lora_in_llama_cpp_matches_the_merged_gguf(
    lora_run: TrainResult, tiny_hf_model: Path, tiny_f32_gguf: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from gguf_factory.merge import merge

    adapter = lora_run.model_dir
    lora_gguf = tmp_path / "sums-lora-F32.gguf"
    proc = run_cli("convert-lora", adapter, "--base", tiny_hf_model, "-o", lora_gguf, "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr
    merged = merge(tiny_hf_model, [adapter], tmp_path / "merged", gguf=True, outtype="f32")
    assert merged.gguf is not None and merged.gguf.is_file() and merged.combination == "merge_and_unload"

    tok = AutoTokenizer.from_pretrained(adapter)
    prompts = [chat_ids(tok, q) for q in ("What is 3 plus 4?", "What is 8 plus 1?", "Hello, how are you?")]
    with_lora, lora_logits = llama_greedy(tiny_f32_gguf, prompts, lora=lora_gguf)
    from_merged, merged_logits = llama_greedy(merged.gguf, prompts)
    plain, base_logits = llama_greedy(tiny_f32_gguf, prompts)

    assert with_lora == from_merged
    for a, b, c in zip(lora_logits, merged_logits, base_logits, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)  # measured: ~2e-7
        assert np.abs(a - c).max() > 0.1  # the adapter is applied: not the base's logits
    assert with_lora != plain  # and it changes what the model says
