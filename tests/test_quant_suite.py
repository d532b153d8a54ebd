"""The quantization suite on real models through llama.cpp: types, options, profiles, recipes, eval, ladder.

Two models: the trained tiny chat model (widths 64: K-quants fall back to 32-block types there, as llama.cpp
does) and ``wide``, a random-weight Llama whose widths are multiples of 256 so K-quant and IQ types apply.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from cli_helpers import run_cli
from generation_checks import assert_chats, assert_generates
from gguf_factory.errors import DataError, InputError
from gguf_factory.evaluate import evaluate, evaluate_many, write_report
from gguf_factory.ladder import Rung, ladder, monotonicity_problems
from gguf_factory.quantize import (
    MAIN_TENSOR_TYPE,
    PROFILES,
    QUANT_TYPES,
    load_imatrix,
    parse_rule,
    quantize,
)
from gguf_factory.runtime import load

pytestmark = pytest.mark.slow

WIDE_LAYERS = 4
WIDE_CTX = 4096
STANDARD_TYPES = [
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
    "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16",
]  # fmt: skip


@pytest.fixture(scope="module")
def wide_f16_gguf(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (hidden 256, FFN 512, 4 blocks, untied output), the tiny model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gguf_factory.convert import convert

    base = tmp_path_factory.mktemp("wide")
    hf = base / "wide-hf"
    hf.mkdir()
    cfg = json.loads((tiny_hf_model / "config.json").read_text())
    for f in tiny_hf_model.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, hf / f.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=WIDE_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=WIDE_CTX,
        tie_word_embeddings=False,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        rms_norm_eps=1e-5,
    )
    LlamaForCausalLM(config).save_pretrained(hf)
    out = base / "wide-F16.gguf"
    convert(hf, out, outtype="f16")
    return out


@pytest.fixture(scope="module")
def wide_imatrix(wide_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An importance matrix in llama.cpp's GGUF format (per-column sums and counts) for every 2-D weight."""
    rng = np.random.default_rng(0)
    reader = gguf.GGUFReader(wide_f16_gguf)
    path = tmp_path_factory.mktemp("imatrix") / "wide.imatrix.gguf"
    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_type("imatrix")
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 64)
    w.add_array("imatrix.datasets", ["synthetic"])
    for t in reader.tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            n_in = int(t.shape[0])  # gguf-py lists ne0 (the input width) first
            w.add_tensor(f"{t.name}.in_sum2", (rng.random(n_in) * 256 + 1).astype(np.float32))
            w.add_tensor(f"{t.name}.counts", np.array([256.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def weights(types: dict[str, str]) -> dict[str, str]:
    """The quantizable tensors (the 1-D norms stay F32)."""
    return {k: v for k, v in types.items() if not k.endswith("norm.weight")}


def field(path: Path, key: str) -> object:
    f = gguf.GGUFReader(path).get_field(key)
    return f.contents() if f is not None else None


def generates(path: Path) -> None:
    with load(path, n_threads=1) as m:  # one thread: fastest for a tiny model on a busy machine
        # random weights: the reply may end at once; its token ids are still the logits' argmax
        assert_generates(m, "hello", max_tokens=4, nonempty=False)
        assert_chats(m, [{"role": "user", "content": "hi"}], max_tokens=4, nonempty=False)


# --------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize("qtype", STANDARD_TYPES)
def test_every_type_round_trips(wide_f16_gguf: Path, tmp_path: Path, qtype: str) -> None:
    import llama_cpp

    out = tmp_path / f"wide-{qtype}.gguf"
    r = quantize(wide_f16_gguf, out, qtype)
    assert r.qtype == qtype and out.exists() and r.size_bytes == out.stat().st_size
    assert field(out, "general.file_type") == getattr(llama_cpp, QUANT_TYPES[qtype])
    types = weights(tensor_types(out))
    # widths are multiples of 256: the type's own tensor type really carries weights
    assert MAIN_TENSOR_TYPE[qtype] in types.values(), types
    if qtype not in ("F16", "BF16"):
        assert r.size_bytes < wide_f16_gguf.stat().st_size
    generates(out)


def test_sizes_follow_the_levels(wide_f16_gguf: Path, tmp_path: Path) -> None:
    sizes = {
        t: quantize(wide_f16_gguf, tmp_path / f"{t}.gguf", t).size_bytes for t in ("Q2_K", "Q4_K_M", "Q8_0")
    }
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"]


@pytest.mark.parametrize("qtype", ["IQ2_XS", "IQ3_M", "IQ4_XS"])
def test_iq_types_with_an_imatrix(
    wide_f16_gguf: Path, wide_imatrix: Path, tmp_path: Path, qtype: str
) -> None:
    out = tmp_path / f"wide-{qtype}.gguf"
    r = quantize(wide_f16_gguf, out, qtype, imatrix=wide_imatrix)
    assert r.imatrix_entries == 7 * WIDE_LAYERS + 1  # q, k, v, o, gate, up, down per block; output
    types = weights(tensor_types(out))
    assert MAIN_TENSOR_TYPE[qtype] in types.values(), types
    assert field(out, "quantize.imatrix.entries_count") == r.imatrix_entries
    generates(out)


def test_imatrix_reader_normalises_by_counts(wide_imatrix: Path) -> None:
    data = load_imatrix(wide_imatrix)
    reader = gguf.GGUFReader(wide_imatrix)
    raw = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    name = "blk.0.attn_q.weight"
    np.testing.assert_allclose(data[name], raw[f"{name}.in_sum2"] / raw[f"{name}.counts"][0], rtol=1e-6)
    assert data[name].shape == (256,)


@pytest.mark.parametrize("qtype", ["IQ2_XS", "IQ4_NL", "Q2_K_S"])
def test_iq_types_without_imatrix_fail_clearly(wide_f16_gguf: Path, tmp_path: Path, qtype: str) -> None:
    with pytest.raises(InputError, match=f"{qtype} needs an importance matrix"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", qtype)
    with pytest.raises(InputError, match="importance matrix"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q4_K_M", tensor_types=["ffn_.*=IQ2_XXS"])
    assert list(tmp_path.iterdir()) == []


def test_bad_types_and_requantize(wide_f16_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown quantization type 'Q9_K'"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q9_K")
    with pytest.raises(InputError, match="file type: a single tensor takes Q4_K"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q4_K_M", output_type="Q4_K_M")
    q8 = quantize(wide_f16_gguf, tmp_path / "q8.gguf", "Q8_0").path
    with pytest.raises(InputError, match="already quantized.*--allow-requantize"):
        quantize(q8, tmp_path / "q4.gguf", "Q4_K_M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]
    r = quantize(q8, tmp_path / "q4.gguf", "Q4_K_M", allow_requantize=True)
    assert "Q4_K" in tensor_types(r.path).values()


# --------------------------------------------------------------------------------------------- options


def test_output_and_embedding_types(wide_f16_gguf: Path, tmp_path: Path) -> None:
    out = quantize(
        wide_f16_gguf, tmp_path / "a.gguf", "Q4_K_M", output_type="Q8_0", embedding_type="Q2_K"
    ).path
    types = tensor_types(out)
    assert types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q2_K"
    stock = tensor_types(quantize(wide_f16_gguf, tmp_path / "b.gguf", "Q4_K_M").path)
    assert stock["output.weight"] == "Q6_K" and stock["token_embd.weight"] == "Q4_K"
    generates(out)


def test_leave_output_and_pure(wide_f16_gguf: Path, tmp_path: Path) -> None:
    left = tensor_types(quantize(wide_f16_gguf, tmp_path / "l.gguf", "Q4_K_M", leave_output=True).path)
    assert left["output.weight"] == "F16"
    assert left["blk.0.attn_q.weight"] == "Q4_K"
    stock = weights(tensor_types(quantize(wide_f16_gguf, tmp_path / "s.gguf", "Q4_K_M").path))
    assert "Q6_K" in stock.values()  # the Q4_K_M mixture raises attn_v / ffn_down / output
    pure = weights(tensor_types(quantize(wide_f16_gguf, tmp_path / "p.gguf", "Q4_K_M", pure=True).path))
    assert set(pure.values()) == {"Q4_K"}
    with pytest.raises(InputError, match="contradict"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q4_K_M", leave_output=True, output_type="Q8_0")


# --------------------------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", list(PROFILES))
def test_profiles_store_type_and_context(wide_f16_gguf: Path, tmp_path: Path, name: str) -> None:
    import llama_cpp

    prof = PROFILES[name]
    r = quantize(wide_f16_gguf, tmp_path / "m.gguf", profile=name)
    assert r.qtype == prof.qtype and r.profile == name
    expected_ctx = min(prof.context_length, WIDE_CTX)  # never above the trained context
    assert r.context_length == expected_ctx
    assert field(r.path, "gguf_factory.profile") == name
    assert field(r.path, "gguf_factory.context_length") == expected_ctx
    assert field(r.path, "general.file_type") == getattr(llama_cpp, QUANT_TYPES[prof.qtype])
    if name in ("quality", "mobile"):  # 4096 is above load()'s old default (2048), 1024 below it
        with load(r.path, n_threads=1) as m:
            assert m.n_ctx == expected_ctx


def test_explicit_context_is_used_by_load(wide_f16_gguf: Path, tiny_f16_gguf: Path, tmp_path: Path) -> None:
    # llama.cpp pads a context to a multiple of 256: use multiples so the figures are exact
    r = quantize(wide_f16_gguf, tmp_path / "m.gguf", "Q8_0", context_length=768)
    assert field(r.path, "gguf_factory.context_length") == 768
    with load(r.path, n_threads=1) as m:
        assert m.n_ctx == 768
    with load(r.path, n_ctx=512, n_threads=1) as m:  # an explicit n_ctx still wins
        assert m.n_ctx == 512
    capped = quantize(tiny_f16_gguf, tmp_path / "t.gguf", "Q8_0", context_length=100_000)
    assert capped.context_length == 128 == field(capped.path, "gguf_factory.context_length")  # trained ctx
    plain = quantize(tiny_f16_gguf, tmp_path / "p.gguf", "Q8_0")
    assert field(plain.path, "gguf_factory.context_length") is None
    assert field(plain.path, "general.quantized_by") == "gguf-factory"


def test_explicit_type_wins_over_profile(wide_f16_gguf: Path, tmp_path: Path) -> None:
    r = quantize(wide_f16_gguf, tmp_path / "m.gguf", "Q6_K", profile="mobile")
    assert r.qtype == "Q6_K" and field(r.path, "gguf_factory.profile") == "mobile"
    with pytest.raises(InputError, match="unknown profile 'tiny'"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", profile="tiny")


# --------------------------------------------------------------------------------------------- recipes


def expected_by_rules(types: dict[str, str], rules: list[str]) -> dict[str, str]:
    parsed = [parse_rule(r) for r in rules]
    out = {}
    for name in weights(types):
        rule = next((r for r in parsed if r.matches(name)), None)
        if rule is not None:
            out[name] = rule.type
    return out


def test_tensor_type_rules(wide_f16_gguf: Path, tmp_path: Path) -> None:
    rules = [r"attn_(q|k)\.=Q8_0", "ffn_up=Q5_K", r"blk\.1\.=Q6_K"]
    r = quantize(wide_f16_gguf, tmp_path / "m.gguf", "Q3_K_M", tensor_types=rules)
    types = tensor_types(r.path)
    expected = expected_by_rules(types, rules)
    assert len(expected) == 2 * WIDE_LAYERS + WIDE_LAYERS + 4  # q, k per block; ffn_up; rest of blk.1
    for name, ttype in expected.items():
        assert types[name] == ttype, name
    untouched = {k: v for k, v in weights(types).items() if k not in expected}
    assert untouched and "Q8_0" not in untouched.values()  # the Q3_K_M mixture never picks Q8_0 itself
    assert field(r.path, "gguf_factory.recipe") == "; ".join(rules)
    generates(r.path)


def test_named_recipes(wide_f16_gguf: Path, tmp_path: Path) -> None:
    attn = tensor_types(quantize(wide_f16_gguf, tmp_path / "a.gguf", "Q2_K", recipe="attn-hi").path)
    for name, ttype in weights(attn).items():
        if "attn_" in name:
            assert ttype == "Q6_K", name
        elif "ffn_" in name:
            assert ttype == "Q4_K", name
    edges = tensor_types(quantize(wide_f16_gguf, tmp_path / "e.gguf", "Q4_K_M", recipe="edges-hi").path)
    last = WIDE_LAYERS - 1
    for name, ttype in weights(edges).items():
        if name.startswith(("blk.0.", f"blk.{last}.")):
            assert ttype == "Q5_K", name  # one level above Q4_K
        elif name.startswith("blk."):
            assert ttype in ("Q4_K", "Q6_K"), name  # the stock Q4_K_M mixture
    assert field(tmp_path / "e.gguf", "gguf_factory.recipe") == "edges-hi"


def test_recipe_file(wide_f16_gguf: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "name: mix\n"
        "type: Q3_K_M\n"
        "output_type: Q8_0\n"
        "include: [edges-hi]\n"
        "rules:\n"
        "  - 'attn_v=Q6_K'\n"
        "  - pattern: 'ffn_(up|gate)'\n"
        "    type: Q2_K\n"
    )
    r = quantize(wide_f16_gguf, tmp_path / "m.gguf", recipe=recipe)
    assert r.qtype == "Q3_K_M" and r.recipe == "mix"
    types = tensor_types(r.path)
    assert types["output.weight"] == "Q8_0"
    for i in range(WIDE_LAYERS):  # the file's own rules come first, then edges-hi
        assert types[f"blk.{i}.attn_v.weight"] == "Q6_K"
        assert types[f"blk.{i}.ffn_up.weight"] == types[f"blk.{i}.ffn_gate.weight"] == "Q2_K"
    # edges-hi: first and last blocks one level above Q3_K; the middle keeps the Q3_K_M mixture
    assert types["blk.0.attn_q.weight"] == types[f"blk.{WIDE_LAYERS - 1}.ffn_down.weight"] == "Q4_K"
    assert types["blk.1.attn_q.weight"] == "Q3_K"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("rules: ['attn_(=Q6_K']\n", "bad regex"),
        ("rules: ['attn=Q4_K_M']\n", "rules[0]: tensor type in rule 'attn'"),
        ("rules: ['attn_q']\n", "REGEX=TYPE"),
        ("rule: []\n", "unknown recipe field(s) rule"),
        ("include: [nope]\n", "unknown recipe 'nope'"),
        ("- a\n", "YAML mapping"),
    ],
)
def test_bad_recipe_files(wide_f16_gguf: Path, tmp_path: Path, content: str, needle: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    with pytest.raises(InputError, match="bad.yaml") as err:
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q4_K_M", recipe=recipe)
    assert needle in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def test_rule_matching_nothing_is_an_error(wide_f16_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="matches no tensor.*blk.0."):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q4_K_M", tensor_types=["atention=Q6_K"])
    with pytest.raises(InputError, match="unknown recipe 'fancy'"):
        quantize(wide_f16_gguf, tmp_path / "x.gguf", "Q4_K_M", recipe="fancy")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- eval


def test_eval_reference_against_itself_is_exact(tiny_f16_gguf: Path, tiny_data_dir: Path) -> None:
    r = evaluate(tiny_f16_gguf, tiny_data_dir, ref=tiny_f16_gguf, replies=3, threads=1)
    (m,) = r.models
    assert r.reference is not None and r.n_tokens > 100
    assert m.kld_mean == 0.0 and m.kld_max == 0.0 and m.top1 == 1.0 and m.delta_ppl == 0.0
    assert m.perplexity == r.reference.perplexity > 1.0
    # greedy replies from identical logits are identical
    assert r.n_replies == 3 and m.same_reply == 1.0 and m.reply_similarity == 1.0
    assert m.answer_similarity == r.reference.answer_similarity
    assert len(m.samples) == 3 and all(x["answer"] for x in m.samples)


def test_eval_orders_quantization_levels(tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    q8 = quantize(tiny_f16_gguf, tmp_path / "q8.gguf", "Q8_0").path
    q4 = quantize(tiny_f16_gguf, tmp_path / "q4.gguf", "Q4_0").path
    r = evaluate_many([q8, q4], tiny_data_dir / "test.jsonl", ref=tiny_f16_gguf, threads=1)
    s8, s4 = r.models
    assert 0.0 < s8.kld_mean < s4.kld_mean
    assert s4.kld_p99 >= s4.kld_mean and s4.kld_max >= s4.kld_p99
    assert s4.top1 <= s8.top1 <= 1.0 and s4.top1 > 0.5
    assert abs(s4.delta_ppl) > abs(s8.delta_ppl)
    assert r.n_replies == 0 and s4.reply_similarity is None
    md, js = write_report(r, tmp_path / "report.md")
    assert md.name == "report.md" and js.name == "report.json"
    doc = json.loads(js.read_text())
    assert doc["models"][1]["kld_mean"] == s4.kld_mean and doc["n_tokens"] == r.n_tokens
    assert "| q4 |" in md.read_text() and "top-1" in md.read_text()


def test_eval_perplexity_matches_transformers(
    tiny_hf_model: Path, tiny_f32_gguf: Path, tiny_data_dir: Path
) -> None:
    """Our assistant-token perplexity from llama.cpp logits = the training loss's masking run in torch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gguf_factory.data import read_chat_file
    from gguf_factory.train.loop import IGNORE_INDEX, as_messages, encode_conversation

    r = evaluate(tiny_f32_gguf, tiny_data_dir, ref=None, threads=1)
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    for conv in read_chat_file(tiny_data_dir / "test.jsonl").conversations:
        ex = encode_conversation(tok, as_messages(conv), 10_000)
        if ex is None:
            continue
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor(ex.labels)
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = labels[1:]
        mask = tgt != IGNORE_INDEX
        total -= float(lp[mask].gather(1, tgt[mask][:, None]).sum())
        count += int(mask.sum())
    assert count == r.n_tokens
    assert math.isclose(r.models[0].perplexity, math.exp(total / count), rel_tol=2e-3)


def test_eval_bad_inputs(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"q\.jsonl:1: no assistant turn"):
        evaluate(tiny_f16_gguf, no_answers)
    with pytest.raises(InputError, match="no test.jsonl"):
        evaluate(tiny_f16_gguf, tmp_path)
    with pytest.raises(InputError, match="reference model not found"):
        evaluate(tiny_f16_gguf, no_answers, ref=tmp_path / "missing.gguf")


def test_eval_other_weights_same_tokenizer(
    tiny_f16_gguf: Path, wide_f16_gguf: Path, tiny_data_dir: Path
) -> None:
    # an untrained model with the same tokenizer is far from the trained one, and much worse at the data
    r = evaluate(wide_f16_gguf, tiny_data_dir, ref=tiny_f16_gguf, limit=3, threads=1)
    (m,) = r.models
    assert r.n_conversations == 3 and m.kld_mean > 0.1 and m.top1 < 0.5
    assert m.perplexity > r.reference.perplexity


# --------------------------------------------------------------------------------------------- ladder


def test_ladder_table_and_plot(tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ladder"
    r = ladder(tiny_f16_gguf, out, data=tiny_data_dir, types=["Q2_K", "Q4_K_M", "Q8_0"], threads=1)
    assert [x.qtype for x in r.rungs] == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert r.reference.qtype == "F16" and r.reference.kld_mean == 0.0
    for rung in r.rungs:
        assert Path(rung.path).is_file() and 0.0 < rung.reduction < 1.0
        assert rung.kld_mean is not None and rung.kld_mean > 0.0 and rung.perplexity is not None
    bpw = [x.bits_per_weight for x in sorted(r.rungs, key=lambda x: x.size_bytes)]
    assert bpw == sorted(bpw) and bpw[-1] < r.reference.bits_per_weight
    # the tiny model's 64-wide tensors make Q2_K fall back to a 32-block type: visible in the table
    assert "Q2_K" not in r.rungs[0].tensor_types
    doc = json.loads((out / "ladder.json").read_text())
    assert [x["qtype"] for x in doc["rungs"]] == ["Q2_K", "Q4_K_M", "Q8_0"]
    md = (out / "ladder.md").read_text()
    for col in ("bits/weight", "reduction %", "ΔPPL %", "mean KLD", "top-1 %"):
        assert col in md
    assert r.plot_path is not None and r.plot_path.is_file()
    head = r.plot_path.read_bytes()[:8]
    assert head.startswith(b"\x89PNG") and r.plot_path.suffix == ".png"
    assert r.non_monotone == monotonicity_problems(r.rungs)


def test_ladder_sizes_only_and_reuse(wide_f16_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "l"
    r = ladder(wide_f16_gguf, out, types=["Q3_K_M", "Q6_K"], threads=1)
    assert r.evaluation is None and r.plot_path is None and r.non_monotone == []
    q3, q6 = r.rungs
    assert q3.tensor_types.get("Q3_K") and q6.tensor_types.get("Q6_K")  # 256-wide: no fallback
    assert 3.0 < q3.bits_per_weight < q6.bits_per_weight < 7.0
    assert q3.reduction > q6.reduction > 0.5
    stamp = Path(q6.path).stat().st_mtime_ns
    ladder(wide_f16_gguf, out, types=["Q6_K"], reuse=True)
    assert Path(q6.path).stat().st_mtime_ns == stamp
    ladder(wide_f16_gguf, out, types=["Q6_K"])
    assert Path(q6.path).stat().st_mtime_ns != stamp
    with pytest.raises(InputError, match="already quantized"):
        ladder(q6.path, tmp_path / "again")
    with pytest.raises(InputError, match="duplicate"):
        ladder(wide_f16_gguf, out, types=["Q4_K_M", "q4_k_m"])


def test_monotonicity_flags() -> None:
    def rung(t: str, size: int, kld: float, ppl: float) -> Rung:
        return Rung(t, t, size, 0.0, 0.0, {}, perplexity=ppl, kld_mean=kld)

    good = [rung("Q2_K", 10, 0.3, 12.0), rung("Q4_K_M", 20, 0.1, 11.0), rung("Q8_0", 40, 0.01, 10.5)]
    assert monotonicity_problems(good) == []
    bad = [rung("Q2_K", 10, 0.3, 12.0), rung("Q3_K_M", 15, 0.35, 11.5), rung("Q8_0", 40, 0.01, 10.5)]
    (problem,) = monotonicity_problems(bad)
    assert problem.startswith("Q3_K_M") and "kld_mean" in problem and "Q2_K" in problem


# --------------------------------------------------------------------------------------------- CLI


def test_cli_quantize_eval(
    wide_f16_gguf: Path, tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    proc = run_cli(
        "quantize", str(wide_f16_gguf), "-o", str(out), "--profile", "mobile",
        "--tensor-type", "attn_v=Q8_0", "--output-type", "Q6_K", "--pure",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "profile mobile, ctx 1024" in " ".join(proc.stdout.split())
    types = tensor_types(out)
    assert types["blk.2.attn_v.weight"] == "Q8_0" and types["output.weight"] == "Q6_K"
    assert types["blk.2.ffn_up.weight"] == "Q2_K"

    proc = run_cli("quantize", str(wide_f16_gguf), "-o", str(tmp_path / "x.gguf"), "-t", "IQ2_XXS")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "importance matrix" in proc.stderr
    assert not (tmp_path / "x.gguf").exists()

    report = tmp_path / "rep"
    proc = run_cli(
        "eval", str(tiny_f16_gguf), "--ref", str(tiny_f16_gguf), "--data", str(tiny_data_dir),
        "--limit", "4", "-o", str(report), "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "rep.json").read_text())["n_conversations"] == 4
    assert "mean KLD" in proc.stdout
