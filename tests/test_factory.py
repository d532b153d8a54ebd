"""`build factory.yaml`: a tiny multi-domain build end to end (real training, merging, conversion,
quantization, llama.cpp validation and routing), its cache, a killed build resumed, bad manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError
from gguf_factory.factory import build, read_factory
from gguf_factory.router import Router
from tools import missing_tool

pytestmark = pytest.mark.slow

TINY = """\
name: tiny
base:
  preset: {name: t, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2,
           vocab_size: 512, max_seq_len: 128, epochs: 2, lr: 0.003, batch_size: 16}
lora: {rank: 4, alpha: 8, epochs: 1}
domains:
  greetings: {categories: [greetings], keywords: [hello]}
  food: {categories: [food], profile: quality}
  humor:
    profile: mobile
    subdomains:
      jokes: {categories: [humor]}
      films: {categories: [movies]}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("factory")
    (root / "factory.yaml").write_text(TINY)
    r = build(root / "factory.yaml", root / "out", threads=2)
    return root, r


def test_build_produces_every_artifact(built) -> None:
    import llama_cpp

    root, r = built
    out = root / "out"
    assert set(r.artifacts) >= {
        "models/universal-Q4_K_M.gguf",
        "models/greetings-Q4_K_M.gguf",
        "models/food-Q5_K_M.gguf",
        "models/humor-Q2_K.gguf",
        "adapters/greetings.gguf",
        "adapters/food.gguf",
        "adapters/humor.jokes.gguf",
        "adapters/humor.films.gguf",
        "router.yaml",
        "router.classifier.json",
        "build.json",
        "build-report.md",
    } - {"build.json", "build-report.md"}
    report = (out / "build-report.md").read_text()
    assert (out / "build.json").is_file() and "Routing accuracy" in report and "mean KLD" in report
    evals = {s.name: s.summary for s in r.steps if s.kind == "eval"}
    assert set(evals) == {"eval:greetings", "eval:food", "eval:humor"}
    # each parent measured against its own F16: the Q2_K (mobile) parent loses more than the Q5_K_M one
    assert 0 <= evals["eval:food"]["kld_mean"] < evals["eval:humor"]["kld_mean"]
    # every parent and every LoRA (on the universal base) was loaded by llama.cpp and generated
    validated = {s.name for s in r.steps if s.kind == "validate"}
    assert validated == {
        "validate:universal",
        "validate:greetings",
        "validate:food",
        "validate:humor",
        "validate:greetings.lora",
        "validate:food.lora",
        "validate:humor.jokes.lora",
        "validate:humor.films.lora",
    }
    # the parent of a family is not its base: the merged adapters changed the weights
    base = llama_cpp.Llama(
        str(out / "models/universal-Q4_K_M.gguf"), n_ctx=64, logits_all=True, verbose=False
    )
    parent = llama_cpp.Llama(
        str(out / "models/greetings-Q4_K_M.gguf"), n_ctx=64, logits_all=True, verbose=False
    )
    ids = base.tokenize(b"user\nhello there", add_bos=True)
    base.eval(ids)
    parent.eval(ids)
    assert abs(base.scores[: len(ids)] - parent.scores[: len(ids)]).max() > 1e-3
    # the profile is in the file, the router routes to the packaged files
    router = Router(out / "router.yaml")
    assert router.route("hello!").domain == "greetings"
    assert router.targets["food"].model == (out / "models/food-Q5_K_M.gguf").resolve()
    assert router.targets["humor"].context_length == 128  # the profile's 1024, capped at the trained context
    assert set(r.routing["domains"]) == {"greetings", "food", "humor"} and 0 <= r.routing["accuracy"] <= 1


def test_rebuild_is_cached_and_a_change_redoes_only_what_depends_on_it(built) -> None:
    root, first = built
    again = build(root / "factory.yaml", root / "out", threads=2)
    assert again.ran == 0 and again.cached == len(first.steps)
    (root / "factory.yaml").write_text(TINY.replace("profile: quality", "profile: development"))
    try:
        changed = build(root / "factory.yaml", root / "out", threads=2)
    finally:
        (root / "factory.yaml").write_text(TINY)
    assert {s.name for s in changed.steps if s.status == "ran"} == {
        "quantize:food",
        "validate:food",
        "eval:food",
        "router",
    }
    assert "models/food-Q8_0.gguf" in changed.artifacts and "models/food-Q5_K_M.gguf" not in changed.artifacts


def test_router_to_adapters_shares_the_universal_model(built) -> None:
    """`router_to: adapters`: one route per adapter, each the universal GGUF + its GGUF LoRA; only the
    router step is new (everything else comes from the cache)."""
    root, first = built
    m = root / "adapters.yaml"
    m.write_text(TINY + "outputs: {router_to: adapters}\n")
    r = build(m, root / "out-adapters", threads=2, cache_dir=root / ".cache")
    assert {s.name for s in r.steps if s.status == "ran"} == {"router"}
    router = Router(root / "out-adapters" / "router.yaml")
    assert set(router.targets) == {"greetings", "food", "humor.jokes", "humor.films"}
    for name, t in router.targets.items():
        assert t.model.name == "universal-Q4_K_M.gguf" and t.adapter is not None and t.adapter.is_file()
        assert t.adapter.name == f"{name}.gguf"
    assert router.route("hello").domain == "greetings"
    assert set(r.routing["domains"]) == set(router.targets)


def test_a_killed_build_resumes(tmp_path: Path) -> None:
    (tmp_path / "factory.yaml").write_text(TINY)
    code = (
        "from gguf_factory.factory import build; "
        f"build({str(tmp_path / 'factory.yaml')!r}, {str(tmp_path / 'out')!r}, threads=1)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    cache = tmp_path / ".cache"
    deadline = time.monotonic() + 120
    while not list(cache.glob("lora_greetings-*/step.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [p for p in cache.iterdir() if not p.name.startswith(".tmp-")]
    assert finished and all((p / "step.json").is_file() for p in finished)  # no half step at a final path
    assert not (tmp_path / "out").exists()
    r = build(tmp_path / "factory.yaml", tmp_path / "out", threads=2)
    assert r.cached >= len(finished) and r.ran >= 1
    assert not list(cache.glob(".tmp-*"))


def test_bad_manifests(tmp_path: Path) -> None:
    m = tmp_path / "factory.yaml"
    two = "  b: {categories: [humor]}\n"
    cases = {
        "domains:\n  a: {categoriez: [food]}\n" + two: "domains.a.categoriez: unknown field",
        "domains:\n  a: {files: [missing.jsonl]}\n" + two: r"domains.a.files\[0\]: file not found",
        "domains:\n  a: {profile: quality}\n" + two: "domains.a: a domain needs data",
        "domains:\n  a: {categories: [food]}\n": "at least two domains",
        "base: {preset: nano, model: x}\ndomains:\n  a: {categories: [food]}\n" + two: "exactly one",
        "domains:\n  a: {categories: [food], profile: tiny}\n" + two: "domains.a.profile",
        "outputs: {router_to: adapters, lora_gguf: false}\ndomains:\n  a: {categories: [food]}\n"
        + two: "router_to: adapters needs",
    }
    for text, needle in cases.items():
        m.write_text(text)
        with pytest.raises(InputError, match=needle):
            read_factory(m)
    m.write_text("domains:\n  a: {categories: [nonsense]}\n  b: {categories: [humor]}\n")
    proc = run_cli("build", m, "-o", tmp_path / "out")
    assert_one_line_error(proc, "nonsense")
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / ".cache").glob("*") if not (p / "step.json").is_file()]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    m.write_text(TINY)
    with pytest.raises(InputError, match="not a build output"):
        build(m, out)
    assert json.loads(json.dumps({"ok": (out / "precious.txt").read_text()}))["ok"] == "keep"


def test_ray_executor_runs_the_same_graph(built, tmp_path: Path) -> None:
    """Independent steps as Ray tasks on a local 2-CPU Ray instance: a finished cache is reused whatever
    the executor, and a fresh build gives the same artifacts."""
    try:
        import ray  # noqa: F401
    except ImportError:
        missing_tool("ray is not installed (pip install -e '.[dev]' installs it)")
    root, first = built
    cached = build(
        root / "factory.yaml", tmp_path / "again", executor="ray", workers=2, cache_dir=root / ".cache"
    )
    assert cached.executor == "ray" and cached.ran == 0 and cached.cached == len(first.steps)
    (tmp_path / "factory.yaml").write_text(TINY.replace("epochs: 2,", "epochs: 1,"))
    fresh = build(tmp_path / "factory.yaml", tmp_path / "out", executor="ray", workers=2)
    assert fresh.ran == len(first.steps) and set(fresh.artifacts) == set(first.artifacts)
    assert Router(tmp_path / "out" / "router.yaml").route("hello").domain == "greetings"
