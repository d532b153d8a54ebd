"""Bad inputs through the real `gguf-factory` command: one-line error, exit code 2, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli


def test_help_lists_every_verb() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    verbs = (
        "prepare",
        "train",
        "convert",
        "convert-lora",
        "verify",
        "quantize",
        "eval",
        "ladder",
        "chat",
        "generate",
        "demo",
        "inspect",
        "validate",
        "repair",
    )
    for verb in verbs:
        assert verb in proc.stdout


@pytest.mark.parametrize("args", [("demo", "--no-such-option"), ("no-such-verb",), ("quantize",)])
def test_usage_errors_exit_2_without_traceback(args: tuple[str, ...]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "Usage: gguf-factory" in proc.stderr and "Error:" in proc.stderr


def test_prepare_missing_file(tmp_path: Path) -> None:
    proc = run_cli("prepare", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "data"))
    assert_one_line_error(proc, "nope.jsonl")


def test_prepare_empty_dataset(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    proc = run_cli("prepare", str(empty), "-o", str(tmp_path / "data"))
    assert_one_line_error(proc, "empty.jsonl")
    assert not (tmp_path / "data" / "train.jsonl").exists()


def test_prepare_malformed_jsonl_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good).replace("hi", "hey") + "\n{not json\n")
    proc = run_cli("prepare", str(bad), "-o", str(tmp_path / "data"))
    assert_one_line_error(proc, "chats.jsonl:3")
    assert not (tmp_path / "data" / "train.jsonl").exists()


def test_prepare_wrong_csv_columns(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.csv"
    bad.write_text("foo,bar\nhi,hello\n")
    proc = run_cli("prepare", str(bad), "-o", str(tmp_path / "data"))
    assert_one_line_error(proc, "pairs.csv")


def test_prepare_output_in_missing_folder(tmp_path: Path) -> None:
    proc = run_cli("prepare", "-o", str(tmp_path / "missing" / "data"))
    assert_one_line_error(proc, "missing")
    assert not (tmp_path / "missing").exists()


def test_convert_folder_that_is_not_a_hf_model(tmp_path: Path) -> None:
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hello")
    out = tmp_path / "out.gguf"
    proc = run_cli("convert", str(tmp_path / "notamodel"), "-o", str(out))
    assert_one_line_error(proc, "notamodel")
    assert not out.exists()


def test_convert_output_in_missing_folder(tiny_hf_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out.gguf"
    proc = run_cli("convert", str(tiny_hf_model), "-o", str(out))
    assert_one_line_error(proc, "missing")
    assert not out.parent.exists()


def test_train_on_missing_data_folder(tmp_path: Path) -> None:
    proc = run_cli("train", str(tmp_path / "nodata"), "-o", str(tmp_path / "model"))
    assert_one_line_error(proc, "nodata")
    assert not (tmp_path / "model").exists()


def test_quantize_missing_input(tmp_path: Path) -> None:
    proc = run_cli("quantize", str(tmp_path / "in.gguf"), "-o", str(tmp_path / "out.gguf"))
    assert_one_line_error(proc, "in.gguf")


def test_quantize_not_a_gguf(tmp_path: Path) -> None:
    src = tmp_path / "in.gguf"
    src.write_bytes(b"PK\x03\x04 definitely not gguf")
    proc = run_cli("quantize", str(src), "-o", str(tmp_path / "out.gguf"))
    assert_one_line_error(proc, "in.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_quantize_unknown_type(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    proc = run_cli("quantize", str(tiny_f16_gguf), "-o", str(tmp_path / "o.gguf"), "--type", "Q9_Z")
    assert_one_line_error(proc, "Q9_Z")
    assert not (tmp_path / "o.gguf").exists()


def test_quantize_output_in_missing_folder(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "o.gguf"
    proc = run_cli("quantize", str(tiny_f16_gguf), "-o", str(out))
    assert_one_line_error(proc, "missing")


def test_chat_with_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("hello")
    proc = run_cli("generate", str(bogus), "hi")
    assert_one_line_error(proc, "model.gguf")


@pytest.mark.slow
def test_generate_streams_an_answer(tiny_f16_gguf: Path) -> None:
    proc = run_cli("generate", str(tiny_f16_gguf), "hello there", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_chat_session_over_stdin(tiny_f16_gguf: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gguf_factory.cli", "chat", str(tiny_f16_gguf), "--max-tokens", "8"],
        input="hello there\n/reset\nhow are you\n/exit\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot>") == 2
    assert "conversation cleared" in proc.stdout
