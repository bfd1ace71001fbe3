"""Truncation: rank rules, the global budget, exact outputs, and PEFT itself loading what we write."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_tools.adapter import Adapter
from lora_tools.errors import InvalidOptionError, LoraToolsError, OutputExistsError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.linalg.truncate import (
    allocate_ranks,
    energy_fraction_rank,
    fixed_rank,
    greedy_allocate,
    retained_energy,
    sv_cumulative_rank,
    sv_fro_rank,
    sv_ratio_rank,
)
from lora_tools.truncate import NonFiniteWeightsError, truncate
from tests.conftest import MODEL_FACTORIES, REALDATA, make_peft_adapter, requires_realdata
from tests.helpers import lora_tensors, write_peft

# --- rank rules on spectra ---------------------------------------------------------------------------------

spectra = st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=24).map(
    lambda values: torch.tensor(sorted(values, reverse=True), dtype=torch.float64))
fractions = st.floats(min_value=1e-6, max_value=1.0)


@settings(max_examples=200, deadline=None)
@given(S=spectra, fraction=fractions)
def test_energy_rank_is_the_smallest_rank_meeting_the_fraction(S: torch.Tensor, fraction: float) -> None:
    k = energy_fraction_rank(S, fraction)
    assert 1 <= k <= S.numel()
    total = float(S.square().sum())
    if total > 0:
        assert retained_energy(S, k) >= fraction - 1e-9
        if k > 1:
            assert retained_energy(S, k - 1) < fraction + 1e-9
    # sv_fro is the energy rule on the square of its threshold.
    assert sv_fro_rank(S, math.sqrt(fraction)) == energy_fraction_rank(S, fraction)


@settings(max_examples=200, deadline=None)
@given(S=spectra, a=fractions, b=fractions, ratio=st.floats(min_value=1.0, max_value=1e6))
def test_rank_rules_are_monotone_and_bounded(S: torch.Tensor, a: float, b: float, ratio: float) -> None:
    lo, hi = sorted((a, b))
    for rule in (energy_fraction_rank, sv_fro_rank, sv_cumulative_rank):
        assert 1 <= rule(S, lo) <= rule(S, hi) <= S.numel()
    assert 1 <= sv_ratio_rank(S, ratio) <= sv_ratio_rank(S, ratio * 2) <= S.numel()
    assert retained_energy(S, S.numel()) == 1.0
    assert fixed_rank(S, 10**6) == S.numel()


def kohya_rank(S: torch.Tensor, method: str, target: float) -> int:
    """The rank kohya-ss/sd-scripts networks/resize_lora.py ends with, from its definitions: its ``index_sv_*``
    counts the values needed (clamped to [1, len(S) − 1]) and ``rank_resize`` then adds one."""
    if method == "sv_ratio":
        count = int((S > S[0] / target).sum())
    elif method == "sv_fro":
        count = int(torch.searchsorted(torch.cumsum(S.square(), 0) / S.square().sum(), target**2)) + 1
    else:
        count = int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), target)) + 1
    return max(1, min(count, S.numel() - 1)) + 1


@pytest.mark.parametrize(("method", "target", "ours"), [("sv_ratio", 4.0, sv_ratio_rank),
                                                        ("sv_fro", 0.9, sv_fro_rank),
                                                        ("sv_cumulative", 0.6, sv_cumulative_rank)])
def test_dynamic_rules_keep_one_value_less_than_kohya(method: str, target: float, ours: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        S = torch.rand(16, generator=gen, dtype=torch.float64).sort(descending=True).values * 0.9 ** torch.arange(16)
        k = ours(S, target)
        assert kohya_rank(S, method, target) == min(k + 1, S.numel()) if k > 1 else True
        # ...and ours is the smallest rank that meets the criterion.
        if method == "sv_ratio":
            assert bool(S[k - 1] >= S[0] / target) and (k == S.numel() or bool(S[k] < S[0] / target))


def test_rules_on_a_known_spectrum() -> None:
    S = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # σ²: 16, 4, 1, 0 of 21
    assert energy_fraction_rank(S, 16 / 21) == 1
    assert energy_fraction_rank(S, 0.9) == 2
    assert energy_fraction_rank(S, 1.0) == 3
    assert sv_ratio_rank(S, 2.0) == 2  # keeps σ >= 2 (kohya's strict > would keep only 4.0)
    assert sv_cumulative_rank(S, 6 / 7) == 2
    assert energy_fraction_rank(torch.zeros(3, dtype=torch.float64), 0.5) == 1


# --- global budget -----------------------------------------------------------------------------------------


def brute_force(energies: list[torch.Tensor], costs: list[int], budget: int) -> float:
    best = -1.0
    for ranks in itertools.product(*[range(1, e.numel() + 1) for e in energies]):
        if sum(k * c for k, c in zip(ranks, costs, strict=True)) <= budget:
            best = max(best, sum(float(e[:k].sum()) for e, k in zip(energies, ranks, strict=True)))
    return best


def test_budget_allocation_is_optimal_against_exhaustive_search() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        count = 2 + trial % 3
        energies = [torch.rand(int(torch.randint(2, 6, (1,), generator=gen)), generator=gen,
                               dtype=torch.float64).sort(descending=True).values for _ in range(count)]
        costs = [int(c) for c in torch.randint(3, 9, (count,), generator=gen)]
        budget = sum(costs) + int(torch.randint(0, 25, (1,), generator=gen))
        allocation = allocate_ranks(energies, costs, budget)
        assert allocation.method == "exact"
        assert allocation.cost <= budget
        assert allocation.energy == pytest.approx(brute_force(energies, costs, budget), rel=1e-12)
        # With one cost for every module, taking σ² greedily is optimal too (exchange argument).
        same = [costs[0]] * count
        budget = max(budget, sum(same))
        greedy = greedy_allocate(energies, same, budget)
        greedy_energy = sum(float(e[:k].sum()) for e, k in zip(energies, greedy, strict=True))
        assert greedy_energy == pytest.approx(brute_force(energies, same, budget), rel=1e-12)


def test_greedy_per_parameter_is_not_optimal_with_unequal_costs() -> None:
    # Budget 6 + 5 + 10 = 21: greedy takes module 0's second value (6 params, ratio 1.0) first and strands the
    # rest; two values of module 1 (5 params each, ratio 0.98) are worth more. The exact allocation finds that.
    energies = [torch.tensor([10.0, 6.0], dtype=torch.float64), torch.tensor([10.0, 4.9, 4.9], dtype=torch.float64)]
    costs, budget = [6, 5], 21
    greedy = greedy_allocate(energies, costs, budget)
    exact = allocate_ranks(energies, costs, budget)
    assert greedy == [2, 1] and exact.ranks == [1, 3]
    assert exact.energy == pytest.approx(brute_force(energies, costs, budget))
    assert allocate_ranks(energies, costs, budget, max_cells=0).method == "greedy"


# --- PEFT compatibility: PEFT loads what we write and computes the reference truncation ---------------------


def reference_model(model_name: str, adapter: Adapter, new_ranks: dict[str, int]) -> torch.nn.Module:
    """The base model plus the dense-SVD truncation of every module's update (float64, then float32)."""
    model = MODEL_FACTORIES[model_name]()
    with torch.no_grad():
        for name, module in adapter.modules.items():
            B, A = adapter.factors(name, torch.float64)
            U, S, Vh = torch.linalg.svd(module.scale * (B @ A), full_matrices=False)  # dense (out, in)
            k = new_ranks[name]
            approx = (U[:, :k] * S[:k]) @ Vh[:k]
            if module.kind == "conv":
                approx = approx.reshape(module.weight_shape)
            elif module.kind in ("conv1d", "embedding"):
                approx = approx.T
            layer = model.get_submodule(name)
            layer.weight += approx.to(torch.float32)
            if module.bias_key:  # PEFT scales lora_B's bias with the rest of the LoRA branch
                bias = module.scale * adapter.source.get(module.bias_key).to(torch.float32)
                layer.bias = torch.nn.Parameter(bias if layer.bias is None else layer.bias + bias)
    return model


def load_with_peft(model_name: str, folder: Path) -> torch.nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(MODEL_FACTORIES[model_name](), str(folder)).eval()
        result = model.load_adapter(str(folder), adapter_name="again")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()
                or "did not match" in m], messages
    assert not result.missing_keys and not result.unexpected_keys, result
    model.set_adapter("default")
    return model


PEFT_CASES = {
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "r": 8,
                             "lora_alpha": 16}, {"rank": 3}),
    "llama": ("llama", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], "r": 8, "lora_alpha": 16}, {"energy": 0.8}),
    "llama-rslora": ("llama", {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 8, "lora_alpha": 8,
                               "use_rslora": True, "rank_pattern": {"q_proj": 6}}, {"avg_rank": 3}),
    "llama-patterns-bias": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 8,
                                      "lora_alpha": 16, "lora_bias": True,
                                      "rank_pattern": {"layers.0.self_attn.q_proj": 4, "v_proj": 6},
                                      "alpha_pattern": {"down_proj": 32}},
                            {"method": "sv_fro", "threshold": 0.9}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"], "r": 6, "lora_alpha": 12,
                                  "modules_to_save": ["lm_head"]}, {"rank": 2}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_loads_truncated_adapter_and_matches_dense_reference(tmp_path: Path, case: str) -> None:
    model_name, lora_kwargs, selector = PEFT_CASES[case]
    folder, _ = make_peft_adapter(tmp_path, model_name, **lora_kwargs)
    adapter = load_adapter(folder)
    result = truncate(adapter, **selector)
    out = save_adapter(result.adapter, tmp_path / "truncated", inputs=(folder,))
    new_ranks = {row["name"]: row["new_rank"] for row in result.report["modules"]}
    assert any(new_ranks[n] < m.rank for n, m in adapter.modules.items())

    peft_model = load_with_peft(model_name, out)
    for name, rank in new_ranks.items():
        assert peft_model.base_model.model.get_submodule(name).r["default"] == rank
    reference = reference_model(model_name, adapter, new_ranks)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-5

    written = load_adapter(out)
    extras_in = {i.key for i in adapter.extra_tensors}
    assert extras_in == {i.key for i in written.extra_tensors}
    for key in extras_in:  # modules_to_save copies carried bit for bit
        assert torch.equal(written.source.get(key), adapter.source.get(key))
    for name, module in adapter.modules.items():
        if module.bias_key:
            assert torch.equal(written.source.get(written.modules[name].bias_key), adapter.source.get(module.bias_key))


# --- exactness of the outputs ------------------------------------------------------------------------------


def relative_dense_error(before: Adapter, after: Adapter, name: str) -> float:
    old = before.delta_weight(name, torch.float64)
    new = after.delta_weight(name, torch.float64)
    return float((old - new).norm() / old.norm())


def test_truncating_at_or_above_the_rank_reproduces_the_update(tmp_path: Path) -> None:
    folder, _ = make_peft_adapter(tmp_path, "llama", target_modules=["q_proj", "v_proj", "down_proj"], r=8,
                                  lora_alpha=16, use_rslora=True)
    adapter = load_adapter(folder)
    for selector in ({"rank": 8}, {"rank": 50}, {"energy": 1.0}):
        result = truncate(adapter, **selector, dtype="fp32")
        out = save_adapter(result.adapter, tmp_path / f"full-{next(iter(selector.values()))}")
        written = load_adapter(out)
        for name, module in adapter.modules.items():
            # v_proj is 16 x 32: a rank-8 update there has rank min(8, 16) = 8 singular values.
            assert written.modules[name].rank == min(module.rank, module.out_features, module.in_features)
            assert relative_dense_error(adapter, written, name) < 1e-6
        assert all(row["retained_energy"] == 1.0 and row["rel_fro_error"] == 0.0 for row in result.report["modules"])


@pytest.mark.parametrize("dtype", ["keep", "fp16"])
def test_reported_error_equals_the_dense_error_of_the_written_file(tmp_path: Path, dtype: str) -> None:
    folder, _ = make_peft_adapter(tmp_path, "llama", target_modules=["q_proj", "up_proj", "embed_tokens"], r=8,
                                  lora_alpha=16)
    adapter = load_adapter(folder)
    result = truncate(adapter, energy=0.7, dtype=dtype)
    written = load_adapter(save_adapter(result.adapter, tmp_path / "out"))
    tolerance = 1e-6 if dtype == "keep" else 2e-3  # fp16 storage adds its own rounding
    for row in result.report["modules"]:
        assert row["rel_fro_error"] == math.sqrt(1.0 - row["retained_energy"])
        assert relative_dense_error(adapter, written, row["name"]) == pytest.approx(row["rel_fro_error"],
                                                                                      abs=tolerance)
        info = written.modules[row["name"]].a_info
        assert info.dtype == ("F32" if dtype == "keep" else "F16")
    report = result.report
    assert report["params_after"] == written.total_params < report["params_before"] == adapter.total_params
    assert report["bytes_after"] < report["bytes_before"]


def test_factors_are_balanced(tmp_path: Path) -> None:
    folder, _ = make_peft_adapter(tmp_path, "llama", target_modules=["q_proj"], r=8, lora_alpha=16)
    result = truncate(load_adapter(folder), rank=4)
    for name in result.adapter.modules:
        B, A = result.adapter.factors(name, torch.float64)
        # B'ᵀB' = A'A'ᵀ = diag(S/s): both factors carry the same share of the magnitude.
        assert torch.allclose(B.T @ B, A @ A.T, rtol=1e-5, atol=1e-8)


# --- kohya and diffusers -------------------------------------------------------------------------------------


def write_kohya(path: Path) -> Path:
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "lora_unet_mid_block_attn1_to_q.lora_down.weight": torch.randn(8, 24, generator=gen),
        "lora_unet_mid_block_attn1_to_q.lora_up.weight": torch.randn(16, 8, generator=gen),
        "lora_unet_mid_block_attn1_to_q.alpha": torch.tensor(4.0),
        "lora_unet_conv_in.lora_down.weight": torch.randn(8, 4, 3, 3, generator=gen),
        "lora_unet_conv_in.lora_up.weight": torch.randn(16, 8, 1, 1, generator=gen),
        "lora_unet_conv_in.alpha": torch.tensor(8.0),
    }
    tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"ss_network_dim": "8", "ss_network_alpha": "4",
                                            "ss_training_comment": "kept", "sshs_model_hash": "stale"})
    return path


def dense_truncation(adapter: Adapter, name: str, rank: int) -> torch.Tensor:
    module = adapter.modules[name]
    B, A = adapter.factors(name, torch.float64)
    U, S, Vh = torch.linalg.svd(module.scale * (B @ A), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def test_kohya_round_trip_with_alpha_and_metadata(tmp_path: Path) -> None:
    source = write_kohya(tmp_path / "in.safetensors")
    adapter = load_adapter(source)
    result = truncate(adapter, method="sv_fro", threshold=0.8, dtype="fp32")
    out = save_adapter(result.adapter, tmp_path / "out.safetensors")
    written = load_adapter(out)
    assert written.format == "kohya"
    for row in result.report["modules"]:
        name, rank = row["name"], row["new_rank"]
        module = written.modules[name]
        assert module.rank == rank and module.alpha == pytest.approx(adapter.modules[name].scale * rank)
        B, A = written.factors(name, torch.float64)
        expected = dense_truncation(adapter, name, rank)
        assert float((module.scale * (B @ A) - expected).norm() / expected.norm()) < 1e-6
    assert written.modules["lora_unet_conv_in"].a_info.shape[1:] == (4, 3, 3)
    meta = written.metadata
    ranks = {m.rank for m in written.modules.values()}
    assert meta["ss_network_dim"] == (str(ranks.pop()) if len(ranks) == 1 else "Dynamic")
    assert meta["ss_training_comment"] == "kept" and "sshs_model_hash" not in meta


def test_peft_to_kohya_and_diffusers(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "peft", lora_tensors({"model.layers.0.q_proj": (16, 24, 4)}),
                        r=4, lora_alpha=8)
    adapter = load_adapter(folder)
    result = truncate(adapter, rank=2, dtype="fp32")
    expected = dense_truncation(adapter, "model.layers.0.q_proj", 2)
    for fmt, name in (("kohya", "lora_model_layers_0_q_proj"), ("diffusers", "model.layers.0.q_proj")):
        written = load_adapter(save_adapter(result.adapter, tmp_path / f"out-{fmt}.safetensors", fmt))
        assert written.format == fmt, fmt
        module = written.modules[name]
        B, A = written.factors(name, torch.float64)
        assert module.rank == 2
        assert float((module.scale * (B @ A) - expected).norm() / expected.norm()) < 1e-6


@requires_realdata("diffusers-sd15-flower")
@pytest.mark.parametrize("folder", ["diffusers-sd15-flower", "diffusers-sd15-catundchat"])
def test_real_diffusers_adapters_truncate_in_their_own_naming(tmp_path: Path, folder: str) -> None:
    source = REALDATA / folder / "pytorch_lora_weights.safetensors"
    adapter = load_adapter(source)
    result = truncate(adapter, rank=2)
    out = save_adapter(result.adapter, tmp_path / "out.safetensors", inputs=(source,))
    written = load_adapter(out)
    assert written.format == "diffusers" and set(written.modules) == set(adapter.modules)
    name = next(iter(adapter.modules))
    B, A = written.factors(name, torch.float64)
    expected = dense_truncation(adapter, name, 2)
    assert float((written.modules[name].scale * (B @ A) - expected).norm() / expected.norm()) < 1e-3  # fp16


# --- refusals and safety ---------------------------------------------------------------------------------------


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_input_is_never_modified_and_outputs_are_guarded(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "in", lora_tensors({"q_proj": (8, 8, 4)}))
    before = digest(folder)
    adapter = load_adapter(folder)
    result = truncate(adapter, rank=2)
    with pytest.raises(LoraToolsError, match="input"):
        save_adapter(result.adapter, folder, force=True, inputs=(folder,))
    with pytest.raises(LoraToolsError, match="input"):  # a file output over the input's folder
        save_adapter(result.adapter, tmp_path, force=True, inputs=(folder / "adapter_model.safetensors",))
    out = save_adapter(result.adapter, tmp_path / "out")
    with pytest.raises(OutputExistsError):
        save_adapter(result.adapter, out)
    save_adapter(result.adapter, out, force=True)
    assert digest(folder) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_nonfinite_factors_are_refused_unless_allowed(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 4), "k_proj": (8, 8, 4)})
    tensors["base_model.model.k_proj.lora_B.weight"][0, 0] = float("nan")
    adapter = load_adapter(write_peft(tmp_path / "in", tensors))
    with pytest.raises(NonFiniteWeightsError, match="k_proj"):
        truncate(adapter, rank=2)
    result = truncate(adapter, rank=2, allow_nonfinite=True)
    rows = {row["name"]: row for row in result.report["modules"]}
    assert rows["k_proj"]["new_rank"] == 4 and math.isnan(rows["k_proj"]["retained_energy"])
    assert rows["q_proj"]["new_rank"] == 2


@pytest.mark.parametrize("selector", [{"rank": 0}, {"rank": -1}, {"rank": 2.5}, {"rank": "two"}, {"rank": True},
                                      {"energy": 0.0}, {"energy": 1.5}, {"method": "sv_fro"},
                                      {"threshold": 0.5}, {"rank": 2, "energy": 0.5}, {},
                                      {"method": "sv_ratio", "threshold": 0.5}, {"avg_rank": 0},
                                      {"method": "svd", "threshold": 0.5}])
def test_bad_selectors_are_refused(tmp_path: Path, selector: dict[str, Any]) -> None:
    adapter = load_adapter(write_peft(tmp_path / "in", lora_tensors({"q_proj": (8, 8, 4)})))
    with pytest.raises(InvalidOptionError):
        truncate(adapter, **selector)


def test_dora_magnitudes_are_carried_with_a_warning(tmp_path: Path) -> None:
    folder, _ = make_peft_adapter(tmp_path, "llama", target_modules=["q_proj"], r=4, lora_alpha=8,
                                  use_dora=True)
    adapter = load_adapter(folder)
    result = truncate(adapter, rank=2)
    assert any("DoRA" in w for w in result.report["warnings"])
    written = load_adapter(save_adapter(result.adapter, tmp_path / "out"))
    for name, module in adapter.modules.items():
        assert torch.equal(written.source.get(written.modules[name].magnitude_key),
                           adapter.source.get(module.magnitude_key))
