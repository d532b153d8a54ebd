"""The router: manifest validation, the routing model fitted on real chat data, `route`, and `serve` routing
"auto" requests to the domain's GGUF through the real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.errors import InputError
from gguf_factory.router import (
    Router,
    TextClassifier,
    fit_classifier,
    fit_router,
    make_manifest,
    read_manifest,
)
from gguf_factory.serve import ModelPool, create_app, pool_models
from serve_helpers import running

DOMAINS = ("greetings", "humor", "food")  # the tiny dataset's chatterbot categories


@pytest.fixture(scope="module")
def routed(tiny_f16_gguf: Path, tiny_f32_gguf: Path, tiny_data_dir: Path, tmp_path_factory) -> Path:
    """A manifest: greetings and humor share the F16 file, food gets the F32 one; fitted on the tiny data."""
    root = tmp_path_factory.mktemp("router")
    shutil.copy(tiny_f16_gguf, root / "chat-F16.gguf")
    shutil.copy(tiny_f32_gguf, root / "food-F32.gguf")
    manifest = make_manifest(
        root / "router.yaml",
        {
            "greetings": {"model": "chat-F16.gguf", "keywords": ["good morning"]},
            "humor": {"model": "chat-F16.gguf", "context_length": 128},
            "food": {"model": "food-F32.gguf", "profile": "quality"},
        },
        name="tiny",
    )
    fit_router(manifest, data=tiny_data_dir)
    return manifest


def test_fit_measures_held_out_accuracy_well_above_chance(tiny_data_dir: Path, routed: Path) -> None:
    r = fit_router(routed, data=tiny_data_dir)
    assert [d.domain for d in r.domains] == list(DOMAINS)
    assert all(d.train_texts > 10 and d.test_prompts > 0 for d in r.domains)
    assert r.accuracy >= 0.7, [(d.domain, d.correct, d.test_prompts) for d in r.domains]  # chance: 1/3
    assert read_manifest(routed).classifier == "router.classifier.json"
    doc = json.loads(r.classifier.read_text())
    assert doc["domains"] == sorted(DOMAINS) and set(doc["meta"]["heldout_accuracy"]) == set(DOMAINS)


def test_route_rules(routed: Path) -> None:
    router = Router(routed)
    d = router.route("Good morning to you!")
    assert (d.domain, d.rule, d.matched) == ("greetings", "keyword", ("good morning",))
    d = router.route("what is your favorite food to eat, do you like pizza")
    assert d.rule == "classifier" and d.domain == "food" and d.confidence > 0.5
    assert abs(sum(d.scores.values()) - 1.0) < 1e-5
    assert router.targets["humor"].context_length == 128
    assert router.targets["food"].model.name == "food-F32.gguf"


def test_low_confidence_goes_to_the_default(routed: Path, tmp_path: Path) -> None:
    doc = read_manifest(routed).model_dump()
    doc.update(default="humor", threshold=0.99)
    (tmp_path / "r.yaml").write_text(json.dumps(doc))  # JSON is YAML
    for f in ("chat-F16.gguf", "food-F32.gguf", "router.classifier.json"):
        (tmp_path / f).symlink_to(routed.parent / f)
    d = Router(tmp_path / "r.yaml").route("what is your favorite food")
    assert d.domain == "humor" and d.rule == "default" and d.confidence < 0.99


def test_classifier_json_round_trip() -> None:
    texts = ["I love pizza", "pasta is food", "tell me a joke", "a funny joke", "hello there", "hi, hello"]
    labels = ["food", "food", "humor", "humor", "greetings", "greetings"]
    clf = fit_classifier(texts, labels, epochs=100)
    again = TextClassifier.from_json(json.loads(json.dumps(clf.to_json())), "x")
    probe = ["pizza joke", "hello food", "nothing known"]
    assert (clf.predict(probe).argmax(1) == again.predict(probe).argmax(1)).all()
    assert abs(clf.predict(probe) - again.predict(probe)).max() < 1e-3
    with pytest.raises(InputError, match="not a gguf-factory routing model"):
        TextClassifier.from_json({"format": "other"}, "x.json")
    bad = clf.to_json()
    bad["bias"] = bad["bias"][:1]
    with pytest.raises(InputError, match="shapes"):
        TextClassifier.from_json(bad, "x.json")


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    m = tmp_path / "r.yaml"
    cases = {
        "domains:\n  a:\n    modle: x.gguf\n": "domains.a.modle: unknown field",
        "domains:\n  a:\n    model: x.gguf\ndefault: b\n": "default 'b' is not one of the domains",
        "domains:\n  auto:\n    model: x.gguf\n": "must be 1-64 letters",
        "domains: {}\n": "domains",
        "domains:\n  a:\n    model: x.gguf\n    context_length: -5\n": "domains.a.context_length",
        "- just a list\n": "YAML mapping",
    }
    for text, needle in cases.items():
        m.write_text(text)
        with pytest.raises(InputError, match=needle.replace("(", r"\(")):
            read_manifest(m)
    m.write_text("domains:\n  a:\n    model: missing.gguf\n")
    with pytest.raises(InputError, match=r"domains\.a\.model: file not found"):
        Router(m)


def test_route_cli(routed: Path, tmp_path: Path) -> None:
    proc = run_cli("route", routed, "--json", "Good morning!")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (
        doc["domain"] == "greetings" and doc["rule"] == "keyword" and doc["model"].endswith("chat-F16.gguf")
    )
    proc = run_cli("route", tmp_path / "none.yaml", "hi")
    assert_one_line_error(proc, "none.yaml")


def test_serve_routes_auto_requests(routed: Path, tiny_data_dir: Path) -> None:
    router, specs = pool_models(routed)
    assert router is not None and set(specs) == set(DOMAINS)
    pool = ModelPool(specs, n_threads=2)
    try:
        with running(create_app(pool, router=router)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            assert [m.id for m in client.models.list().data] == ["auto", *DOMAINS]
            for text, domain in (
                ("Good morning!", "greetings"),
                ("do you like pizza and pasta food", "food"),
            ):
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0
                )
                assert raw.headers["x-route"].startswith(f"{domain}; rule=")
                assert raw.parse().model == domain == router.route(text).domain
            # streaming says where it went too, and naming a domain bypasses the router
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions",
                json={"model": "auto", "stream": True, "max_tokens": 3,
                      "messages": [{"role": "user", "content": "Good morning"}]},
            ) as r:  # fmt: skip
                assert r.status_code == 200 and r.headers["x-route"].startswith("greetings;")
                assert "data: [DONE]" in r.read().decode()
            r = httpx.post(
                f"{url}/v1/completions", json={"model": "humor", "prompt": "user\nhi", "max_tokens": 2}
            )
            assert r.status_code == 200 and "x-route" not in r.headers and r.json()["model"] == "humor"
        loaded = {s["id"]: s for s in pool.status()}
        assert (
            loaded["food"]["loaded"] and loaded["greetings"]["loaded"] and not loaded["humor"]["n_ctx"] > 256
        )
    finally:
        pool.close()


def test_serve_applies_a_domains_lora_adapter(
    tiny_hf_model: Path, tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A domain with an adapter is the base GGUF + that GGUF LoRA in llama.cpp: what the server answers
    is what runtime.load(model, lora_path=...) answers, and the adapter really changes the logits."""
    import numpy as np

    from gguf_factory.convert.lora import convert_lora
    from gguf_factory.runtime import load
    from gguf_factory.train import train
    from gguf_factory.train.lora import LoraSettings

    train(
        tiny_data_dir, tmp_path / "adapter", base=tiny_hf_model, lora=LoraSettings(rank=4, alpha=8),
        epochs=2, lr=2e-2, threads=2, progress=False,
    )  # fmt: skip
    convert_lora(tmp_path / "adapter", tmp_path / "tuned.gguf", base=tiny_hf_model)
    shutil.copy(tiny_f16_gguf, tmp_path / "base.gguf")
    manifest = make_manifest(
        tmp_path / "r.yaml",
        {"plain": {"model": "base.gguf"}, "tuned": {"model": "base.gguf", "adapter": "tuned.gguf"}},
        default="plain",
    )
    router, specs = pool_models(manifest)
    messages = [{"role": "user", "content": "What is your favorite food?"}]
    with (
        load(tmp_path / "base.gguf") as plain,
        load(tmp_path / "base.gguf", lora_path=tmp_path / "tuned.gguf") as tuned,
    ):
        text = "user\nWhat is your favorite food?"
        assert np.abs(plain.logits(text) - tuned.logits(text)).max() > 1e-2
        expected = tuned.chat(messages, max_tokens=12, temperature=0.0)
    pool = ModelPool(specs, n_threads=2)
    try:
        with running(create_app(pool, router=router)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            got = client.chat.completions.create(
                model="tuned", messages=messages, max_tokens=12, temperature=0
            )
            assert got.choices[0].message.content == expected
        status = {s["id"]: s for s in pool.status()}
        assert status["tuned"]["adapter"].endswith("tuned.gguf") and status["tuned"]["loaded"]
        # "plain" is the same base without the adapter: served by the one loaded instance, not a second
        assert status["plain"]["loaded"] and status["plain"]["shares_base_with"] == ["tuned"]
        assert status["tuned"]["instances"] == 1 and len(pool.loaded_bases()) == 1
    finally:
        pool.close()
