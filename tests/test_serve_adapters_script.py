"""benchmarks/serve_adapters.py run for real on the tiny test model: its GGUF rebuilt as a Hugging Face
checkpoint, four LoRA adapters, every server configuration started (ours and llama_cpp.server) and its
memory read, the router's replies checked against base + adapter loaded alone, the report written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bench_scripts import load_benchmark

pytestmark = [
    pytest.mark.slow,  # six server processes, a GGUF rebuilt as a checkpoint, four adapters: about a minute
    pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc"),
]


@pytest.fixture(scope="module")
def sa() -> ModuleType:
    return load_benchmark("serve_adapters", "serve_adapters_script")


@pytest.fixture(scope="module")
def run(
    sa: ModuleType, tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("serve-adapters")
    results = root / "results"
    argv = ["--model", str(tiny_f16_gguf), "--work", str(root / "work"), "--results", str(results)]
    argv += ["--repeats", "1", "--threads", "1", "--ctx", "256", "--prompts", "2", "--max-tokens", "8"]
    return sa.main(argv), results


def test_every_configuration_is_measured(sa: ModuleType, run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    rows = {r["name"]: r for r in result["configs"]}
    assert list(rows) == [
        "ours, one model",
        "ours, shared base",
        "ours, separate bases",
        "peer, one model",
        "peer, one model + adapter",
        "peer, four models",
    ]
    for r in rows.values():
        assert r["rss_mb"]["n"] == 1 and r["rss_mb"]["median"] > 10, r  # a Python server holds > 10 MB
        assert r["peak_rss_mb"]["median"] >= r["rss_mb"]["median"]
        assert len(r["request_ms"][0]) == len(r["models"]) and all(ms > 0 for ms in r["request_ms"][0])
    assert rows["ours, one model"]["bases_loaded"] == 1 and rows["ours, one model"]["rss_ratio"] == 1.0
    assert rows["ours, shared base"]["bases_loaded"] == 1  # four domains, one base
    assert rows["ours, separate bases"]["bases_loaded"] == 4
    assert rows["ours, shared base"]["rss_ratio"] < rows["ours, separate bases"]["rss_ratio"]
    assert rows["peer, four models"]["models"] == list(sa.DOMAINS)
    assert all(
        m["lora_path"].endswith("-lora.gguf") for m in rows["peer, four models"]["peer_config"]["models"]
    )


def test_router_replies_are_those_of_base_plus_adapter_alone(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    rep = result["replies"]
    assert rep["total"] == 4 * 2 and rep["identical"] == rep["total"], rep["checks"]
    assert all(c["router"] == c["alone"] for c in rep["checks"])
    assert rep["differ_from_base"] >= 1  # the adapters really change the model
    met = {t["target"]: t["met"] for t in result["targets"]}
    assert met["each domain's replies identical to base + that adapter loaded alone"]


def test_results_written_stamped_and_portable(
    sa: ModuleType, run: tuple[dict[str, Any], Path], tiny_f16_gguf: Path
) -> None:
    result, results = run
    text = (results / "serve_adapters.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(result))
    for key in ("date", "commit", "command", "machine", "settings", "targets"):
        assert result[key], key
    assert result["command"].startswith("python benchmarks/serve_adapters.py --model tiny-F16.gguf")
    assert result["machine"]["cpus"] and "cpu" in result["machine"]
    md = (results / "serve_adapters.md").read_text()
    assert all(f"| {r['name']} |" in md for r in result["configs"])
    assert "## Targets" in md and "| each domain's replies identical" in md
    for blob in (text, md):  # no machine paths
        assert str(tiny_f16_gguf.parent) not in blob and str(results.parent) not in blob
        assert str(sa.ROOT) not in blob
    assert not list(results.glob("*.partial"))


def test_targets_follow_the_figures(sa: ModuleType, run: tuple[dict[str, Any], Path]) -> None:
    result = copy.deepcopy(run[0])
    shared = sa.row(result, "ours, shared base")
    shared["rss_ratio"] = 1.29
    result["replies"].update(identical=8, total=8)
    assert [t["met"] for t in sa.targets(result)] == [True, True]
    shared["rss_ratio"] = 1.31
    result["replies"]["identical"] = 7
    assert [t["met"] for t in sa.targets(result)] == [False, False]
    assert "❌" in sa.render_md({**result, "targets": sa.targets(result)})


def test_order_alternates_and_command_is_portable(sa: ModuleType, tmp_path: Path) -> None:
    xs = ["a", "b", "c"]
    assert sa.order(xs, 0) == xs and sa.order(xs, 1) == xs[::-1] and sa.order(xs, 2) == xs
    shown = sa.shown_command(
        ["--model", str(tmp_path / "m.gguf"), f"--work={tmp_path / 'w'}", "--repeats", "1"]
    )
    assert shown == "python benchmarks/serve_adapters.py --model m.gguf --work=w --repeats 1"
    assert sa.shown_path(sa.ROOT / "benchmarks" / "x.gguf") == "benchmarks/x.gguf"
