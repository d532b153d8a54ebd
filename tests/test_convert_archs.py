"""convert for GPT-2, Qwen2, Phi-3, Gemma 2, Gemma 3 and the MoE / fused-QKV layouts: what each converter
writes (tensor layouts, keys), long-context rope, bad inputs, and the user-facing `verify` on each.

The checkpoints are tests/model_builders.py's (tiny random weights from transformers' config classes,
tokenizer.json in the family's real layout); the parity of every family (tokenizer, greedy, top-1 F32/F16)
is tests/test_convert_families.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from gguf_factory.convert import convert
from gguf_factory.errors import ConversionError, ModelError
from model_builders import BUILDERS as FAMILY_BUILDERS
from model_builders import (
    CHAT_PROMPTS,
    ENGLISH,
    QWEN2_REGEX,
    SPM_SPACE,
    build,
)

ARCHS = ["gpt2", "qwen2", "phi3", "gemma2", "gemma3"]
# name -> builder into an existing folder (for other test modules, e.g. test_verify_lora)
BUILDERS: dict[str, Callable[[Path], None]] = {a: FAMILY_BUILDERS[a].build for a in ARCHS}


@dataclass
class Built:
    hf_dir: Path
    f32: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    cache: dict[str, Built] = {}

    def get(arch: str) -> Built:
        if arch not in cache:
            hf_dir = build(arch, tmp_path_factory.mktemp(arch) / f"tiny-{arch}")
            f32 = hf_dir.parent / f"tiny-{arch}-F32.gguf"
            r = convert(hf_dir, f32, outtype="f32")
            assert r.path == f32 and f32.is_file()
            cache[arch] = Built(hf_dir, f32)
        return cache[arch]

    return get


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return {n: f.contents() for n, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---------------------------------------------------------------------------------------------------
# What each converter writes (layouts that the parity in test_convert_families depends on)
# ---------------------------------------------------------------------------------------------------


def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def gguf_array(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])


@pytest.mark.slow
def test_gpt2_layout(built: Callable[[str], Built]) -> None:
    b = built("gpt2")
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == 256
    assert fields["gpt2.feed_forward_length"] == 4 * 64
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert "position_embd.weight" in tensors and "blk.0.attn_norm.bias" in tensors
    # Conv1D [in, out] -> [out, in]
    c_attn = hf["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (64, 3 * 64)
    assert np.array_equal(gguf_array(tensors["blk.0.attn_qkv.weight"]), c_attn.T)
    assert np.array_equal(gguf_array(tensors["blk.0.ffn_up.weight"]), hf["transformer.h.0.mlp.c_fc.weight"].T)


@pytest.mark.slow
def test_qwen2_layout(built: Callable[[str], Built]) -> None:
    b = built("qwen2")
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert "output.weight" not in tensors  # tie_word_embeddings
    # NEOX rope in both engines: Q/K rows (and their biases) are not permuted
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"):
        ours = gguf_array(tensors[f"blk.0.attn_{name[0]}.{name.split('.')[1]}"])
        assert np.array_equal(ours, hf[f"model.layers.0.self_attn.{name}"]), name


@pytest.mark.slow
def test_phi3_layout_and_spm_vocab(built: Callable[[str], Built]) -> None:
    from tokenizers import Tokenizer

    b = built("phi3")
    fields, tensors = read_gguf(b.f32)
    tok = Tokenizer.from_file(str(b.hf_dir / "tokenizer.json"))
    assert fields["general.architecture"] == "phi3"
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [64, 64 + 2 * 32]  # fused Q, K, V (GQA)
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [64, 2 * 128]  # fused gate, up
    assert "output.weight" in tensors
    assert fields["phi3.rope.dimension_count"] == 16
    # SentencePiece-style vocabulary
    assert fields["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in fields and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.unknown_token_id"] == 0
    types, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.scores"]
    assert types[tok.token_to_id("<0x0A>")] == gguf.TokenType.BYTE
    assert types[0] == gguf.TokenType.UNKNOWN
    assert types[tok.token_to_id("<|end|>")] == gguf.TokenType.CONTROL
    assert types[tok.token_to_id(SPM_SPACE + "the")] == gguf.TokenType.NORMAL
    # merged earlier = higher score
    assert scores[tok.token_to_id(SPM_SPACE + "t")] > scores[tok.token_to_id(SPM_SPACE + "the")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_layout(built: Callable[[str], Built], arch: str) -> None:
    b = built(arch)
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    assert fields["general.architecture"] == arch
    # RMSNorm x * (1 + w): written as w + 1
    for hf_name, name in [
        ("model.norm.weight", "output_norm.weight"),
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
        ("model.layers.0.pre_feedforward_layernorm.weight", "blk.0.ffn_norm.weight"),
        ("model.layers.0.post_feedforward_layernorm.weight", "blk.0.post_ffw_norm.weight"),
    ]:
        assert np.allclose(gguf_array(tensors[name]), hf[hf_name] + 1.0, atol=1e-6), name
    # attention scale: transformers 24 ** -0.5, llama.cpp head_dim (16) ** -0.5 -> the ratio is folded in
    ratio = (16 / 24) ** 0.5
    if arch == "gemma2":
        q = gguf_array(tensors["blk.0.attn_q.weight"])
        assert np.allclose(q, hf["model.layers.0.self_attn.q_proj.weight"] * ratio, atol=1e-6)
        assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(5.0)
        assert fields["gemma2.attention.sliding_window_pattern"] == [True, False]
    else:
        qn = gguf_array(tensors["blk.0.attn_q_norm.weight"])
        assert np.allclose(qn, (hf["model.layers.0.self_attn.q_norm.weight"] + 1.0) * ratio, atol=1e-6)
        kn = gguf_array(tensors["blk.0.attn_k_norm.weight"])
        assert np.allclose(kn, hf["model.layers.0.self_attn.k_norm.weight"] + 1.0, atol=1e-6)
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(10000.0)
    assert fields[f"{arch}.final_logit_softcapping"] == pytest.approx(30.0)
    assert fields[f"{arch}.attention.sliding_window"] == 8
    assert fields[f"{arch}.attention.key_length"] == 16
    assert "output.weight" not in tensors
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 2


@pytest.mark.slow
def test_phi3_longrope(built: Callable[[str], Built], tmp_path: Path) -> None:
    """Phi-3.5-style longrope: short factors up to the original context, long ones past it, in both
    engines (llama.cpp picks by context size, transformers by sequence length)."""
    from gguf_factory.verify import check_logit_agreement

    rng = np.random.default_rng(0)
    short, long = rng.uniform(1.0, 2.0, 8).tolist(), rng.uniform(2.0, 8.0, 8).tolist()

    def edit(c: dict[str, Any]) -> None:
        c.update(original_max_position_embeddings=256, max_position_embeddings=1024)
        c["rope_parameters"] = {
            **(c.get("rope_parameters") or {}),
            "rope_type": "longrope",
            "short_factor": short,
            "long_factor": long,
            "original_max_position_embeddings": 256,
        }

    m = _copy(built("phi3").hf_dir, tmp_path / "tiny-phi3")
    _edit_json(m / "config.json", edit)
    out = tmp_path / "longrope.gguf"
    convert(m, out, outtype="f32")
    fields, tensors = read_gguf(out)
    assert np.allclose(gguf_array(tensors["rope_factors_short.weight"]), short)
    assert np.allclose(gguf_array(tensors["rope_factors_long.weight"]), long)
    assert fields["phi3.rope.scaling.original_context_length"] == 256
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(256)) ** 0.5)
    # short prompts: llama.cpp's context (padded to 256) stays within the original one -> short factors
    assert check_logit_agreement(out, m, CHAT_PROMPTS[:3]).ok
    # a 265-token prompt: past the original context in both engines -> long factors
    assert check_logit_agreement(out, m, [" ".join(ENGLISH[:14])]).ok


# ---------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the file, nothing written
# ---------------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.slow
def test_bad_inputs(built: Callable[[str], Built], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"

    # a byte-fallback tokenizer without its <0xXX> tokens
    m = _copy(built("phi3").hf_dir, tmp_path / "no-bytes")
    _edit_json(m / "tokenizer.json", lambda tj: tj["model"]["vocab"].pop("<0x41>"))
    with pytest.raises(ConversionError, match=r"tokenizer.json.*byte tokens are missing.*<0x41>"):
        convert(m, out)

    # a normalizer llama.cpp cannot reproduce
    m = _copy(built("gemma2").hf_dir, tmp_path / "lowercase")
    _edit_json(m / "tokenizer.json", lambda tj: tj.update(normalizer={"type": "Lowercase"}))
    with pytest.raises(ConversionError, match=r"tokenizer.json.*Lowercase.*no llama.cpp equivalent"):
        convert(m, out)

    # a tokenizer model llama.cpp has no equivalent for (WordPiece) is refused, naming the model type
    m = _copy(built("gemma2").hf_dir, tmp_path / "wordpiece")
    _edit_json(m / "tokenizer.json", lambda tj: tj.update(model={"type": "WordPiece", "vocab": {"a": 0}}))
    with pytest.raises(ConversionError, match=r"tokenizer.json: unsupported tokenizer.*'WordPiece'"):
        convert(m, out)

    # a split regex llama.cpp does not know: refused, naming the closest known one
    def odd_regex(tj: dict[str, Any]) -> None:
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_REGEX.removesuffix(r"|\s+")

    m = _copy(built("qwen2").hf_dir, tmp_path / "odd-regex")
    _edit_json(m / "tokenizer.json", odd_regex)
    with pytest.raises(
        ConversionError, match=r"tokenizer.json: pre-tokenizer not supported.*closest to .*'qwen2'"
    ):
        convert(m, out)

    # GPT-2 with an activation llama.cpp's gpt2 graph does not have
    m = _copy(built("gpt2").hf_dir, tmp_path / "relu")
    _edit_json(m / "config.json", lambda c: c.update(activation_function="relu"))
    with pytest.raises(ConversionError, match=r"config.json.*activation_function 'relu'"):
        convert(m, out)

    # Phi-3 whose fused gate/up does not match intermediate_size
    m = _copy(built("phi3").hf_dir, tmp_path / "phi-ff")
    _edit_json(m / "config.json", lambda c: c.update(intermediate_size=96))
    with pytest.raises(ConversionError, match=r"gate_up_proj.*expected 2 \* intermediate_size = 192"):
        convert(m, out)

    # Gemma 2 with an untied lm_head (llama.cpp's gemma2 always ties)
    m = _copy(built("gemma2").hf_dir, tmp_path / "untied")
    _edit_json(m / "config.json", lambda c: c.update(tie_word_embeddings=False))
    from safetensors.numpy import load_file, save_file

    state = load_file(str(m / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="tie_word_embeddings=false"):
        convert(m, out)

    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_verify_passes_for_every_architecture(built: Callable[[str], Built], arch: str) -> None:
    """The user-facing `verify` (tokenizer on built-in + 27 languages, greedy, top-1 logits) on each F32."""
    from gguf_factory.verify import verify

    b = built(arch)
    report = verify(b.f32, b.hf_dir, per_language=2, max_prompts=4, max_new_tokens=8, n_threads=1)
    assert report.gguf_type == "F32" and report.min_top1 is not None and report.min_top1 >= 0.999
    assert report.tokenizer.ok and not report.tokenizer.mismatches, report.tokenizer.mismatches[:3]
    assert report.greedy.ok, (arch, report.greedy)
    if arch == "gpt2":
        # llama.cpp's CPU GELU reads an fp16 lookup table (log-softmax off by ~1e-2 even in F32, vs ~1e-4
        # for SiLU models): on this random near-flat model 1 of 124 positions is a near-tie that flips
        assert report.logits.top1_agreement >= 0.99 and report.logits.max_abs_logprob_diff < 0.05
    else:
        assert report.logits.top1_agreement >= 0.999, (arch, report.logits)
        assert report.ok


# ---------------------------------------------------------------------------------------------------
# The newer families: stacked experts, regrouped fused Q/K/V, scalar keys, refusals
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "expert"),
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.{i}.w1.weight"),
        ("qwen2moe", "model.layers.1.mlp.experts.{i}.gate_proj.weight"),
    ],
)
def test_moe_experts_are_stacked(built: Callable[[str], Built], arch: str, expert: str) -> None:
    b = built(arch)
    fields, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)
    prefix = fields["general.architecture"]
    assert fields[f"{prefix}.expert_count"] == 4 and fields[f"{prefix}.expert_used_count"] == 2
    stacked = gguf_array(tensors["blk.1.ffn_gate_exps.weight"])
    assert np.array_equal(stacked, np.stack([hf[expert.format(i=i)] for i in range(4)]))
    assert not any(".experts." in name for name in tensors)
    if arch == "qwen2moe":
        assert fields["qwen2moe.expert_feed_forward_length"] == 64
        assert fields["qwen2moe.expert_shared_feed_forward_length"] == 128
        gate = gguf_array(tensors["blk.0.ffn_gate_inp_shexp.weight"])  # [1, hidden] -> a vector
        assert gate.shape == (64,) and np.array_equal(
            gate, hf["model.layers.0.mlp.shared_expert_gate.weight"][0]
        )
        assert "output.weight" not in hf_tensors(b.hf_dir) or "output.weight" in tensors


@pytest.mark.slow
def test_fused_qkv_regrouped(built: Callable[[str], Built]) -> None:
    """GPT-NeoX keeps q, k, v per head and Falcon per KV group; llama.cpp wants all q, then k, then v."""
    b = built("gptneox")
    _, tensors = read_gguf(b.f32)
    hf = hf_tensors(b.hf_dir)["gpt_neox.layers.0.attention.query_key_value.weight"]
    per_head = hf.reshape(4, 3, 16, 64)
    want = np.concatenate([per_head[:, j].reshape(64, 64) for j in range(3)])
    assert np.array_equal(gguf_array(tensors["blk.0.attn_qkv.weight"]), want)

    b = built("falcon")
    fields, tensors = read_gguf(b.f32)
    assert fields["falcon.attention.head_count_kv"] == 1  # multi_query
    assert fields["falcon.tensor_data_layout"] == "jploski"
    hf = hf_tensors(b.hf_dir)["transformer.h.0.self_attention.query_key_value.weight"]
    assert np.array_equal(gguf_array(tensors["blk.0.attn_qkv.weight"]), hf)  # one group: already q, k, v


@pytest.mark.slow
def test_scalar_keys(built: Callable[[str], Built]) -> None:
    fields, _ = read_gguf(built("granite").f32)
    assert fields["granite.logit_scale"] == pytest.approx(2.0)
    assert fields["granite.residual_scale"] == pytest.approx(0.5)
    assert fields["granite.embedding_scale"] == pytest.approx(3.0)
    assert fields["granite.attention.scale"] == pytest.approx(0.2)
    fields, tensors = read_gguf(built("qwen3").f32)
    assert fields["qwen3.attention.key_length"] == 32 and fields["qwen3.attention.value_length"] == 32
    assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [32]
    fields, _ = read_gguf(built("gptneox").f32)
    assert fields["gptneox.rope.dimension_count"] == 4  # rotary_pct 0.25 of 16
    assert fields["gptneox.use_parallel_residual"] is True
    fields, _ = read_gguf(built("starcoder2").f32)
    assert fields["starcoder2.attention.layer_norm_epsilon"] == pytest.approx(1e-6)  # config: norm_epsilon
    # SmolLM3: bos_token null in tokenizer_config.json, yet tokenizer.json's template inserts
    # <|begin_of_text|>, as transformers does when encoding: llama.cpp must add it too
    smol = built("smollm3")
    fields, _ = read_gguf(smol.f32)
    begin = json.loads((smol.hf_dir / "tokenizer.json").read_text())["added_tokens"][0]
    assert begin["content"] == "<|begin_of_text|>"
    assert fields["tokenizer.ggml.bos_token_id"] == begin["id"]
    assert fields["tokenizer.ggml.add_bos_token"] is True


@pytest.mark.slow
def test_config_refusals(built: Callable[[str], Built], tmp_path: Path) -> None:
    """Configs llama.cpp's graph for the architecture cannot run are refused, naming the file and field."""
    out = tmp_path / "out.gguf"
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "qwen2moe",
            {"norm_topk_prob": True},
            r"norm_topk_prob=true but llama.cpp's qwen2moe always uses false",
        ),
        ("qwen2moe", {"decoder_sparse_step": 2}, r"decoder_sparse_step"),
        ("smollm3", {"no_rope_layers": [1, 1, 1, 1]}, r"no_rope_layers \[1, 1, 1, 1\] differs"),
        ("falcon", {"alibi": True}, r"alibi=true is not supported"),
        ("stablelm", {"qk_layernorm": True}, r"qk_layernorm=true"),
        ("llama3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope scaling 'dynamic'"),
    ]
    for n, (arch, edit, message) in enumerate(cases):
        m = _copy(built(arch).hf_dir, tmp_path / f"{arch}-{n}")
        _edit_json(m / "config.json", lambda c, e=edit: c.update(e))
        with pytest.raises(ConversionError, match=rf"config.json: .*{message}"):
            convert(m, out)
    # a missing expert
    m = _copy(built("mixtral").hf_dir, tmp_path / "missing-expert")
    from safetensors.numpy import load_file, save_file

    state = load_file(str(m / "model.safetensors"))
    del state["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"experts \[0, 1, 2\].*num_experts = 4"):
        convert(m, out)
    assert not out.exists()
