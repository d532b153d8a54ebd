"""Auto-quant on the trained tiny chat model, through llama.cpp: budgets met, measured, reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.autoquant import Option, TensorCosts, autoquant, solve
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
        candidates=CANDIDATES, threads=2, progress=False,
    )  # fmt: skip
    assert r.size_bytes <= budget and r.path.stat().st_size == r.size_bytes
    written = read_gguf_info(r.path).tensor_types
    assert {n: written[n] for n in r.types} == r.types
    assert set(r.types.values()) <= {"Q2_K", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0"}  # Q5_K falls back to Q5_1
    assert r.probes == len(r.types) and r.kld_mean >= 0
    # the model the measurements predicted is the model measured (within 50 %)
    assert abs(r.kld_predicted - r.kld_mean) <= 0.5 * r.kld_mean + 1e-9
    # on the held-out test conversations (not used to choose), lower KLD than the stock preset
    ev = evaluate_many([stock_q4, r.path], tiny_data_dir, ref=tiny_f16_gguf, threads=2)
    stock, auto = ev.models
    assert auto.kld_mean < stock.kld_mean, (auto.kld_mean, stock.kld_mean)
    # llama.cpp runs it, and the recipe it wrote reproduces it type for type
    with load(r.path) as m:
        assert m.generate("user\nhello", max_tokens=4, temperature=0.0) is not None
    again = quantize(tiny_f16_gguf, tmp_path / "again.gguf", recipe=r.recipe_path, imatrix=imatrix_file)
    assert {n: read_gguf_info(again.path).tensor_types[n] for n in r.types} == r.types
    assert "auto size" in (again.recipe or "")


def test_kld_budget_gives_a_smaller_file_within_the_cap(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, tmp_path: Path
) -> None:
    from gguf_factory.evaluate import KLDScorer

    q8 = quantize(tiny_f16_gguf, tmp_path / "q8.gguf", "Q8_0")
    smallest = quantize(tiny_f16_gguf, tmp_path / "nl.gguf", "IQ4_NL", pure=True, imatrix=imatrix_file)
    scorer = KLDScorer(tiny_f16_gguf, tiny_data_dir / "val.jsonl", threads=2)
    cap = scorer.score(smallest.path).kld_mean / 2  # the smallest mixture is over it, Q8_0 far under
    r = autoquant(
        tiny_f16_gguf, tmp_path / "auto.gguf", data=tiny_data_dir, max_kld=cap, imatrix=imatrix_file,
        candidates=CANDIDATES, threads=2, progress=False,
    )  # fmt: skip
    assert r.kld_mean <= cap
    assert smallest.size_bytes < r.size_bytes < q8.size_bytes
    assert len(set(r.types.values())) >= 2  # a real mixture, not one preset


def test_impossible_budgets_are_refused_and_nothing_is_written(
    tiny_f16_gguf: Path, tiny_data_dir: Path, imatrix_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "auto.gguf"
    with pytest.raises(InputError, match="impossible.*smallest mixture"):
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
        assert m.generate("user\nhi", max_tokens=2, temperature=0.0) is not None
