"""Auto-quant on the trained tiny chat model, through llama.cpp: budgets met, measured, reproducible."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from generation_checks import assert_generates
from gguf_factory.autoquant import (
    AutoQuantizer,
    Option,
    TensorCosts,
    autoquant,
    probe_groups,
    size_bounds,
    solve,
)
from gguf_factory.errors import InputError
from gguf_factory.evaluate import evaluate_many
from gguf_factory.quantize import quantize, read_gguf_info
from gguf_factory.runtime import load

pytestmark = pytest.mark.slow

# fewer candidates keep the test quick; the 64-wide tiny model only takes 32-block types anyway
CANDIDATES = ("Q2_K", "IQ4_NL", "Q5_0", "Q5_K", "Q8_0")


@pytest.fixture(scope="module")
def imatrix_file(tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_factory.imatrix import compute_imatrix

    out = tmp_path_factory.mktemp("aq") / "tiny.imatrix.gguf"
    compute_imatrix(tiny_f16_gguf, tiny_data_dir, out, threads=2)
    return out


@pytest.fixture(scope="module")
def stock_q4(tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize(tiny_f16_gguf, tmp_path_factory.mktemp("aq") / "stock-Q4_K_M.gguf", "Q4_K_M").path


def test_size_budget_beats_the_stock_preset_on_held_out_data(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, stock_q4: Path, tmp_path: Path
) -> None:
    budget = stock_q4.stat().st_size
    r = autoquant(
        tiny_f16_gguf, tmp_path / "auto.gguf", data=tiny_data_dir, max_size=budget, imatrix=imatrix_file,
        candidates=CANDIDATES, threads=2, progress=False, mode="exhaustive",
    )  # fmt: skip
    assert r.size_bytes <= budget and r.path.stat().st_size == r.size_bytes
    # llama.cpp's largest preset within the budget, built with the same importance matrix, was measured
    # too, and the mixture beat it
    assert r.stock is not None and r.stock["size_bytes"] <= budget and not r.stock["chosen"], r.stock
    assert r.kld_mean < r.stock["kld_mean"] and r.stock["mixture_kld"] == r.kld_mean
    written = read_gguf_info(r.path).tensor_types
    assert {n: written[n] for n in r.types} == r.types
    assert set(r.types.values()) <= {"Q2_K", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0"}  # Q5_K falls back to Q5_1
    assert r.mode == "exhaustive" and r.probes == len(r.types) and r.kld_mean >= 0
    # the model the measurements predicted is the model measured (within 50 %)
    assert abs(r.kld_predicted - r.kld_mean) <= 0.5 * r.kld_mean + 1e-9
    # on the held-out test conversations (not used to choose), lower KLD than the stock preset
    ev = evaluate_many([stock_q4, r.path], tiny_data_dir, ref=tiny_f16_gguf, threads=2)
    stock, auto = ev.models
    assert auto.kld_mean < stock.kld_mean, (auto.kld_mean, stock.kld_mean)
    # llama.cpp runs it, and the recipe it wrote reproduces it type for type
    with load(r.path) as m:
        assert_generates(m, "user\nhello", max_tokens=4)
    again = quantize(tiny_f16_gguf, tmp_path / "again.gguf", recipe=r.recipe_path, imatrix=imatrix_file)
    assert {n: read_gguf_info(again.path).tensor_types[n] for n in r.types} == r.types
    assert "auto size" in (again.recipe or "")


def test_fast_mode_shares_probes_and_still_beats_the_stock_preset(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, stock_q4: Path, tmp_path: Path
) -> None:
    """One band: every role's tensors share one probe (the tiny model has 2 blocks: 7 roles + the 2 tensors
    outside the blocks), measured on fewer conversations than the proof."""
    budget = stock_q4.stat().st_size
    with AutoQuantizer(
        tiny_f16_gguf, data=tiny_data_dir, imatrix=imatrix_file, candidates=CANDIDATES, threads=2,
        progress=False, work_dir=tmp_path, bands=1, probe_conversations=8,
    ) as aq:  # fmt: skip
        r = aq.build(tmp_path / "fast.gguf", max_size=budget)
        roles = {re.sub(r"^blk\.\d+\.", "", n) for n in r.types}
        assert r.mode == "fast" and r.probes == len(roles) < len(r.types)
        assert r.probe_tokens < r.calibration_tokens
        # members of a group share the KLD per unit of error, not the error: their choices may differ
        by_role: dict[str, set[float]] = {}
        for tc in aq.tensors:
            by_role.setdefault(re.sub(r"^blk\.\d+\.", "", tc.name), set()).add(tc.sensitivity)
        assert all(len(s) == 1 for s in by_role.values())
        # every candidate's whole-model KLD was measured; exactly the dominated ones (another measured lower
        # at no more bytes) were left out
        kld, size = aq.candidate_klds, aq.candidate_sizes
        assert set(kld) == set(size) and len(kld) >= 3 and all(k >= 0 for k in kld.values())
        beaten = {c: [d for d in kld if d != c and size[d] <= size[c] and kld[d] < kld[c]] for c in kld}
        dominated = {c for c, by in beaten.items() if by and c != "Q8_0"}
        assert {n.split()[1] for n in r.notes if n.startswith("candidate ")} == dominated
    assert r.size_bytes <= budget and r.path.stat().st_size == r.size_bytes
    ev = evaluate_many([stock_q4, r.path], tiny_data_dir, ref=tiny_f16_gguf, threads=2)
    stock, auto = ev.models
    assert auto.kld_mean < stock.kld_mean, (auto.kld_mean, stock.kld_mean)


def test_a_mixture_worse_than_the_preset_is_not_written(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, stock_q4: Path, tmp_path: Path
) -> None:
    """The sensitivity model can be wrong (it extrapolates each probe linearly); the measured rival catches
    it. Here it is made wrong on purpose: every sensitivity zeroed, so the solver sees no cost in the
    smallest types and fills the budget's bytes with nothing useful; the preset measures lower and is
    written instead, with a recipe that reproduces it."""
    budget = stock_q4.stat().st_size
    with AutoQuantizer(
        tiny_f16_gguf, data=tiny_data_dir, imatrix=imatrix_file, candidates=CANDIDATES, threads=2,
        progress=False, work_dir=tmp_path, bands=1, probe_conversations=8,
    ) as aq:  # fmt: skip
        for tc in aq.tensors:
            tc.sensitivity = 0.0
        r = aq.build(tmp_path / "blind.gguf", max_size=budget)
    assert r.stock is not None and r.stock["chosen"], r.stock
    assert r.kld_mean == r.stock["kld_mean"] < r.stock["mixture_kld"]
    assert r.size_bytes == r.stock["size_bytes"] <= budget == stock_q4.stat().st_size
    assert any(r.stock["ftype"] in note and "written instead" in note for note in r.notes)
    written = read_gguf_info(r.path).tensor_types
    assert {n: written[n] for n in r.types} == r.types
    again = quantize(tiny_f16_gguf, tmp_path / "again.gguf", recipe=r.recipe_path, imatrix=imatrix_file)
    assert {n: read_gguf_info(again.path).tensor_types[n] for n in r.types} == r.types
    with load(r.path) as m:
        assert_generates(m, "user\nhello", max_tokens=4)


def test_probe_groups_of_a_30_layer_llama() -> None:
    """SmolLM2-135M's names: 7 roles x 3 depth bands + token_embd = 22 probes instead of 211."""
    roles = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = ["token_embd.weight"] + [f"blk.{i}.{r}.weight" for i in range(30) for r in roles]
    opt = Option("Q8_0", 1, 0.0)
    tensors = [TensorCosts(n, [opt], opt) for n in names]
    groups = probe_groups(tensors)
    assert len(groups) == 22 and sorted(i for g in groups for i in g) == list(range(len(names)))
    for g in groups:  # one role, consecutive layers of one band
        members = [names[i] for i in g]
        assert len({re.sub(r"^blk\.\d+\.", "", n) for n in members}) == 1
        layers = sorted(int(n.split(".")[1]) for n in members if n.startswith("blk."))
        assert (
            layers == list(range(layers[0], layers[-1] + 1)) if layers else members == ["token_embd.weight"]
        )
    assert {len(g) for g in groups} == {1, 10}
    assert len(probe_groups(tensors, "exhaustive")) == len(names)


def test_size_bounds_are_exact_enough_to_decide(
    tiny_f16_gguf: Path, imatrix_file: Path, tmp_path: Path
) -> None:
    """From llama.cpp's dry runs and the shapes alone: the smallest mixture, within the header's few added
    keys of the file llama.cpp writes with every tensor at its smallest type."""
    b = size_bounds(tiny_f16_gguf, CANDIDATES)
    smallest: dict[str, str] = {}
    for types in b.written.values():
        for name, t in types.items():
            if t not in ("F32", "F16") and (name not in smallest or _bytes(t) < _bytes(smallest[name])):
                smallest[name] = t
    assert len(smallest) == b.tensors and b.narrow == b.tensors  # 64-wide rows: no 256-value block fits
    assert b.narrow_floor_bpw == 4.5  # IQ4_NL (Q2_K falls back to Q4_0, same size)
    made = quantize(
        tiny_f16_gguf, tmp_path / "smallest.gguf", "Q8_0", pure=True, imatrix=imatrix_file,
        tensor_types=[f"^{re.escape(n)}$={t}" for n, t in smallest.items()],
    )  # fmt: skip
    assert b.smallest <= made.size_bytes <= b.smallest + 1024, (b.smallest, made.size_bytes)
    assert b.smallest < b.largest <= tiny_f16_gguf.stat().st_size


def _bytes(t: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    return size / block


def test_smollm2_cannot_go_under_its_smallest_mixture() -> None:
    """SmolLM2-135M (30 blocks, 576-wide rows): only ffn_down's 1536-wide rows take K-quants; the other
    241 tensors take no block type below 4.5 bits/weight, so about 70 MB is the floor."""
    from gguf_factory.bases import named_base

    b = size_bounds(named_base("smollm2-135m-instruct").gguf_path())
    assert b.tensors == 211 and b.narrow == 181 and b.narrow_floor_bpw == 4.5
    assert 65e6 < b.smallest < 72e6 and b.largest > 140e6
    why = b.refusal(50_000_000)
    assert why is not None and "impossible" in why and "4.5 bits/weight" in why and "\n" not in why
    assert b.refusal(b.smallest) is None


def test_impossible_budgets_are_refused_and_nothing_is_written(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "auto.gguf"
    # refused from the shapes, before measuring: the reason names the narrow rows
    with pytest.raises(InputError, match=r"impossible.*smallest mixture.*rows no 256-value block fits"):
        autoquant(
            tiny_f16_gguf, out, data=tiny_data_dir, max_size="10KB", imatrix=imatrix_file,
            candidates=CANDIDATES, threads=2, progress=False,
        )  # fmt: skip
    with pytest.raises(InputError, match="impossible.*Q8_0"):
        autoquant(
            tiny_f16_gguf, out, data=tiny_data_dir, max_kld=1e-15, imatrix=imatrix_file,
            candidates=("Q8_0",), threads=2, progress=False,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_inputs(tiny_f16_gguf: Path, tiny_data_dir: Path, stock_q4: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(InputError, match="already quantized"):
        autoquant(stock_q4, out, data=tiny_data_dir, max_size="1MB", progress=False)
    with pytest.raises(InputError, match="needs a budget"):
        autoquant(tiny_f16_gguf, out, data=tiny_data_dir, progress=False)
    with pytest.raises(InputError, match="cannot read 'fifty' as a size"):
        autoquant(tiny_f16_gguf, out, data=tiny_data_dir, max_size="fifty", progress=False)
    with pytest.raises(InputError, match="not found"):
        autoquant(tiny_f16_gguf, out, data=tmp_path / "nowhere", max_size="1MB", progress=False)
    with pytest.raises(InputError, match="IQ2_XS need an importance matrix"):
        autoquant(
            tiny_f16_gguf, out, data=tiny_data_dir, max_size="1MB", imatrix=None, candidates=("IQ2_XS",),
            progress=False,
        )  # fmt: skip
    assert not out.exists()


def test_solver_spends_bytes_where_kld_drops_most() -> None:
    """Two tensors, one 100x more sensitive: under a budget for one upgrade, that one gets it."""
    lo, hi = Option("Q2_K", 100, 10.0), Option("Q8_0", 300, 0.0)
    a = TensorCosts("a", [lo, hi], hi, sensitivity=1.0)
    b = TensorCosts("b", [lo, hi], hi, sensitivity=100.0)
    c = solve([a, b], fixed=0, align=1, kld_top=0.0, max_size=400)
    assert c is not None and [o.type for o in c.picks] == ["Q2_K", "Q8_0"] and c.nbytes == 400
    assert solve([a, b], fixed=0, align=1, kld_top=0.0, max_size=199) is None
    c = solve([a, b], fixed=0, align=1, kld_top=0.0, max_kld=50.0)  # a may go down (10), b may not (1000)
    assert c is not None and [o.type for o in c.picks] == ["Q2_K", "Q8_0"]


def test_cli(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, stock_q4: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli-auto.gguf"
    budget = str(stock_q4.stat().st_size)
    proc = run_cli(
        "quantize", tiny_f16_gguf, "-o", out, "--max-size", budget, "--data", tiny_data_dir,
        "--imatrix", imatrix_file, "--candidates", "IQ4_NL,Q5_0,Q8_0", "--threads", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size <= int(budget)
    assert "mean KLD" in proc.stdout and out.with_suffix(".recipe.yaml").is_file()
    proc = run_cli(
        "quantize", tiny_f16_gguf, "-o", tmp_path / "y.gguf", "--max-size", "1MB", "--type", "Q4_K_M"
    )
    assert_one_line_error(proc, "drop --type")
    proc = run_cli("quantize", tiny_f16_gguf, "-o", tmp_path / "y.gguf", "--max-size", "1MB")
    assert_one_line_error(proc, "--data")


def test_quantize_with_data_computes_an_importance_matrix(
    tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """`--data` stands in for `--imatrix`: types that need one work, and the file says where it came from."""
    from gguf_factory.doctor.reader import read_gguf

    r = quantize(tiny_f16_gguf, tmp_path / "iq.gguf", "IQ2_XS", data=tiny_data_dir, profile="mobile")
    meta = read_gguf(r.path).metadata
    assert meta["quantize.imatrix.entries_count"].value == r.imatrix_entries > 0
    assert meta["quantize.imatrix.dataset"].value == tiny_data_dir.name
    assert meta["gguf_factory.profile"].value == "mobile"
    with load(r.path) as m:
        assert_generates(m, "user\nhi", max_tokens=2)
