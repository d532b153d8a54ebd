"""Doctor: the safe reader, inspect and validate on a real tiny GGUF and a corpus of corrupted copies.

The corpus (tests/corrupt_corpus.py) holds one defect per file; validate must name exactly that defect
(plus its declared consequences), never crash, never hang, and stay inside a 2 GiB address space.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from gguf_factory.doctor import GGUFFormatError, Severity, inspect_gguf, read_gguf, validate
from gguf_factory.doctor.template import check_template
from gguf_factory.doctor.validate import CATALOG, check_metadata, check_structure

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import run_cli
from corrupt_corpus import CASES, make_corpus  # noqa: E402

CASE_IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def corpus(tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tiny_f16_gguf, tmp_path_factory.mktemp("corpus"))


def test_corpus_covers_enough_kinds() -> None:
    kinds = {c.expect for c in CASES}
    assert len(kinds) >= 25
    assert kinds <= set(CATALOG)
    assert {c.kind for c in CASES} == {"structure", "metadata", "data", "template"}


def test_reader_matches_gguf_py_on_valid_file(tiny_f16_gguf: Path) -> None:
    ours = read_gguf(tiny_f16_gguf)
    ref = gguf.GGUFReader(tiny_f16_gguf)
    assert not ours.issues
    assert [kv.key for kv in ours.kvs] == [k for k in ref.fields if not k.startswith("GGUF.")]
    assert ours.data_offset == ref.data_offset
    by_name = {t.name: t for t in ref.tensors}
    assert len(ours.tensors) == len(by_name)
    for t in ours.tensors:
        r = by_name[t.name]
        assert list(t.dims) == [int(d) for d in r.shape]
        assert t.type == r.tensor_type
        assert ours.data_offset + t.offset == r.data_offset
        assert t.n_bytes == r.n_bytes
    assert ours.get("tokenizer.ggml.tokens") == ref.fields["tokenizer.ggml.tokens"].contents()


def test_clean_file_validates_clean_with_llama_cpp_smoke(tiny_f16_gguf: Path) -> None:
    r = validate(tiny_f16_gguf)
    assert r.findings == [], r.findings
    assert r.exit_code == 0
    assert r.smoke is not None and r.smoke.ok, r.smoke
    assert len(r.smoke.replies) == 3
    assert r.checked_tensors == len(read_gguf(tiny_f16_gguf).tensors)


@pytest.mark.slow
def test_smoke_prompts_through_the_files_chat_template(
    tiny_f16_gguf: Path, tiny_hf_model: Path, tmp_path: Path
) -> None:
    """The smoke replies are llama.cpp's greedy continuation of the chat-templated prompt (rendered here
    independently by transformers); without a template the raw text is used."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from corrupt_corpus import load_model, serialize
    from gguf_factory.doctor.smoke import SMOKE_PROMPTS, smoke_test

    r = smoke_test(tiny_f16_gguf, max_tokens=8)
    assert r.ok and r.chat_template, r
    prompt = AutoTokenizer.from_pretrained(tiny_hf_model).apply_chat_template(
        [{"role": "user", "content": SMOKE_PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    llm = Llama(model_path=str(tiny_f16_gguf), n_ctx=256, n_threads=2, n_batch=64, verbose=False, seed=1)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        assert llm.detokenize(tokens[:2], special=True).startswith(b"<|im_start|>user")  # one special token
        expected = llm.create_completion(tokens, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    assert r.replies[0] == expected

    m = load_model(tiny_f16_gguf)
    m.drop_kv("tokenizer.chat_template")
    bare = tmp_path / "no-template.gguf"
    bare.write_bytes(serialize(m))
    r = smoke_test(bare, max_tokens=8)
    assert r.ok and not r.chat_template and "no chat template" in r.template_note, r


def test_reserialized_corpus_base_is_clean(corpus: dict[str, Path]) -> None:
    r = validate(corpus["clean"], smoke=False)
    assert r.at_least(Severity.WARNING) == [], r.findings
    assert r.exit_code == 0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_validate_names_the_defect(case, corpus: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    r = validate(corpus[case.name], smoke=False)
    codes = {f.code for f in r.at_least(Severity.WARNING)}
    assert case.expect in codes, [(f.code, f.message) for f in r.findings]
    assert codes <= {case.expect} | case.also, [(f.code, f.message) for f in r.findings]
    assert r.unusable == case.unusable
    assert r.exit_code == (2 if case.unusable else 1)
    for f in r.findings:
        assert f.message and f.severity == CATALOG[f.code][0]


def test_fatal_defects_raise_only_our_error(corpus: dict[str, Path]) -> None:
    for case in CASES:
        if case.unusable:
            with pytest.raises(GGUFFormatError) as e:
                read_gguf(corpus[case.name])
            assert e.value.code == case.expect
            assert str(corpus[case.name]) in str(e.value)
        else:
            read_gguf(corpus[case.name])


def test_corpus_under_2gib_address_space(corpus: dict[str, Path]) -> None:
    """Every corpus file validated in a child limited to 2 GiB of address space and 60 s of CPU."""
    script = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (60, 60))\n"
        "from gguf_factory.doctor import validate\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    r = validate(p, smoke=False, template_timeout=1.0)\n"
        "    out[p] = [r.exit_code, sorted({f.code for f in r.findings})]\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(p) for p in corpus.values()]
    proc = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out[str(corpus["clean"])][0] == 0
    for case in CASES:
        exit_code, codes = out[str(corpus[case.name])]
        assert case.expect in codes, (case.name, codes)
        assert exit_code == (2 if case.unusable else 1)


def test_random_mutations_raise_only_our_errors(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    """A short fuzz run (the long one is benchmarks/doctor_fuzz.py): byte flips, truncations, insertions."""
    base = tiny_f16_gguf.read_bytes()
    rng = random.Random(1234)
    target = tmp_path / "m.gguf"
    outcomes = {"parsed": 0, "rejected": 0}
    for i in range(400):
        data = bytearray(base)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(min(len(data), 16384))] = rng.randrange(256)
        elif kind == 1:
            del data[rng.randrange(len(data)) :]
        elif kind == 2:
            pos = rng.randrange(min(len(data), 16384))
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            pos = rng.randrange(0, 24)
            data[pos : pos + 8] = rng.randbytes(8)
        target.write_bytes(bytes(data))
        try:
            g = read_gguf(target)
        except GGUFFormatError as e:
            assert e.code in CATALOG
            outcomes["rejected"] += 1
            continue
        check_structure(g)
        check_metadata(g)
        outcomes["parsed"] += 1
    assert outcomes["parsed"] > 0 and outcomes["rejected"] > 0, outcomes


def test_template_sandbox_checks() -> None:
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    assert check_template(chatml) == []
    refuses_system = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert check_template(refuses_system) == []  # retried without a system message
    escapes = [
        "{{ cycler.__init__.__globals__.os }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages['__class__'] }}",
        "{{ joiner|attr('__init__') }}",
    ]
    for t in escapes:
        assert [p.code for p in check_template(t)] == ["template-unsafe"], t
    huge = "{% for m in messages %}{{ m.content }}{% endfor %}{{ 'x' * 10**10 }}"
    assert [p.code for p in check_template(huge)] == ["template-render-error"]


def test_inspect_reports_real_figures(tiny_f16_gguf: Path) -> None:
    r = inspect_gguf(tiny_f16_gguf, ctx=1024)
    ref = gguf.GGUFReader(tiny_f16_gguf)
    assert r.architecture == "llama"
    assert len(r.tensors) == len(ref.tensors)
    assert r.n_params == sum(int(t.n_elements) for t in ref.tensors)
    assert r.tensor_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert 16.0 <= r.bits_per_weight < 17.0  # F16 matrices, a few F32 norms
    assert r.type_counts == {"F16": 15, "F32": 5}
    assert sum(g["n_bytes"] for g in r.groups.values()) == r.tensor_bytes
    assert set(r.groups) == {"embedding", "attention", "ffn", "norm"}
    assert r.hparams["block_count"] == 2 and r.hparams["embedding_length"] == 64
    assert r.tokenizer["n_tokens"] == 512 and r.tokenizer["special"]["eos"]["text"] == "<|im_end|>"
    assert r.chat_template and "im_start" in r.chat_template
    (mem,) = r.memory
    # 2 layers x 1024 positions x (2 KV heads x 16 + 2 x 16) x 2 bytes (f16)
    assert mem.kv_cache_bytes == 2 * 1024 * (32 + 32) * 2
    assert mem.total_bytes == r.tensor_bytes + mem.kv_cache_bytes


def test_cli_inspect_and_validate(tiny_f16_gguf: Path, corpus: dict[str, Path]) -> None:
    proc = run_cli("inspect", str(tiny_f16_gguf), "--json", "--ctx", "512")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["architecture"] == "llama" and d["memory"][0]["n_ctx"] == 512
    assert d["metadata"]["tokenizer.ggml.tokens"]["count"] == 512

    proc = run_cli("inspect", str(tiny_f16_gguf))
    assert proc.returncode == 0 and "bits per weight" in proc.stdout and "KV cache" in proc.stdout

    proc = run_cli("validate", str(corpus["clean"]), "--no-smoke")
    assert proc.returncode == 0, proc.stdout
    proc = run_cli("validate", str(corpus["nan"]), "--json")
    assert proc.returncode == 1
    d = json.loads(proc.stdout)
    assert [f["code"] for f in d["findings"] if f["severity"] != "info"] == ["tensor-nan"]
    proc = run_cli("validate", str(corpus["bad-magic"]))
    assert proc.returncode == 2 and "bad-magic" in proc.stdout

    proc = run_cli("inspect", str(corpus["huge-kv-count"]))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = run_cli("validate", str(corpus["clean"].parent / "missing.gguf"))
    assert proc.returncode == 2 and "missing.gguf" in proc.stderr


@pytest.mark.slow
def test_repair_fixes_what_it_can_and_refuses_the_rest(corpus: dict[str, Path], tmp_path: Path) -> None:
    from gguf_factory.doctor.repair import RepairError, repair

    repaired: list[str] = []
    for case in CASES:
        src = corpus[case.name]
        original = src.read_bytes()
        out = tmp_path / f"{case.name}.gguf"
        if case.repairable:
            r = repair(src, out)
            assert r.after.exit_code == 0, (case.name, r.remaining)
            assert case.expect in r.fixed and r.actions, case.name
            repaired.append(str(out))
        else:
            try:
                r = repair(src, out)
            except RepairError as e:
                assert str(src) in str(e)
                assert not out.exists()
            else:  # only warning-level defects are left in place
                assert r.after.exit_code == 1 and case.expect in r.after.codes, case.name
        assert src.read_bytes() == original
    assert len(repaired) >= 20
    # llama.cpp loads every repaired file and produces finite logits (one child process for all of them)
    script = (
        "import json, sys\n"
        "from gguf_factory.doctor.smoke import _run_in_child\n"
        "print(json.dumps({p: _run_in_child(p, 4, 128)['ok'] for p in sys.argv[1:]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *repaired], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {p: True for p in repaired}


@pytest.mark.slow
def test_repair_cli_template_replacement_and_no_overwrite(corpus: dict[str, Path], tmp_path: Path) -> None:
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    out = tmp_path / "fixed.gguf"
    proc = run_cli(
        "repair", str(corpus["malicious-template"]), "-o", str(out), "--chat-template", str(chatml)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_gguf(out).get("tokenizer.chat_template") == chatml.read_text()
    assert "smoke test: loaded" in proc.stdout

    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ cycler.__init__.__globals__ }}")
    bad_out = tmp_path / "x.gguf"
    src = corpus["malicious-template"]
    proc = run_cli("repair", str(src), "-o", str(bad_out), "--chat-template", str(evil))
    assert proc.returncode == 2 and "template" in proc.stderr and not bad_out.exists()

    src = corpus["eos-out-of-range"]
    before = src.read_bytes()
    proc = run_cli("repair", str(src), "-o", str(src))
    assert proc.returncode == 2 and "over the input" in proc.stderr
    assert src.read_bytes() == before
    proc = run_cli("repair", str(corpus["truncated-data"]), "-o", str(tmp_path / "t.gguf"))
    assert proc.returncode == 2 and "data-truncated" in proc.stderr


def test_smoke_test_catches_what_static_checks_only_warn_about(corpus: dict[str, Path]) -> None:
    """A 1e6 norm weight is only a warning statically; llama.cpp then yields non-finite logits."""
    r = validate(corpus["extreme-values"])
    assert r.smoke is not None and not r.smoke.ok
    assert {f.code for f in r.at_least(Severity.WARNING)} == {"tensor-extreme-values", "smoke-bad-logits"}
    assert r.exit_code == 1


@pytest.mark.slow
def test_quantized_file_data_checked_through_dequantization(tiny_f32_gguf: Path, tmp_path: Path) -> None:
    """A K-quant mix from llama.cpp's quantizer validates clean; a NaN block scale is found."""
    import numpy as np

    from gguf_factory.quantize import quantize

    q = tmp_path / "tiny-Q4_K_M.gguf"
    quantize(tiny_f32_gguf, q, "Q4_K_M")
    r = validate(q)
    assert r.exit_code == 0, r.findings
    assert r.checked_tensors == len(read_gguf(q).tensors)
    assert r.smoke is not None and r.smoke.ok

    g = read_gguf(q)
    t = next(t for t in g.tensors if t.type == gguf.GGMLQuantizationType.Q8_0)
    data = bytearray(q.read_bytes())
    scale_at = g.data_offset + t.offset  # a Q8_0 block starts with its f16 scale
    data[scale_at : scale_at + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    bad = tmp_path / "nan-scale.gguf"
    bad.write_bytes(bytes(data))
    r = validate(bad, smoke=False)
    assert [(f.code, f.subject) for f in r.at_least(Severity.WARNING)] == [("tensor-nan", t.name)]


def test_big_endian_file_is_read_and_flagged(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.add_tensor("output_norm.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = read_gguf(path)
    assert g.byte_order == ">" and g.get("llama.block_count") == 1 and g.tensors[0].dims == (8,)
    from gguf_factory.doctor.validate import tensor_stats

    assert tensor_stats(g, g.tensors[0]).absmax == 7.0
    assert "big-endian" in validate(path, smoke=False).codes


@pytest.mark.slow
def test_every_key_with_every_wrong_type_is_reported_not_raised(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    """Type confusion: each key/value of the real file re-typed as each other kind of value."""
    from corrupt_corpus import VT, load_model, serialize
    from gguf_factory.doctor.repair import RepairError, repair

    base = load_model(tiny_f16_gguf)
    replacements = [
        (VT.UINT8, 7, None),
        (VT.INT32, -1, None),
        (VT.FLOAT32, 1.5, None),
        (VT.BOOL, True, None),
        (VT.STRING, "x", None),
        (VT.ARRAY, [1, 2, 3], VT.UINT8),
        (VT.ARRAY, ["a", "b"], VT.STRING),
    ]
    target = tmp_path / "t.gguf"
    n = 0
    for i, kv in enumerate(base.kvs):
        for vt, value, sub in replacements:
            if kv.type == vt and kv.subtype == sub:
                continue
            saved = (kv.type, kv.value, kv.subtype)
            kv.type, kv.value, kv.subtype = vt, value, sub
            target.write_bytes(serialize(base))
            kv.type, kv.value, kv.subtype = saved
            g = read_gguf(target)
            check_structure(g)
            check_metadata(g)
            inspect_gguf(target).to_dict()
            if (i + n) % 7 == 0:  # the whole validate (template in a child) and repair on a sample
                validate(target, smoke=False)
                try:
                    repair(target, tmp_path / "fixed.gguf")
                except RepairError:
                    pass
            n += 1
    assert n > 150


def test_repair_rebuilds_damaged_tensors_from_a_source_gguf(corpus: dict[str, Path], tmp_path: Path) -> None:
    from gguf_factory.doctor.reader import tensor_data
    from gguf_factory.doctor.repair import RepairError, repair

    good = read_gguf(corpus["clean"])
    for name in ("nan", "all-zero", "truncated-data", "overlapping-tensors", "offset-out-of-bounds"):
        out = tmp_path / f"{name}.gguf"
        r = repair(corpus[name], out, source=corpus["clean"], smoke=name == "truncated-data")
        assert r.after.exit_code == 0, (name, r.remaining)
        assert any("rebuilt tensor" in a for a in r.actions)
        fixed = read_gguf(out)
        for t in good.tensors:  # every tensor now holds the good bytes
            a, b = tensor_data(good, t), tensor_data(fixed, fixed.tensor(t.name))
            assert a is not None and b is not None and bytes(a) == bytes(b), (name, t.name)
    with pytest.raises(RepairError, match="even with the source"):
        repair(corpus["missing-tensor"], tmp_path / "x.gguf", source=corpus["clean"])
    with pytest.raises(RepairError, match="no tensor of that name"):
        # the cut-off last tensor is output_norm.weight, which has five dimensions in that source
        repair(corpus["truncated-data"], tmp_path / "y.gguf", source=corpus["too-many-dims"])


def _damage(src: Path, dst: Path, tensor: str, fill: bytes) -> None:
    """``dst``: a copy of ``src`` with ``tensor``'s data overwritten by repeats of ``fill``."""
    g = read_gguf(src)
    t = g.tensor(tensor)
    assert t is not None and t.n_bytes
    data = bytearray(src.read_bytes())
    start = g.data_offset + t.offset
    data[start : start + t.n_bytes] = fill * (t.n_bytes // len(fill))
    dst.write_bytes(bytes(data))


def _same_tensor_bytes(a: Path, b: Path) -> None:
    from gguf_factory.doctor.reader import tensor_data

    ga, gb = read_gguf(a), read_gguf(b)
    assert [t.name for t in ga.tensors] == [t.name for t in gb.tensors]
    for t in ga.tensors:
        x, y = tensor_data(ga, t), tensor_data(gb, gb.tensor(t.name))
        assert x is not None and y is not None and bytes(x) == bytes(y), t.name


@pytest.mark.slow
def test_repair_rebuilds_damaged_tensors_from_a_hf_folder(
    corpus: dict[str, Path], tiny_hf_model: Path, tmp_path: Path
) -> None:
    """F16 file, NaN / all-zero / truncated tensors: --source HF_DIR converts the folder with our converter
    into a temporary GGUF, and the rebuilt file holds exactly the undamaged file's bytes."""
    from gguf_factory.doctor.repair import repair

    for name in ("nan", "all-zero", "truncated-data"):
        out = tmp_path / f"{name}.gguf"
        assert validate(corpus[name], smoke=False).exit_code != 0
        r = repair(corpus[name], out, source=tiny_hf_model, smoke=name == "nan")
        assert r.after.exit_code == 0, (name, r.remaining)
        assert any("rebuilt tensor" in a for a in r.actions), r.actions
        _same_tensor_bytes(corpus["clean"], out)
        if name == "nan":
            assert r.after.smoke is not None and r.after.smoke.ok and r.after.smoke.chat_template
            clean = validate(corpus["clean"])
            assert clean.smoke is not None and r.after.smoke.replies == clean.smoke.replies
    # the temporary conversions beside the output are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-zero.gguf", "nan.gguf", "truncated-data.gguf"]


@pytest.mark.slow
def test_repair_rebuilds_quantized_tensors_from_a_hf_folder(
    tiny_f32_gguf: Path, tiny_hf_model: Path, tmp_path: Path
) -> None:
    """Q4_0 file from llama.cpp's quantizer with a zeroed tensor: rebuilt through F32 + the quantizer."""
    from gguf_factory.quantize import quantize

    good = tmp_path / "tiny-Q4_0.gguf"
    quantize(tiny_f32_gguf, good, "Q4_0", threads=2)
    assert read_gguf(good).tensor("blk.1.ffn_down.weight").type == gguf.GGMLQuantizationType.Q4_0
    bad = tmp_path / "zeroed.gguf"
    _damage(good, bad, "blk.1.ffn_down.weight", b"\0")
    assert [f.code for f in validate(bad, smoke=False).at_least(Severity.WARNING)] == ["tensor-all-zero"]
    out = tmp_path / "fixed.gguf"
    r = run_cli("repair", bad, "-o", out, "--source", tiny_hf_model)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rebuilt tensor 'blk.1.ffn_down.weight'" in r.stdout
    _same_tensor_bytes(good, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.gguf", "tiny-Q4_0.gguf", "zeroed.gguf"]


def test_repair_from_a_hf_folder_refuses_another_model(
    corpus: dict[str, Path], tiny_hf_model: Path, tmp_path: Path
) -> None:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from gguf_factory.doctor.repair import RepairError, repair

    not_hf = tmp_path / "not-hf"
    not_hf.mkdir()
    with pytest.raises(RepairError, match="not a Hugging Face model folder"):
        repair(corpus["nan"], tmp_path / "a.gguf", source=not_hf)

    other = tmp_path / "other-hf"  # same tokenizer, narrower FFN: blk.0.ffn_up.weight has another shape
    config = LlamaConfig.from_pretrained(tiny_hf_model)
    config.intermediate_size = 96
    LlamaForCausalLM(config).save_pretrained(other)
    for f in tiny_hf_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, other / f.name)
    with pytest.raises(RepairError, match=r"blk\.0\.ffn_up\.weight.*F16 \[64, 96\].*F16 \[64, 128\]"):
        repair(corpus["nan"], tmp_path / "b.gguf", source=other)
    assert not (tmp_path / "b.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-hf", "other-hf"]
