"""merge: exact cat/svd against PEFT and dense algebra, identity, the published sparsifying methods, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.adapter import Adapter
from lora_tools.builder import AdapterBuilder
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.merge import METHODS, get_method, register
from lora_tools.merge.run import merge_adapters
from tests.conftest import REALDATA, make_peft_adapter, requires_realdata, tiny_llama
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft


def memory_adapter(modules: dict[str, tuple[int, int, int, float]], seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Adapter:
    """PEFT-format adapter in memory: {name: (out, in, r, scale)}."""
    gen = torch.Generator().manual_seed(seed)
    builder = AdapterBuilder("peft", Path(f"mem-{seed}"))
    for name, (out, inp, rank, scale) in modules.items():
        B = torch.randn(out, rank, generator=gen, dtype=torch.float64)
        A = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
        builder.add_module(name, "linear", B, A, scale=scale, alpha=scale * rank, dtype=dtype)
    return builder.build()


def dense_sum(adapters: list[Adapter], weights: list[float], name: str) -> torch.Tensor:
    return sum(w * a.delta_weight(name, torch.float64) for a, w in zip(adapters, weights, strict=True)
               if name in a.modules)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


# --- exact methods ---------------------------------------------------------------------------------------------


def test_cat_equals_peft_add_weighted_adapter_cat(tmp_path: Path) -> None:
    from peft import PeftModel

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path_a, _ = make_peft_adapter(tmp_path / "a", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path_b, _ = make_peft_adapter(tmp_path / "b", "llama", r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    weights = [0.7, -0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), str(path_a), adapter_name="a")
        model.load_adapter(str(path_b), adapter_name="b")
        model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="cat")
    result = merge_adapters([load_adapter(path_a), load_adapter(path_b)], "cat", weights=weights)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "get_delta_weight")}
    assert set(result.adapter.modules) == set(layers)
    for name, layer in layers.items():
        reference = layer.get_delta_weight("merged").double()
        merged = result.adapter.delta_weight(name, torch.float64)
        assert rel(merged, reference) < 1e-6
        assert result.adapter.modules[name].rank == 6 and result.adapter.modules[name].scale == 1.0
    assert result.report["max_rel_error"] < 1e-6


def test_cat_merges_disjoint_modules_ranks_and_scales(tmp_path: Path) -> None:
    a = load_adapter(write_peft(tmp_path / "a", lora_tensors({"m.q": (8, 6, 2), "m.v": (8, 6, 2)}, seed=1), r=2,
                                lora_alpha=4, alpha_pattern={"v": 6}, use_rslora=True))
    b = load_adapter(write_peft(tmp_path / "b", lora_tensors({"m.q": (8, 6, 3), "m.k": (8, 6, 3)}, seed=2), r=3,
                                lora_alpha=5))
    result = merge_adapters([a, b], "cat", weights="2,0.5")
    rows = {r["name"]: r for r in result.report["modules"]}
    assert rows["m.q"]["ranks_in"] == [2, 3] and rows["m.q"]["rank_out"] == 5
    assert rows["m.v"]["ranks_in"] == [2, None] and rows["m.k"]["ranks_in"] == [None, 3]
    for name in ("m.q", "m.v", "m.k"):
        assert rel(result.adapter.delta_weight(name, torch.float64), dense_sum([a, b], [2, 0.5], name)) < 1e-6
        assert rows[name]["rel_error"] < 1e-6
    assert any("only some adapters" in w for w in result.report["warnings"])
    # Written and read back as PEFT: the scale 1 per module survives.
    save_adapter(result.adapter, tmp_path / "out")
    back = load_adapter(tmp_path / "out")
    for name in ("m.q", "m.v", "m.k"):
        assert back.modules[name].scale == pytest.approx(1.0)
        assert torch.equal(back.delta_weight(name), result.adapter.delta_weight(name))


@pytest.mark.parametrize("selector", [{"rank": 3}, {"energy": 0.9}])
def test_svd_equals_dense_svd_of_the_weighted_sum(selector: dict) -> None:
    a = memory_adapter({"q": (40, 30, 4, 2.0), "k": (20, 50, 4, 0.5)}, seed=1, dtype=torch.float64)
    b = memory_adapter({"q": (40, 30, 3, 0.25), "k": (20, 50, 2, 1.0)}, seed=2, dtype=torch.float64)
    weights = [0.6, -1.3]
    result = merge_adapters([a, b], "svd", weights=weights, **selector)
    for row in result.report["modules"]:
        total = dense_sum([a, b], weights, row["name"])
        U, S, Vh = torch.linalg.svd(total)
        energy = torch.cumsum(S.square(), 0) / S.square().sum()
        k = selector.get("rank") or int((energy < 0.9 - 1e-12).sum()) + 1
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        merged = result.adapter.delta_weight(row["name"], torch.float64)
        assert row["rank_out"] == k
        assert rel(merged, best) < 1e-10
        dense_error = float(torch.sqrt(S[k:].square().sum() / S.square().sum()))
        assert row["rel_error"] == pytest.approx(dense_error, rel=1e-8, abs=1e-12)


modules_strategy = st.dictionaries(
    st.sampled_from(["a.q", "a.k", "b.v"]),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5),
              st.floats(0.1, 8.0, allow_nan=False)),
    min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(modules=modules_strategy, seed=st.integers(0, 1000), method=st.sampled_from(["cat", "svd"]))
def test_merging_one_adapter_with_weight_one_reproduces_it(modules: dict, seed: int, method: str) -> None:
    adapter = memory_adapter(modules, seed=seed)
    rank = max(r for _, _, r, _ in modules.values())
    result = merge_adapters([adapter], method, **({"rank": rank} if method == "svd" else {}))
    for name in modules:
        original = adapter.delta_weight(name, torch.float64)
        merged = result.adapter.delta_weight(name, torch.float64)
        assert torch.allclose(merged, original, rtol=0, atol=1e-5 * float(original.abs().max()) + 1e-30)
        assert result.adapter.modules[name].rank <= adapter.modules[name].rank


def test_rank1_topk_reports_its_error_next_to_svd() -> None:
    a = memory_adapter({"q": (30, 20, 4, 1.0)}, seed=3, dtype=torch.float64)
    b = memory_adapter({"q": (30, 20, 2, 1.0)}, seed=4, dtype=torch.float64)
    topk = merge_adapters([a, b], "rank1-topk")
    svd = merge_adapters([a, b], "svd", rank=3)
    row, svd_row = topk.report["modules"][0], svd.report["modules"][0]
    assert row["rank_out"] == 3  # (4 + 2) / 2
    assert row["svd_error_at_rank"] == pytest.approx(svd_row["rel_error"], rel=1e-6)
    assert row["rel_error"] >= svd_row["rel_error"] - 1e-12  # Eckart–Young: svd is the best at that rank
    assert 0.0 < row["pooled_energy_kept"] <= 1.0
    # With every component kept, rank1-topk is the exact sum.
    full = merge_adapters([a, b], "rank1-topk", rank=6)
    assert full.report["modules"][0]["rel_error"] < 1e-6


# --- the published sparsifying methods, against straightforward dense references ---------------------------


def top_fraction(x: torch.Tensor, density: float) -> torch.Tensor:
    count = max(1, int(torch.ceil(torch.tensor(density * x.numel()))))
    threshold = x.abs().flatten().sort(descending=True).values[count - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def test_ties_and_magnitude_match_dense_references() -> None:
    a = memory_adapter({"q": (6, 5, 2, 1.0)}, seed=5, dtype=torch.float64)
    b = memory_adapter({"q": (6, 5, 3, 2.0)}, seed=6, dtype=torch.float64)
    weights, density = [1.0, 0.5], 0.4
    tasks = [w * x.delta_weight("q", torch.float64) for x, w in zip([a, b], weights, strict=True)]
    trimmed = [top_fraction(t, density) for t in tasks]
    elected = torch.sign(trimmed[0] + trimmed[1])
    kept = [torch.where((torch.sign(t) == elected) & (t != 0), t, torch.zeros_like(t)) for t in trimmed]
    counts = sum((k != 0).double() for k in kept).clamp_min(1)
    ties_reference = (kept[0] + kept[1]) / counts
    magnitude_reference = trimmed[0] + trimmed[1]
    for method, reference in (("ties", ties_reference), ("magnitude", magnitude_reference)):
        # Rank 5 = min(out, in): the final SVD keeps everything, so the merged update is the method's own.
        result = merge_adapters([a, b], method, weights=weights, density=density, rank=5)
        assert rel(result.adapter.delta_weight("q", torch.float64), reference) < 1e-10
        assert "TIES" in result.report["reference"] or "magnitude" in result.report["reference"]


def test_dare_is_deterministic_per_seed_and_unbiased_at_density_one() -> None:
    a = memory_adapter({"q": (10, 8, 2, 1.0)}, seed=7, dtype=torch.float64)
    b = memory_adapter({"q": (10, 8, 2, 1.0)}, seed=8, dtype=torch.float64)
    first = merge_adapters([a, b], "dare", density=0.5, seed=3, rank=8)
    again = merge_adapters([a, b], "dare", density=0.5, seed=3, rank=8)
    other = merge_adapters([a, b], "dare", density=0.5, seed=4, rank=8)
    delta = first.adapter.delta_weight("q", torch.float64)
    assert torch.equal(delta, again.adapter.delta_weight("q", torch.float64))
    assert not torch.allclose(delta, other.adapter.delta_weight("q", torch.float64))
    full = merge_adapters([a, b], "dare", density=1.0, rank=8)
    assert rel(full.adapter.delta_weight("q", torch.float64), dense_sum([a, b], [1, 1], "q")) < 1e-10
    assert any("dense" in w for w in first.report["warnings"])


def test_interference_of_identical_and_negated_inputs() -> None:
    a = memory_adapter({"q": (12, 9, 3, 1.0)}, seed=9, dtype=torch.float64)
    result = merge_adapters([a, a], "cat", weights=[1.0, -1.0])
    row = result.report["modules"][0]
    assert row["max_abs_cosine"] == pytest.approx(1.0)
    assert row["max_subspace_overlap"] == pytest.approx(1.0)
    assert row["rel_error"] == 0.0 or row["rel_error"] < 1e-6  # Σ is 0: nothing to be wrong about


def test_registry_refuses_duplicates_and_lists_methods() -> None:
    assert {"cat", "svd", "ties", "dare", "magnitude", "rank1-topk"} <= set(get_method("cat") and METHODS)
    with pytest.raises(ValueError, match="already registered"):
        register("cat", reference="x", exact=True, dense=False, summary="x")(lambda terms, options: None)
    with pytest.raises(InvalidOptionError, match="cat, svd"):
        get_method("average")


def test_different_base_shapes_are_refused() -> None:
    a = memory_adapter({"q": (8, 6, 2, 1.0)}, seed=1)
    b = memory_adapter({"q": (8, 7, 2, 1.0)}, seed=2)
    with pytest.raises(ModuleMismatchError, match=r"module q: .*\[8, 6\].*\[8, 7\]"):
        merge_adapters([a, b], "cat")


# --- CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture
def two_adapters(tmp_path: Path) -> tuple[Path, Path]:
    a = write_peft(tmp_path / "a", lora_tensors({"model.q_proj": (8, 6, 2)}, seed=1), r=2, lora_alpha=4)
    b = write_peft(tmp_path / "b", lora_tensors({"model.q_proj": (8, 6, 4)}, seed=2), r=4, lora_alpha=4)
    return a, b


def test_cli_merge_svd_json_and_kohya_output(tmp_path: Path, two_adapters: tuple[Path, Path]) -> None:
    a, b = two_adapters
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", str(a), str(b), "-o", str(out), "--method", "svd", "--rank", "3",
                     "--weights", "0.5,0.5", "--to", "kohya", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "svd" and report["modules"][0]["rank_out"] == 3
    merged = load_adapter(out)
    assert merged.format == "kohya" and merged.modules["lora_model_q_proj"].rank == 3
    table = run_cli("merge", str(a), str(b), "-o", str(tmp_path / "cat"))
    assert table.exit_code == 0 and "rel. error" in table.stdout and "max |cos|" in table.stdout


@pytest.mark.parametrize(("args", "fragments"), [
    (["--weights", "1,2,3"], ["--weights has 3", "2 adapter(s)"]),
    (["--method", "ties", "--density", "0"], ["--density must lie in (0, 1]"]),
    (["--method", "dare", "--density", "1.5"], ["--density must lie in (0, 1]"]),
    (["--method", "average"], ["unknown merge method 'average'", "cat, svd"]),
    (["--rank", "2"], ["cat is exact"]),
])
def test_cli_merge_bad_options(tmp_path: Path, two_adapters: tuple[Path, Path], args: list[str],
                               fragments: list[str]) -> None:
    a, b = two_adapters
    out = tmp_path / "out"
    assert_one_line_error(run_cli("merge", str(a), str(b), "-o", str(out), *args), *fragments)
    assert not out.exists()


def test_cli_merge_refuses_other_base_shapes_and_existing_output(tmp_path: Path,
                                                                 two_adapters: tuple[Path, Path]) -> None:
    a, b = two_adapters
    c = write_peft(tmp_path / "c", lora_tensors({"model.q_proj": (8, 5, 2)}, seed=3), r=2)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("merge", str(a), str(c), "-o", str(out)), "model.q_proj", "[8, 6]", "[8, 5]")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_one_line_error(run_cli("merge", str(a), str(b), "-o", str(out)), "already exists", "--force")
    assert (out / "keep.txt").exists()
    assert run_cli("merge", str(a), str(b), "-o", str(out), "--force").exit_code == 0


@requires_realdata("sd-lora-timohavdk", "new.safetensors")
def test_cross_format_merge_and_similarity_align_the_real_pair() -> None:
    from lora_tools.similarity import similarity

    pair = REALDATA / "sd-lora-timohavdk"
    kohya, diffusers = load_adapter(pair / "new.safetensors"), load_adapter(pair / "2100-lora.safetensors")
    # The hand-made kohya copy (doubled lora_unet_unet_ prefix) and the diffusers original name the same modules.
    result = merge_adapters([kohya, diffusers], "cat", weights=[0.25, 0.75])
    assert result.report["num_modules"] == 128
    assert all(row["ranks_in"] == [4, 4] and row["max_abs_cosine"] == pytest.approx(1.0)
               for row in result.report["modules"])
    name = next(iter(kohya.modules))
    assert rel(result.adapter.delta_weight(name, torch.float64), kohya.delta_weight(name, torch.float64)) < 1e-6
    report = similarity(kohya, diffusers, grids=False)
    assert report["num_common"] == 128 and report["only_in_a"] == 0
    assert all(row["cosine"] == pytest.approx(1.0) for row in report["modules"])
