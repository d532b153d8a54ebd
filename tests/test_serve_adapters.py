"""One base, many adapters: a router manifest whose domains share a GGUF loads it once, each domain's LoRA
applied per request with llama.cpp's adapter API; replies are those of base + that adapter loaded alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from gguf_factory.router import make_manifest
from gguf_factory.runtime import load
from gguf_factory.serve import ModelPool, ModelSpec, create_app, pool_models
from serve_helpers import free_port, running, wait_until_up

ADAPTED = ("jokes", "meals", "hello")  # domains with an adapter; "plain" is the bare base
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGES = [{"role": "user", "content": "What is your favorite food?"}]
N_TOKENS = 12


def make_lora(hf_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (each seed a different one), converted to GGUF."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gguf_factory.convert.lora import convert_lora

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out.with_suffix("")))
    convert_lora(out.with_suffix(""), out, base=hf_dir)
    return out


@pytest.fixture(scope="module")
def shared(tiny_hf_model: Path, tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest: four domains on one base GGUF, three of them with a LoRA adapter of their own."""
    root = tmp_path_factory.mktemp("shared")
    shutil.copy(tiny_f16_gguf, root / "base.gguf")
    domains: dict[str, dict[str, Any]] = {"plain": {"model": "base.gguf"}}
    for seed, name in enumerate(ADAPTED, 1):
        make_lora(tiny_hf_model, root / f"{name}-lora.gguf", seed)
        domains[name] = {"model": "base.gguf", "adapter": f"{name}-lora.gguf"}
    return make_manifest(root / "router.yaml", domains, default="plain")


@pytest.fixture(scope="module")
def alone(shared: Path) -> dict[str, str]:
    """Each domain's greedy reply from the base + its adapter loaded alone in llama.cpp."""
    root = shared.parent
    out = {}
    for name in ("plain", *ADAPTED):
        lora = {"lora_path": root / f"{name}-lora.gguf"} if name != "plain" else {}
        with load(root / "base.gguf", n_threads=2, **lora) as m:
            out[name] = m.chat(MESSAGES, max_tokens=N_TOKENS, temperature=0.0)
    assert len(set(out.values())) >= 3, out  # the adapters really change the model
    return out


def test_domains_share_one_base_and_answer_as_alone(shared: Path, alone: dict[str, str]) -> None:
    router, specs = pool_models(shared)
    pool = ModelPool(specs, n_threads=2)
    try:
        with running(create_app(pool, router=router)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

            def ask(domain: str) -> str:
                r = client.chat.completions.create(
                    model=domain, messages=MESSAGES, max_tokens=N_TOKENS, temperature=0
                )
                return (r.choices[0].message.content or "").strip()  # chat() strips, the server not

            for domain in ("jokes", "plain", "meals", "jokes", "hello", "plain", "hello", "meals"):
                assert ask(domain) == alone[domain], domain  # the adapter set switched per request
            # concurrent requests for different domains take turns on the one instance
            order = [*ADAPTED, "plain"] * 3
            with ThreadPoolExecutor(6) as ex:
                got = list(ex.map(ask, order))
            assert got == [alone[d] for d in order]
        assert [p.name for p in pool.loaded_bases()] == ["base.gguf"]
        status = {s["id"]: s for s in pool.status()}
        assert all(s["loaded"] and s["instances"] == 1 and s["loads"] == 1 for s in status.values())
        assert sorted(status["plain"]["shares_base_with"]) == sorted(ADAPTED)
        adapters = sum((shared.parent / f"{d}-lora.gguf").stat().st_size for d in ADAPTED)
        assert pool.used_bytes == pool.cost("plain") + adapters  # one base, each adapter once
        assert pool.cost("jokes") == pool.cost("plain") + (shared.parent / "jokes-lora.gguf").stat().st_size
    finally:
        pool.close()


def test_lru_evicts_adapters_not_the_base(shared: Path, alone: dict[str, str]) -> None:
    _, specs = pool_models(shared)
    sizes = {d: (shared.parent / f"{d}-lora.gguf").stat().st_size for d in ADAPTED}
    base_cost = ModelPool({"plain": specs["plain"]}).cost("plain")
    pool = ModelPool(
        specs, n_threads=2, budget_bytes=base_cost + sizes["jokes"] + sizes["meals"], queue_timeout=5
    )
    try:
        for domain in ("jokes", "meals", "hello"):  # the third adapter pushes out the least recently used
            with pool.use(domain) as m:
                assert m.chat(MESSAGES, max_tokens=N_TOKENS, temperature=0.0) == alone[domain]
        assert pool.evictions == 1 and [p.name for p in pool.loaded_bases()] == ["base.gguf"]
        assert "jokes" not in pool.loaded() and {"meals", "hello", "plain"} <= set(pool.loaded())
        assert pool.used_bytes == base_cost + sizes["meals"] + sizes["hello"]
        with pool.use("jokes") as m:  # loaded again on the same base, answers the same
            assert m.chat(MESSAGES, max_tokens=N_TOKENS, temperature=0.0) == alone["jokes"]
            assert [p.name for p, _ in m.active_adapters] == ["jokes-lora.gguf"]
        assert {s["loads"] for s in pool.status()} == {1}
        with pool.use("plain") as m:
            assert (
                m.active_adapters == ()
                and m.chat(MESSAGES, max_tokens=N_TOKENS, temperature=0.0) == alone["plain"]
            )
    finally:
        pool.close()


def test_different_bases_or_contexts_get_their_own_instance(shared: Path, tiny_f32_gguf: Path) -> None:
    root = shared.parent
    pool = ModelPool(
        {
            "a": root / "base.gguf",
            "b": pool_models(shared)[1]["jokes"],
            "f32": tiny_f32_gguf,
            "long": ModelSpec(root / "base.gguf", n_ctx=512),
        },
        n_threads=2,
    )
    try:
        for i in ("a", "b", "f32", "long"):
            with pool.use(i):
                pass
        status = {s["id"]: s for s in pool.status()}
        assert status["a"]["shares_base_with"] == ["b"] and status["f32"]["shares_base_with"] == []
        assert status["long"]["shares_base_with"] == [] and len(pool.loaded_bases()) == 3
    finally:
        pool.close()


# --- memory: a base big enough to see in the process's RSS -------------------------------------------
@pytest.fixture(scope="module")
def big_router(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ~50 MB F16 random Llama with four LoRA domains (manifest), and a one-domain manifest."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gguf_factory.convert import convert
    from gguf_factory.train.tokenizer import ENDOFTEXT, IM_END, save_hf_tokenizer, train_bpe_tokenizer
    from test_convert import CORPUS

    root = tmp_path_factory.mktemp("big")
    hf = root / "hf"
    tok = train_bpe_tokenizer(CORPUS * 10, vocab_size=400, min_frequency=2)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=tok.token_to_id(IM_END), pad_token_id=tok.token_to_id(ENDOFTEXT),
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)
    save_hf_tokenizer(tok, hf, model_max_length=256)
    convert(hf, root / "base.gguf", outtype="f16")
    domains: dict[str, dict[str, Any]] = {}
    for seed, name in enumerate(("a", "b", "c", "d"), 1):
        make_lora(hf, root / f"{name}-lora.gguf", seed)
        domains[name] = {"model": "base.gguf", "adapter": f"{name}-lora.gguf"}
    one = make_manifest(root / "one.yaml", {"a": domains["a"]})
    four = make_manifest(root / "four.yaml", domains)
    return one, four


def serve_rss(manifest: Path, domains: list[str]) -> int:
    """VmRSS (bytes) of a `gguf-factory serve` process after one completion from each domain."""
    port = free_port()
    exe = shutil.which("gguf-factory")
    cmd = [exe] if exe else [sys.executable, "-m", "gguf_factory.cli"]
    args = [*cmd, "serve", str(manifest), "--port", str(port), "--threads", "2", "--no-web-ui"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, url)
        for d in domains:
            r = httpx.post(
                f"{url}/v1/completions", json={"model": d, "prompt": "The quick brown fox", "max_tokens": 4},
                timeout=60,
            )  # fmt: skip
            assert r.status_code == 200, r.text
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) * 1024
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
def test_four_domains_cost_about_one_model_in_memory(big_router: tuple[Path, Path]) -> None:
    one, four = big_router
    size = (one.parent / "base.gguf").stat().st_size
    assert size > 40e6
    rss_one = serve_rss(one, ["a"])
    rss_four = serve_rss(four, ["a", "b", "c", "d"])
    print(f"VmRSS: one domain {rss_one / 1e6:.0f} MB, four {rss_four / 1e6:.0f} MB; base {size / 1e6:.0f} MB")
    # four copies of the base would add ~3 model sizes; one shared base adds only the three adapters
    assert rss_four - rss_one < 0.5 * size, (rss_one, rss_four, size)
    assert rss_four < 1.5 * rss_one, (rss_one, rss_four)
