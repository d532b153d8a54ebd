"""`merge`: base + weighted LoRA adapters (trained here with `train --lora` on the session's tiny chat Llama)
-> a merged HF checkpoint (and GGUF), checked against PEFT running the adapters unmerged; and bad inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError, ModelError
from gguf_factory.merge import AdapterSpec, merge, parse_adapter_spec
from gguf_factory.train import LoraSettings
from test_lora_train import train_adapter, write_sums_dataset


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapters(
    tiny_hf_model: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Two domain adapters of different ranks and targets: arithmetic (r=4, all projections) and the
    chatterbot categories (r=8, attention only)."""
    root = tmp_path_factory.mktemp("adapters")
    sums = write_sums_dataset(root)
    a = train_adapter(sums, root / "sums", tiny_hf_model, lora=LoraSettings(rank=4, alpha=8)).model_dir
    b = train_adapter(
        tiny_data_dir, root / "chat", tiny_hf_model, epochs=2,
        lora=LoraSettings(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    ).model_dir  # fmt: skip
    return [a, b]


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 33]])


def logits_of(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits[0]


def load_hf(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_unmerged(base: Path, adapters: list[Path], weights: list[float]) -> Any:
    """PEFT running the adapters side by side, each scaled by its weight, nothing merged: the reference."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(load_hf(base), adapters[0], adapter_name=names[0])
    for path, name in zip(adapters[1:], names[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name, w in zip(names, weights, strict=True):
                m.set_scale(name, w)
    return model.eval()


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_two_weighted_adapters_equal_peft_combination(
    adapters: list[Path], tiny_hf_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mix"
    r = merge(tiny_hf_model, [f"{adapters[0]}:0.7", AdapterSpec(adapters[1], -0.5)], out)
    assert r.combination == "cat" and r.rank == 12 and r.gguf is None
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge.json"} <= names
    assert not any(n.startswith("adapter") for n in names)
    report = json.loads((out / "merge.json").read_text())
    assert [a["weight"] for a in report["adapters"]] == [0.7, -0.5]

    merged = logits_of(load_hf(out))
    want = logits_of(peft_unmerged(tiny_hf_model, adapters, [0.7, -0.5]))
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)
    # the check can fail: the combination differs from the base and from either adapter alone
    base = logits_of(load_hf(tiny_hf_model))
    only_a = logits_of(peft_unmerged(tiny_hf_model, adapters[:1], [0.7]))
    assert (merged - base).abs().max() > 0.05 and (merged - only_a).abs().max() > 0.01


def test_single_adapter_merge_and_weight_scaling(
    adapters: list[Path], tiny_hf_model: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    one = merge(tiny_hf_model, [adapters[0]], tmp_path / "one")
    half = merge(tiny_hf_model, [f"{adapters[0]}:0.5"], tmp_path / "half")
    assert (one.combination, half.combination) == ("merge_and_unload", "scaled")
    torch.testing.assert_close(
        logits_of(load_hf(one.out_dir)), logits_of(peft_unmerged(tiny_hf_model, adapters[:1], [1.0])),
        atol=1e-4, rtol=0,
    )  # fmt: skip
    w0 = load_file(tiny_hf_model / "model.safetensors")
    w1 = load_file(one.out_dir / "model.safetensors")
    wh = load_file(half.out_dir / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    assert (w1[key] - w0[key]).abs().max() > 1e-3
    torch.testing.assert_close(wh[key] - w0[key], 0.5 * (w1[key] - w0[key]), atol=1e-6, rtol=1e-4)
    for k in w0:  # nothing but the adapted projections moved
        if not k.endswith("_proj.weight"):
            torch.testing.assert_close(w1[k], w0[k], atol=0, rtol=0)


@pytest.mark.slow
def test_cli_merge_with_gguf(adapters: list[Path], tiny_hf_model: Path, tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "cli-mix"
    proc = run_cli("merge", tiny_hf_model, "--adapter", f"{adapters[0]}:0.7", "--adapter", adapters[1],
                   "-o", out, "--gguf", "--outtype", "f32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path = out / "cli-mix-F32.gguf"
    reader = gguf.GGUFReader(path)
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    assert json.loads((out / "merge.json").read_text())["gguf"] == path.name

    # bad inputs from the command line: one line, exit 2, nothing written
    bad = tmp_path / "cli-bad"
    assert_one_line_error(run_cli("merge", tiny_hf_model, "-a", f"{adapters[0]}:heavy", "-o", bad), "'heavy'")
    assert_one_line_error(run_cli("merge", tiny_hf_model, "-a", adapters[0], "-o", out), "already exists")
    assert nothing_written(bad)


# --------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def foreign_adapter(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT adapter for another tiny Llama (hidden size 96, same tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("foreign")
    other = root / "other-base"
    cfg = AutoConfig.from_pretrained(tiny_hf_model)
    cfg.hidden_size, cfg.intermediate_size = 96, 192
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_hf_model).save_pretrained(other)
    model = AutoModelForCausalLM.from_pretrained(other)
    model.name_or_path = str(other)
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(root / "other-lora")
    return root / "other-lora"


def test_adapter_for_another_base_is_refused(
    foreign_adapter: Path, tiny_hf_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # its recorded base exists: the configs are compared
    with pytest.raises(ModelError, match=r"other-lora.*hidden_size is 96 there and 64 here"):
        merge(tiny_hf_model, [foreign_adapter], out)
    assert nothing_written(out)
    # the recorded base moved away: the tensor shapes still tell
    moved = tmp_path / "moved-lora"
    shutil.copytree(foreign_adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"moved-lora does not fit .*q_proj takes 64 inputs .* 96 -> "):
        merge(tiny_hf_model, [moved], out)
    assert nothing_written(out)


def test_bad_adapter_inputs(adapters: list[Path], tiny_hf_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match="adapter folder not found: .*nowhere"):
        merge(tiny_hf_model, [tmp_path / "nowhere"], out)
    with pytest.raises(InputError, match="'x1.5' is not a number"):
        merge(tiny_hf_model, [f"{adapters[0]}:x1.5"], out)
    with pytest.raises(InputError, match="finite"):
        parse_adapter_spec(f"{adapters[0]}:nan")
    with pytest.raises(InputError, match="at least one"):
        merge(tiny_hf_model, [], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="adapter_config.json is missing"):
        merge(tiny_hf_model, [empty], out)
    assert nothing_written(out)
    assert parse_adapter_spec(f"{adapters[0]}:-2") == AdapterSpec(adapters[0], -2.0)
    assert parse_adapter_spec(str(adapters[0])) == AdapterSpec(adapters[0], 1.0)


def test_existing_output_is_left_alone(adapters: list[Path], tiny_hf_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        merge(tiny_hf_model, [adapters[0]], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".taken*"))
    r = merge(tiny_hf_model, [adapters[0]], out, overwrite=True)
    assert (r.out_dir / "model.safetensors").is_file() and not (out / "keep.txt").exists()
