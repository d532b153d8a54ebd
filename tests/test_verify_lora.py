"""verify, convert --verify, convert-lora and bad converter inputs, through the real llama.cpp (no mocks).

Models are the tiny random-weight fixtures of test_convert.py (Llama) and test_convert_archs.py (other
architectures), and the session's tiny trained chat Llama (conftest). LoRA adapters are real PEFT adapters
with random non-zero B (``init_lora_weights=False``), so they change the outputs; the GGUF adapter, applied
by llama.cpp at load time on the base F32 GGUF, must give the same greedy tokens as transformers running the
adapter merged with ``merge_and_unload``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.convert import convert
from gguf_factory.convert.lora import convert_lora
from gguf_factory.errors import ConversionError, InputError, ModelError
from gguf_factory.verify import VerifyReport, gguf_main_type, multilingual_texts, verify
from test_convert import CORPUS, make_model
from test_convert_archs import BUILDERS

N_NEW = 12
PROMPTS = ["The quick brown fox", "Hello there! How are you today?", "I don't know, maybe 42"]


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


# ---------------------------------------------------------------------------------------------------
# Models: a tiny Llama (test_convert's builder) and the other architectures (test_convert_archs')
# ---------------------------------------------------------------------------------------------------


def build_llama(out: Path) -> None:
    from gguf_factory.train.tokenizer import save_hf_tokenizer, train_bpe_tokenizer

    tok_dir = out.parent / "tokenizer"
    tok_dir.mkdir()
    tok = train_bpe_tokenizer(CORPUS * 10, vocab_size=400, min_frequency=2)
    save_hf_tokenizer(tok, tok_dir, model_max_length=256)
    make_model(out, tok_dir)


ALL_BUILDERS: dict[str, Callable[[Path], None]] = {"llama": build_llama, **BUILDERS}
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: PEFT sets fan_in_fan_out
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused tensors
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# PEFT scaling variants llama.cpp's single alpha cannot express: folded into B by convert_lora.
LORA_EXTRA: dict[str, dict[str, Any]] = {
    "qwen2": {"use_rslora": True},
    "gpt2": {"rank_pattern": {"c_fc": 2}, "alpha_pattern": {"c_attn": 3}},
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """The machine is small and shared: one torch thread avoids thread-pool contention stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            hf_dir = root / f"tiny-{arch}"
            hf_dir.mkdir()
            ALL_BUILDERS[arch](hf_dir)
            convert(hf_dir, root / "base-F32.gguf", outtype="f32")
            cache[arch] = hf_dir
        return cache[arch]

    return get


def base_gguf(hf_dir: Path) -> Path:
    return hf_dir.parent / "base-F32.gguf"


def make_adapter(hf_dir: Path, arch: str, out: Path, *, seed: int = 5) -> Any:
    """Save a PEFT LoRA adapter with random non-zero A and B; return the merged transformers model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS[arch],
        init_lora_weights=False,
        **LORA_EXTRA.get(arch, {}),
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def prompt_ids(hf_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    return [list(tok(p)["input_ids"]) for p in PROMPTS]


def hf_greedy(model: Any, ids: list[int], n: int = N_NEW) -> list[int]:
    import torch

    x = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def llama_greedy(model_path: Path, ids_list: list[list[int]], lora: Path | None = None) -> list[list[int]]:
    import llama_cpp

    extra = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=128,
        n_batch=128,
        logits_all=True,
        n_threads=1,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        **extra,
    )
    outs = []
    try:
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            out: list[int] = []
            for _ in range(N_NEW):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(nxt)
                llm.eval([nxt])
            outs.append(out)
    finally:
        llm.close()
    return outs


# ---------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------


def test_multilingual_sample_is_bounded_and_non_english() -> None:
    texts = multilingual_texts(per_language=3)
    assert "english" not in texts
    assert len(texts) >= 20  # the chatterbot-corpus package ships 27 non-English languages
    assert all(1 <= len(v) <= 3 for v in texts.values())
    assert any(any("\u0400" <= ch <= "\u04ff" for ch in t) for t in texts["russian"])
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts["chinese"])


@pytest.mark.slow
def test_verify_f32_and_f16_pass(
    tiny_f32_gguf: Path, tiny_f16_gguf: Path, tiny_hf_model: Path, tiny_data_dir: Path
) -> None:
    r = verify(tiny_f32_gguf, tiny_hf_model, data=tiny_data_dir, max_prompts=4, max_new_tokens=8)
    assert isinstance(r, VerifyReport)
    assert r.gguf_type == "F32" and r.min_top1 == 0.999 and r.greedy_required
    assert r.corpus["held-out data"] > 10 and sum(k.startswith("chatterbot:") for k in r.corpus) >= 20
    assert r.tokenizer.mismatches == [] and r.tokenizer.n_checks >= 2 * r.tokenizer.n_texts  # + chat template
    assert r.greedy.ok and r.greedy.n_prompts >= 8  # held-out chat prompts + built-in text prompts
    assert r.logits.top1_agreement >= 0.999 and r.logits.max_abs_logprob_diff < 1e-2
    assert r.ok and r.exit_code == 0

    r16 = verify(tiny_f16_gguf, tiny_hf_model, data=tiny_data_dir / "test.jsonl", max_prompts=4)
    assert r16.gguf_type == "F16" and r16.min_top1 == 0.99 and not r16.greedy_required
    assert r16.tokenizer.ok and r16.logits.top1_agreement >= 0.99 and r16.ok
    assert r16.logits.max_abs_logprob_diff > r.logits.max_abs_logprob_diff  # F16 rounding shows


@pytest.mark.slow
def test_verify_cli_json_pass_and_fail(models: Callable[[str], Path], tmp_path: Path) -> None:
    hf_dir = models("llama")
    gguf_path = base_gguf(hf_dir)
    proc = run_cli("verify", gguf_path, "--against", hf_dir, "--json", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["gguf_type"] == "F32"
    assert [c["status"] for c in report["checks"]] == ["pass", "pass", "pass", "info"]

    # the same tokenizer, other weights: tokenizer passes, greedy and logits fail -> exit 1 with a table
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    make_model(other, hf_dir.parent / "tokenizer", seed=99)
    proc = run_cli("verify", gguf_path, "--against", other, "--max-new-tokens", "6")
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout and "greedy parity" in proc.stdout and "top-1 agreement" in proc.stdout


@pytest.mark.slow
def test_verify_unusable_inputs_exit_2(models: Callable[[str], Path], tmp_path: Path) -> None:
    hf_dir = models("llama")
    assert_one_line_error(run_cli("verify", tmp_path / "nope.gguf", "--against", hf_dir), "nope.gguf")
    assert_one_line_error(run_cli("verify", base_gguf(hf_dir), "--against", tmp_path), "config.json")
    adapter = tmp_path / "adapter"
    make_adapter(hf_dir, "llama", adapter)
    lora = tmp_path / "lora.gguf"
    convert_lora(adapter, lora, base=hf_dir)
    with pytest.raises(ModelError, match="GGUF 'adapter', not a model"):
        gguf_main_type(lora)


@pytest.mark.slow
def test_convert_verify_flag(
    models: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from gguf_factory import cli
    from gguf_factory.convert.archs.llama import LlamaConverter

    hf_dir = models("llama")

    def run(out: Path) -> int:
        monkeypatch.setattr(sys, "argv", ["gguf-factory", "convert", str(hf_dir), "-o", str(out), "--verify"])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return int(exc.value.code or 0)

    good = tmp_path / "good-F16.gguf"
    assert run(good) == 0 and good.is_file()
    assert "PASS" in capsys.readouterr().out

    # a converter bug (LLaMA's Q/K rotary permutation skipped): the file is written, verify catches it
    monkeypatch.setattr(LlamaConverter, "modify_tensor", lambda self, g, h, data: data)
    bad = tmp_path / "bad-F16.gguf"
    assert run(bad) == 1
    captured = capsys.readouterr()
    assert bad.is_file() and "FAIL" in captured.out and "verify failed; the file is kept" in captured.err


# ---------------------------------------------------------------------------------------------------
# convert-lora
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(LORA_TARGETS))
def test_lora_matches_merged_model(models: Callable[[str], Path], tmp_path: Path, arch: str) -> None:
    hf_dir = models(arch)
    merged = make_adapter(hf_dir, arch, tmp_path / "adapter")
    lora = tmp_path / "adapter-F32.gguf"
    r = convert_lora(tmp_path / "adapter", lora, base=hf_dir, outtype="f32")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        assert r.n_pairs == sum(".lora_A." in k for k in f.keys()) >= 2 * len(LORA_TARGETS[arch])  # noqa: SIM118

    all_ids = prompt_ids(hf_dir)
    expected = [hf_greedy(merged, ids) for ids in all_ids]
    base_out = llama_greedy(base_gguf(hf_dir), all_ids)
    lora_out = llama_greedy(base_gguf(hf_dir), all_ids, lora=lora)
    assert base_out != expected  # the adapter changes the model...
    assert lora_out == expected  # ...exactly as merging it in transformers does


@pytest.mark.slow
def test_lora_gguf_format_and_cli(models: Callable[[str], Path], tmp_path: Path) -> None:
    hf_dir = models("llama")
    make_adapter(hf_dir, "llama", tmp_path / "adapter")
    out = tmp_path / "tiny-chat-lora-F16.gguf"
    proc = run_cli("convert-lora", tmp_path / "adapter", "--base", hf_dir, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA for llama, 14 weights, rank 4, alpha 8" in proc.stdout

    reader = gguf.GGUFReader(out)
    fields = {n: f.contents() for n, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F16
    assert tuple(a.shape) == (64, 4) and tuple(b.shape) == (4, 64)  # ggml order: A [in, r], B [r, out]
    assert len(tensors) == 2 * 14

    # the F16 adapter loads in llama.cpp and changes the output
    ids = prompt_ids(hf_dir)
    assert llama_greedy(base_gguf(hf_dir), ids, lora=out) != llama_greedy(base_gguf(hf_dir), ids)


@pytest.mark.slow
def test_lora_refusals(models: Callable[[str], Path], tmp_path: Path) -> None:
    llama_dir = models("llama")
    adapter = tmp_path / "adapter"
    make_adapter(llama_dir, "llama", adapter)
    out = tmp_path / "out.gguf"

    def edited(name: str, **changes: Any) -> Path:
        d = tmp_path / name
        shutil.copytree(adapter, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(ConversionError, match="adapter_config.json: DoRA"):
        convert_lora(edited("dora", use_dora=True), out, base=llama_dir)
    with pytest.raises(ConversionError, match="modules_to_save"):
        convert_lora(edited("mts", modules_to_save=["lm_head"]), out, base=llama_dir)
    with pytest.raises(ConversionError, match="peft_type 'IA3'"):
        convert_lora(edited("ia3", peft_type="IA3"), out, base=llama_dir)
    with pytest.raises(ModelError, match="adapter_config.json is missing"):
        convert_lora(tmp_path, out, base=llama_dir)
    with pytest.raises(InputError, match="outtype"):
        convert_lora(adapter, out, base=llama_dir, outtype="bf16")

    # adapters made for another base model: other module names, or other shapes
    gpt2_adapter = tmp_path / "gpt2-adapter"
    make_adapter(models("gpt2"), "gpt2", gpt2_adapter)
    with pytest.raises(ConversionError, match="adapts transformer.h.0.attn.c_attn, which the base model"):
        convert_lora(gpt2_adapter, out, base=llama_dir)
    from safetensors.numpy import load_file, save_file

    d = edited("narrow")
    state = load_file(str(d / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    state[key] = state[key][:, :32].copy()
    save_file(state, str(d / "adapter_model.safetensors"))
    with pytest.raises(ConversionError, match=r"up_proj.weight is 128x32.*\[128, 64\].*another base model"):
        convert_lora(d, out, base=llama_dir)

    # DoRA weights (a magnitude vector) in the file itself
    d = edited("dora-tensors")
    state = load_file(str(d / "adapter_model.safetensors"))
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(64, np.float32)
    save_file(state, str(d / "adapter_model.safetensors"))
    with pytest.raises(ConversionError, match="DoRA magnitude"):
        convert_lora(d, out, base=llama_dir)

    proc = run_cli("convert-lora", edited("dora-cli", use_dora=True), "--base", llama_dir, "-o", out)
    assert_one_line_error(proc, "DoRA")
    assert nothing_written(out)


# ---------------------------------------------------------------------------------------------------
# Bad converter inputs through the CLI: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this would run a shell command: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_bad_inputs_cli(models: Callable[[str], Path], tmp_path: Path) -> None:
    import torch

    hf_dir = models("llama")
    out = tmp_path / "out.gguf"

    def copy(name: str) -> Path:
        return Path(shutil.copytree(hf_dir, tmp_path / name))

    def edit_config(d: Path, **changes: Any) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    cases: list[tuple[Path, tuple[str, ...]]] = []

    d = copy("unknown-arch")
    edit_config(d, architectures=["MambaForCausalLM"])
    cases.append((d, ("unsupported architecture MambaForCausalLM", "config.json")))

    d = copy("no-tokenizer")
    for f in d.glob("tokenizer*"):
        f.unlink()
    cases.append((d, ("tokenizer",)))

    d = copy("wide-config")
    edit_config(d, hidden_size=128)
    cases.append((d, ("hidden_size = 128", "model.embed_tokens.weight", "does not match the weights")))

    d = copy("deep-config")
    edit_config(d, num_hidden_layers=3)
    cases.append((d, ("num_hidden_layers = 3", "no tensors for layer(s) [2]")))

    d = copy("kv-config")
    edit_config(d, num_key_value_heads=4)
    cases.append((d, ("num_key_value_heads / head_dim = 64", "k_proj")))

    d = copy("truncated")
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    cases.append((d, ("model.safetensors is truncated",)))

    d = copy("pickle")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, d / "pytorch_model.bin")
    cases.append((d, ("pytorch_model.bin", "weights_only=True", "posix.system", "safetensors")))

    for model_dir, needles in cases:
        proc = run_cli("convert", model_dir, "-o", out)
        assert_one_line_error(proc, *needles)
        assert nothing_written(out), model_dir.name
    assert not marker.exists()  # the pickle's code never ran
