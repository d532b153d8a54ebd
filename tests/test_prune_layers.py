"""`prune --layers`: whole decoder layers go, those whose removal alone raises the loss on the user's data
least; the first and last stay, the rest are renumbered, and the result is exactly the original without
those layers, in transformers and in llama.cpp."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import run_cli
from gguf_factory.data import load_split
from gguf_factory.errors import InputError
from gguf_factory.prune import (
    encode_texts,
    layer_keep_count,
    layer_removal_loss,
    layers_to_keep,
    load_model,
    make_batches,
    measure_importance,
    prune,
    prune_model,
)


@pytest.fixture(scope="module")
def five_layers(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama of five layers trained by `train` on the tiny dataset (the shared one has two, and the
    first and last layers always stay)."""
    from gguf_factory.train import train
    from gguf_factory.train.scratch import ModelPreset

    preset = ModelPreset(
        name="test-five-layers", hidden_size=64, intermediate_size=128, num_layers=5, num_heads=4,
        num_kv_heads=2, vocab_size=512, max_seq_len=128, epochs=4, lr=3e-3, batch_size=16,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("five") / "model-hf"
    train(tiny_data_dir, out, preset=preset, progress=False, seed=7)
    return out


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _kl(ref, model, batches) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].bool()
            lp = F.log_softmax(ref(**b).logits[m].double(), -1)
            lq = F.log_softmax(model(**b).logits[m].double(), -1)
            total += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
            n += int(m.sum())
    return total / n


def test_counts_and_choice() -> None:
    assert layer_keep_count(30, 0.0) == 30
    assert layer_keep_count(30, 0.2) == 24
    assert layer_keep_count(5, 0.4) == 3
    with pytest.raises(InputError, match="less than one"):
        layer_keep_count(5, 0.05)
    with pytest.raises(InputError, match="first and the last always"):
        layer_keep_count(5, 0.8)
    with pytest.raises(InputError, match="layers"):
        layer_keep_count(5, 1.0)
    # the first and last stay whatever their scores; then the highest block influence
    assert layers_to_keep([0.0, 0.5, 0.1, 0.9, 0.0], 3) == [0, 3, 4]
    assert layers_to_keep([0.0, 0.5, 0.1, 0.9, 0.0], 4) == [0, 1, 3, 4]
    assert layers_to_keep([0.3, 0.2, 0.1], 3) == [0, 1, 2]


def test_dropped_layers_are_gone_exactly(five_layers: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    r = prune(five_layers, tiny_data_dir, tmp_path / "short", ffn=0.0, layers=0.4, samples=64, threads=1)
    assert (r.layers_before, r.layers_after) == (5, 3)
    report = json.loads((r.output_dir / "prune_report.json").read_text())
    kept = [row["layer"] for row in report["layers"] if row["kept"]]
    cost = [row["removal_loss"] for row in report["layers"]]
    assert cost[0] is None and cost[-1] is None  # always kept: not scored
    middle = max(range(1, 4), key=lambda i: cost[i])
    assert kept == [0, middle, 4], (kept, cost)
    assert all(row["block_influence"] > 0 for row in report["layers"])
    cfg = json.loads((r.output_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["intermediate_size"] == 128
    assert report["num_hidden_layers"] == {"before": 5, "after": 3} and report["layers_fraction"] == 0.4

    # the original with the same layers taken out of its ModuleList computes the same logits
    ref = _hf(five_layers)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in kept])
    for new, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = new
    ref.config.num_hidden_layers = 3
    ids = torch.tensor([[1, 5, 9, 30, 2, 44, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(_hf(r.output_dir)(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert r.params_after < r.params_before
    assert r.heldout is not None and r.heldout["kld_mean"] > 0


def test_removal_loss_beats_the_reverse_and_block_influence(five_layers: Path, tiny_data_dir: Path) -> None:
    """On held-out conversations, keeping the layers whose removal costs most loses less (KL to the
    original) than keeping those whose removal costs least. Block influence (1 - cos of a layer's input
    and output, ShortGPT's score) is measured too: on this model it picks worse, which is why the loss
    rise is the criterion."""
    torch.set_num_threads(1)
    model, tok = load_model(five_layers)
    calib = make_batches(
        encode_texts(tok, load_split(tiny_data_dir / "train.jsonl"), max_tokens=20_000, max_seq_len=128)
    )
    held = make_batches(
        encode_texts(tok, load_split(tiny_data_dir / "test.jsonl"), max_tokens=20_000, max_seq_len=128)
    )
    cost = layer_removal_loss(model, calib)
    assert cost[0] == cost[-1] == math.inf and all(math.isfinite(c) for c in cost[1:-1])
    kl = lambda keep: _kl(model, prune_model(model, None, None, keep), held)  # noqa: E731
    by_cost = kl(layers_to_keep(cost, 3))
    reverse = kl(layers_to_keep([-c if math.isfinite(c) else c for c in cost], 3))
    by_influence = kl(layers_to_keep(measure_importance(model, calib).blocks, 3))
    assert 0 < by_cost < reverse, (by_cost, reverse, cost)
    assert by_cost <= by_influence, (by_cost, by_influence)


@pytest.mark.slow
def test_cli_and_llama_cpp(five_layers: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    from gguf_factory.doctor import validate
    from gguf_factory.verify import verify

    out = tmp_path / "cli-short"
    proc = run_cli(
        "prune", five_layers, "--data", tiny_data_dir, "-o", out, "--ffn", "0", "--layers", "0.4",
        "--gguf", "--threads", "1", "--samples", "32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "layers" in proc.stdout and "GGUF size" in proc.stdout, proc.stdout
    gguf = tmp_path / "cli-short-F16.gguf"
    assert validate(gguf, smoke=False).exit_code == 0
    report = verify(gguf, out, data=tiny_data_dir, max_texts=20, max_prompts=3, n_threads=1)
    assert report.ok, report  # llama.cpp runs the 3-layer model as transformers does
