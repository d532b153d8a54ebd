"""The training engine (issue 15): Accelerate devices and precision, gradient accumulation and checkpointing,
packing, logits at target positions only, checkpoints with kill + resume, train.yaml, and 2 CPU processes
with DDP over gloo. Real tiny trainings, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import TrainingError
from gguf_factory.train import ModelPreset, train
from gguf_factory.train.loop import (
    IGNORE_INDEX,
    Example,
    check_packing,
    collate,
    target_logits,
    weights_digest,
)
from test_train import write_dataset

TINY = ModelPreset(
    name="tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
    vocab_size=400, max_seq_len=96, epochs=3, lr=3e-3, batch_size=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("engine") / "ds")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _record(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


def _examples(n: int, seed: int, vocab: int = 90) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = 6 + 3 * k
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]  # the "assistant" half
        out.append(Example(ids, labels))
    return out


def _tiny_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    )  # fmt: skip
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=0, eos_token_id=0))  # fmt: skip
    return [llama.eval(), gpt2.eval()]


# ------------------------------------------------------------------------------------ packing, logits


@pytest.mark.parametrize("model", _tiny_models(), ids=["llama", "gpt2"])
def test_packed_loss_equals_padded_loss(model):
    examples = _examples(4, seed=1)
    batch = list(range(4))
    padded, packed = collate(examples, batch, 0), collate(examples, batch, 0, pack=True)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))  # no padding
    assert padded["input_ids"].shape == (4, max(len(e.input_ids) for e in examples))
    assert torch.equal(padded["targets"], packed["targets"])
    with torch.no_grad():
        a, b = target_logits(model, padded), target_logits(model, packed)
        la = F.cross_entropy(a, padded["targets"], reduction="sum")
        lb = F.cross_entropy(b, packed["targets"], reduction="sum")
        # the same batch with the full logits and an explicit shift (what a plain causal-LM loss does)
        full = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        shifted = padded["labels"][:, 1:]
        lc = F.cross_entropy(full[:, :-1].reshape(-1, 100), shifted.reshape(-1), reduction="sum")
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lc, rtol=1e-5, atol=1e-5)
    assert check_packing(model, examples, 0) < 1e-4


def test_packing_without_position_ids_would_leak_attention():
    # the check behind --pack: one row with positions 0..n (no restart) lets conversation 2 see conversation 1
    model = _tiny_models()[0]
    examples = _examples(3, seed=2)
    packed = collate(examples, [0, 1, 2], 0, pack=True)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        good = F.cross_entropy(target_logits(model, packed), packed["targets"])
        bad = F.cross_entropy(target_logits(model, leaky), packed["targets"])
    assert abs(float(good - bad)) > 1e-3


def test_logits_only_at_targets_equal_the_full_rows():
    model = _tiny_models()[0]
    examples = _examples(3, seed=3)
    batch = collate(examples, [0, 1, 2], 0)
    with torch.no_grad():
        rows = target_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rows.shape == (int(batch["keep"].sum()), 100)
    torch.testing.assert_close(rows, full[batch["keep"]], rtol=1e-5, atol=1e-5)


class _IntOnlyKeepLlama(LlamaForCausalLM):
    """transformers 5.17's Llama head (seen on a GPU machine): ``logits_to_keep`` is an int or a 1-D index;
    a boolean (batch, seq) mask indexes the 3-D hidden states with too many indices (IndexError)."""

    def forward(self, input_ids=None, logits_to_keep=0, **kw):
        out = self.model(input_ids=input_ids, **kw)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return type("Out", (), {"logits": self.lm_head(out.last_hidden_state[:, keep, :])})()


def test_logits_at_targets_fall_back_where_a_mask_is_refused():
    ref = _tiny_models()[0]
    old = _IntOnlyKeepLlama(ref.config).eval()
    old.load_state_dict(ref.state_dict())
    batch = collate(_examples(3, seed=4), [0, 1, 2], 0)
    with torch.no_grad():
        rows = target_logits(old, batch)  # the mask raises; the full rows are taken instead
        want = target_logits(ref, batch)
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    from gguf_factory.train.loop import _TAKES_KEEP_MASK

    assert _TAKES_KEEP_MASK[_IntOnlyKeepLlama] is False and _TAKES_KEEP_MASK[LlamaForCausalLM] is True


# ------------------------------------------------------------------------------------ one loop, options


def test_grad_accum_takes_the_step_of_the_whole_batch(data_dir, tmp_path):
    # batch 4 x 2 accumulated and batch 8: the same conversations per step (group_by_length off, so the
    # batches are consecutive slices of one shuffle), the loss normalised over the step's target tokens
    kw = dict(preset=TINY, epochs=2, threads=1, progress=False, group_by_length=False)
    one = train(data_dir, tmp_path / "b8", batch_size=8, **kw)
    acc = train(data_dir, tmp_path / "b4x2", batch_size=4, grad_accum=2, **kw)
    assert one.steps == acc.steps == 12
    a, b = _weights(tmp_path / "b8"), _weights(tmp_path / "b4x2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    run = _record(tmp_path / "b4x2")["run"]
    assert run["grad_accum"] == 2 and run["effective_batch"] == 8 and run["world_size"] == 1


def test_pack_and_gradient_checkpointing_train_the_same_weights(data_dir, tmp_path):
    kw = dict(preset=TINY, epochs=1, threads=1, progress=False)
    base = train(data_dir, tmp_path / "plain", **kw)
    packed = train(data_dir, tmp_path / "packed", pack=True, **kw)
    ckpt = train(data_dir, tmp_path / "ckpt", gradient_checkpointing=True, **kw)
    w = _weights(tmp_path / "plain")
    for other in ("packed", "ckpt"):
        o = _weights(tmp_path / other)
        for k in w:
            torch.testing.assert_close(o[k], w[k], rtol=1e-4, atol=1e-5)
    assert packed.val_losses == pytest.approx(base.val_losses, rel=1e-4)
    assert ckpt.train_losses == pytest.approx(base.train_losses, rel=1e-5)
    rec = _record(tmp_path / "packed")
    assert rec["run"]["pack"] is True and rec["throughput"]["padding_fraction"] == 0.0
    assert _record(tmp_path / "plain")["throughput"]["padding_fraction"] > 0
    for r in (rec, _record(tmp_path / "plain")):
        assert r["throughput"]["tokens_per_second"] > 0 and r["epoch_log"][0]["eta_seconds"] == 0.0


def test_bf16_mixed_precision_on_cpu(data_dir, tmp_path):
    r = train(data_dir, tmp_path / "bf16", preset=TINY, epochs=2, threads=1, progress=False, precision="bf16")
    assert r.train_losses[-1] < r.train_losses[0]
    rec = _record(tmp_path / "bf16")
    assert rec["run"]["precision"] == "bf16" and rec["run"]["device"] == "cpu"
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "bf16").values())  # master weights


def test_device_and_precision_refusals(data_dir, tmp_path):
    if torch.cuda.is_available():  # this refusal is for machines without a GPU
        return
    with pytest.raises(TrainingError, match="no CUDA device"):
        train(data_dir, tmp_path / "m", preset=TINY, device="cuda")
    with pytest.raises(TrainingError, match="fp16 needs a GPU"):
        train(data_dir, tmp_path / "m", preset=TINY, precision="fp16", device="cpu")
    with pytest.raises(TrainingError, match="add --lora"):
        train(data_dir, tmp_path / "m", preset=TINY, load_in_4bit=True)
    with pytest.raises(TrainingError, match="unknown device"):
        train(data_dir, tmp_path / "m", preset=TINY, device="tpu")
    with pytest.raises(TrainingError, match="grad_accum"):
        train(data_dir, tmp_path / "m", preset=TINY, grad_accum=0)
    assert not (tmp_path / "m").exists()


def test_cli_qlora_without_cuda_is_one_line(data_dir, tiny_hf_model, tmp_path):
    if torch.cuda.is_available():
        return
    proc = run_cli(
        "train", data_dir, "-o", tmp_path / "a", "--base", tiny_hf_model, "--lora", "--load-in-4bit"
    )  # fmt: skip
    assert_one_line_error(proc, "--load-in-4bit needs a CUDA GPU")
    proc = run_cli("train", data_dir, "-o", tmp_path / "a", "--device", "cuda")
    assert_one_line_error(proc, "--device cuda")


# ------------------------------------------------------------------------------------ train.yaml


def test_config_file_takes_every_option_and_flags_win(data_dir, tmp_path):
    (tmp_path / "train.yaml").write_text(
        f"data: {data_dir}\noutput: out\nepochs: 1\nbatch_size: 4\nmax_steps: 3\nlr: 0.003\n"
        "grad_accum: 2\npack: true\nthreads: 1\nseed: 5\nkeep: last\n"
    )
    proc = run_cli("train", "-c", tmp_path / "train.yaml", "--seed", "6")
    assert proc.returncode == 0, proc.stderr
    rec = _record(tmp_path / "out")  # `output: out` is relative to the file's folder
    assert rec["steps"] == 3 and rec["settings"]["seed"] == 6 and rec["settings"]["threads"] == 1
    assert rec["run"]["grad_accum"] == 2 and rec["run"]["pack"] is True

    (tmp_path / "bad.yaml").write_text("data: x\ngrad_accum: 0\nbatchsize: 4\n")
    proc = run_cli("train", "-c", tmp_path / "bad.yaml")
    assert_one_line_error(proc, "bad.yaml", "grad_accum", "batchsize: unknown field")
    (tmp_path / "dev.yaml").write_text("data: x\nprecision: fp8\n")
    assert_one_line_error(run_cli("train", "-c", tmp_path / "dev.yaml"), "precision")


# ------------------------------------------------------------------------------------ checkpoints, resume

_RUNNER = """
import sys
from gguf_factory.train import ModelPreset, train
preset = ModelPreset(name="tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                     num_kv_heads=2, vocab_size=400, max_seq_len=96, epochs=3, lr=3e-3, batch_size=4)
train(sys.argv[1], sys.argv[2], preset=preset, epochs=5, threads=1, progress=False, save_every=3,
      keep_checkpoints=2, keep="best", resume=True if sys.argv[3] == "resume" else None)
"""


def _runner(tmp_path: Path, data: Path, out: str, mode: str) -> list[str]:
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    return [sys.executable, str(script), str(data), str(tmp_path / out), mode]


def test_killed_run_resumes_to_the_same_weights(data_dir, tmp_path):
    subprocess.run(_runner(tmp_path, data_dir, "whole", "fresh"), check=True, capture_output=True)
    whole = tmp_path / "whole"
    ckpts = sorted(p.name for p in (tmp_path / "whole.checkpoints").iterdir())
    assert ckpts == ["checkpoint-00000057", "checkpoint-00000060"]  # the last 2 of every 3rd step of 60

    # the same run, killed (SIGKILL: no clean-up) once its step-6 checkpoint is written
    proc = subprocess.Popen(_runner(tmp_path, data_dir, "cut", "fresh"), stderr=subprocess.DEVNULL)
    target = tmp_path / "cut.checkpoints" / "checkpoint-00000006"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut").exists()  # no half-written model
    killed_at = max(int(p.name.split("-")[1]) for p in (tmp_path / "cut.checkpoints").glob("checkpoint-*"))
    assert 6 <= killed_at < 60
    for p in (tmp_path / "cut.checkpoints").iterdir():  # tensors in safetensors, the rest JSON: no pickle
        if not p.name.startswith("."):
            assert {f.suffix for f in p.iterdir()} <= {".json", ".safetensors"}

    subprocess.run(_runner(tmp_path, data_dir, "cut", "resume"), check=True, capture_output=True)
    a, b = _weights(whole), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exactly, on a CPU
    ra, rb = _record(whole), _record(tmp_path / "cut")
    assert rb["resumed_from"].endswith(f"checkpoint-{killed_at:08d}")
    assert ra["train_losses"] == rb["train_losses"] and ra["val_losses"] == rb["val_losses"]
    assert ra["best_epoch"] == rb["best_epoch"] and ra["steps"] == rb["steps"] == 60


def test_resume_refuses_another_run(data_dir, tmp_path):
    out = tmp_path / "m"
    train(data_dir, out, preset=TINY, max_steps=2, threads=1, progress=False, save_every=2)
    with pytest.raises(TrainingError, match="batch_size=4, this run has batch_size=8"):
        train(data_dir, out, preset=TINY, batch_size=8, max_steps=2, threads=1, progress=False, resume=True)
    with pytest.raises(TrainingError, match="no checkpoint in"):
        train(data_dir, tmp_path / "n", preset=TINY, progress=False, resume=True)
    with pytest.raises(TrainingError, match="checkpoint not found"):
        train(data_dir, tmp_path / "n", preset=TINY, progress=False, resume=tmp_path / "nothing")


# ------------------------------------------------------------------------------------ DDP


def test_two_cpu_processes_train_one_model_in_sync(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "gguf_factory.cli", "train", str(data_dir), "-o", str(out), "--max-steps", "3",
        "--epochs", "1", "--batch-size", "4", "--threads", "1", "--save-every", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # one report, from the first process
    rec = _record(out)
    assert rec["world_size"] == 2 and rec["distributed"]["backend"] == "gloo"
    ranks = rec["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["tokens"] > 0 and r["examples"] == 12 for r in ranks)  # 3 steps x batch 4 each
    # different shards, yet the same weights on both ranks after every step: the gradients were averaged
    assert ranks[0]["tokens"] != ranks[1]["tokens"] or ranks[0]["target_tokens"] != ranks[1]["target_tokens"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert weights_digest(saved) == ranks[0]["weights_sha256"]  # and those are the weights written
    assert rec["run"]["effective_batch"] == 8 and rec["steps"] == 3
    # one model folder, one checkpoints folder, nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.checkpoints"]
    ckpt = out.parent / "ddp.checkpoints" / "checkpoint-00000003"
    rng = json.loads((ckpt / "rng.json").read_text())
    assert len(rng) == 2  # both processes' generators


def test_bare_resume_means_the_latest_checkpoint():
    from gguf_factory.cli import _bare_resume

    assert _bare_resume(["train", "d", "--resume"]) == ["train", "d", "--resume=latest"]
    assert _bare_resume(["train", "d", "--resume", "-o", "m"]) == ["train", "d", "--resume=latest", "-o", "m"]
    assert _bare_resume(["train", "d", "--resume", "ck/checkpoint-00000004"])[-1] == "ck/checkpoint-00000004"
