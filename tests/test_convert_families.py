"""Every family in gguf_factory.convert.families, end to end through the real llama.cpp (no mocks).

For each family a tiny random-weight checkpoint is built from transformers' own config class with a
tokenizer.json in its real checkpoints' layout (tests/model_builders.py), converted to F32 and F16, and
compared with transformers: tokenizer ids (edge cases, English, 8 other languages; plain and through the chat
template), greedy continuations, and the next-token argmax at every position of > 1000 prompt positions.
The checks a family claims in the table (``Family.verified``) are exactly the ones asserted here, so
``gguf-factory convert --list`` cannot claim more than this file proves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_factory.convert import supported_architectures
from gguf_factory.convert.families import CHECKS, FAMILIES, GELU_NOTE, Family
from model_builders import BUILDERS, PARITY_TEXTS, Parity, run_parity

BY_KEY = {f.key: f for f in FAMILIES}


def test_table_matches_the_fixtures() -> None:
    """One fixture per family, every registered architecture listed, only known checks claimed."""
    assert [f.key for f in FAMILIES] == list(BUILDERS)
    listed = {a for f in FAMILIES for a in f.hf_architectures}
    assert set(supported_architectures()) <= listed
    for f in FAMILIES:
        assert set(f.verified) <= set(CHECKS), f.key
        assert f.tokenizer_exception is None or "tokenizer" in f.verified


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _assert_matches_tokenizer_json(family: Family, parity: Parity, workdir: Path) -> None:
    """transformers loads Llama 1/2 checkpoints with its LlamaTokenizer class, whose Metaspace pipeline
    (legacy=false) is not the tokenizer.json they ship: it drops the "▁" that the legacy normalizer (like
    SentencePiece) puts after a special token inside the text and before a text that starts with a space.
    llama.cpp follows the tokenizer.json; it must match transformers running that file exactly."""
    from gguf_factory.verify import check_tokenizer_parity

    assert parity.tokenizer_mismatches  # the class really differs (else the exception is not needed)
    as_shipped = workdir / f"{family.key}-tokenizer-json"
    if not as_shipped.exists():
        shutil.copytree(parity.hf_dir, as_shipped)
        cfg_path = as_shipped / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the tokenizer.json pipeline, unchanged
        cfg_path.write_text(json.dumps(cfg))
    exact = check_tokenizer_parity(parity.f32, as_shipped, PARITY_TEXTS)
    assert exact.n_checks == parity.tokenizer_checks
    assert exact.ok, exact.mismatches[:3]


@pytest.mark.slow
@pytest.mark.parametrize("key", list(BY_KEY))
def test_family_parity(workdir: Path, key: str) -> None:
    family = BY_KEY[key]
    r = run_parity(key, workdir)
    assert r.fields["general.architecture"] == family.llama_cpp_arch
    assert r.fields["tokenizer.ggml.model"] == family.tokenizer_model
    assert r.fields.get("tokenizer.ggml.pre") == family.pre
    assert r.tokenizer_checks >= len(PARITY_TEXTS)
    if "tokenizer" in family.verified:
        if family.tokenizer_exception == "llama-tokenizer-class":
            _assert_matches_tokenizer_json(family, r, workdir)
        else:
            assert not r.tokenizer_mismatches, r.tokenizer_mismatches[:3]
    if "greedy" in family.verified:
        assert not r.greedy_mismatches, r.greedy_mismatches
        assert len({t for g in r.greedy_generated for t in g}) >= 8  # not one token repeated
    assert r.f32_unexplained_flips == 0  # any F32 disagreement is a near-tie, claimed or not
    assert r.top1_f32 >= 0.998, r.top1_f32  # what the notes of the two families below 99.9 % say
    assert r.positions > 1000
    if r.top1_f32_ggml_gelu is not None:  # a tanh-GELU model: also against transformers with ggml's GELU
        assert r.top1_f32_ggml_gelu >= 0.999, (r.top1_f32_ggml_gelu, r.positions)
        assert r.max_diff_f32_ggml_gelu is not None and r.max_diff_f32_ggml_gelu < 2e-2
    if "top1-f32" in family.verified:
        if family.note == GELU_NOTE:  # the F32 check is the GELU-matched one (the note says so)
            assert r.top1_f32_ggml_gelu is not None and r.top1_f32 < 0.999
        else:
            assert r.top1_f32 >= 0.999, (r.top1_f32, r.positions)
        assert r.max_diff_f32 < 5e-2  # ggml's GELU reads an fp16 table: ~1e-2; SiLU models ~1e-4
    if "top1-f16" in family.verified:
        assert r.top1_f16 is not None and r.top1_f16 >= 0.98, r.top1_f16
        assert r.f16_unexplained_flips == 0


def test_convert_list_cli() -> None:
    """`gguf-factory convert --list` prints every family and its verified checks; without a model it is a
    one-line error."""
    from cli_helpers import assert_one_line_error, run_cli

    proc = subprocess.run(
        [sys.executable, "-m", "gguf_factory.cli", "convert", "--list"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for f in FAMILIES:
        row = next(line for line in proc.stdout.splitlines() if f"│ {f.name} " in line)
        marks = [c.strip() for c in row.split("│")[-1 - len(CHECKS) : -1]]
        assert marks == ["✓" if c in f.verified else "—" for c in CHECKS], (f.key, row)
        assert row.split("│")[-2 - len(CHECKS)].strip() == "✓", (f.key, row)  # every family: GGUF -> HF
    assert "Phi-1 / Phi-2" in proc.stdout and GELU_NOTE in proc.stdout.replace("\n", " ")  # notes printed
    assert_one_line_error(run_cli("convert"), "MODEL and --output")
