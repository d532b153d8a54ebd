"""The demo's default path (fine-tune a base -> GGUFs -> a small file -> parity -> every system measured),
run for real on the tiny trained model as the base, with tiny recipes; and a re-run reusing every step."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from conftest import TINY_CATEGORIES
from gguf_factory.demo import FinetuneRecipe, StudentRecipe, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(
        out, base=str(tiny_hf_model), categories=TINY_CATEGORIES, runs=1, n_prompts=2, max_quality=6,
        max_size="10MB", finetune=FinetuneRecipe(epochs=1, lr=1e-3, batch_size=16),
        student=StudentRecipe(vocab_size=400, ffn=0.5, layers=0.0, epochs=1, lr=1e-3, always=True),
    )  # fmt: skip


def test_demo_builds_measures_and_reports(demo) -> None:
    out = demo.out_dir
    assert set(demo.ggufs) == {"F16", "Q8_0", "Q5_K_M", "Q4_K_M"}
    for path in demo.ggufs.values():
        assert path.is_file() and path.name.startswith(demo.model_dir.name.removesuffix("-hf"))
    # the small file: both candidates built, the one with the lower validation bits/byte kept
    small = demo.small
    assert set(small.candidates) == {"autoquant", "student"}
    best = min(small.candidates, key=lambda m: small.candidates[m]["val_bits_per_byte"])
    assert small.method == best and small.path.stat().st_size <= small.budget_bytes
    stem = demo.model_dir.name.removesuffix("-hf")
    student_cfg = json.loads((out / f"{stem}-student-hf/config.json").read_text())
    base_cfg = json.loads((demo.model_dir / "config.json").read_text())
    assert student_cfg["intermediate_size"] == base_cfg["intermediate_size"] // 2
    assert student_cfg["vocab_size"] <= base_cfg["vocab_size"]  # the tiny data uses all 512 (test_trim: less)
    assert (out / f"{stem}-trim-hf/trim_report.json").is_file()
    # parity of the F16 with the fine-tuned checkpoint
    assert demo.parity["tokenizer_mismatches"] == 0 and demo.parity["top1"] >= 0.99
    # every system measured: HF, the GGUFs, the student (own vocabulary), the LSTM; bits/byte for each
    kinds = [s.row.kind for s in demo.report.systems]
    assert kinds[0] == "hf" and kinds[-1] == "lstm" and kinds.count("gguf") == 5
    for s in demo.report.systems:
        assert s.bpb is not None and 0 < s.bpb < 20, (s.row.name, s.bpb)
        assert s.row.first_token_ms > 0 and s.row.peak_rss_mb > 0
    report = json.loads((out / "demo-report.json").read_text())
    assert report["small_file"]["method"] == small.method
    assert [s["name"] for s in report["systems"]] == [s.row.name for s in demo.report.systems]
    md = (out / "demo-report.md").read_text()
    assert "bits" in md and "Parity of" in md and small.path.name in md
    assert gguf.GGUFReader(small.path).tensors


def test_demo_rerun_reuses_every_step(demo, tiny_hf_model: Path) -> None:
    again = run_demo(
        demo.out_dir, base=str(tiny_hf_model), categories=TINY_CATEGORIES, runs=1, n_prompts=2, max_quality=6,
        max_size="10MB", finetune=FinetuneRecipe(epochs=1, lr=1e-3, batch_size=16),
        student=StudentRecipe(vocab_size=400, ffn=0.5, layers=0.0, epochs=1, lr=1e-3, always=True),
        lstm=False,
    )  # fmt: skip
    assert "prepare" in again.reused and "convert F16" in again.reused
    assert "distil the student" in again.reused and "parity check" in again.reused
    assert not any(k for k in again.step_seconds if k != "measure")
