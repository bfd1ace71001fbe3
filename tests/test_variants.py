"""Whole-adapter variants: factors, bytes and predicted errors checked against dense float64 references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tools.compare.methods import Target, lowrank_bytes, quantize_target
from lora_tools.compare.metrics import uniform_noise_prediction
from lora_tools.compare.variants import ModuleFactors, uniform_noise_sq
from lora_tools.compare.variants_plan import VariantPlan, build_variants
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.formats import load_adapter
from lora_tools.quant import choose_qparams, dequantize, get_scheme, quantize, quantized_bytes
from tests.helpers import lora_tensors, write_peft

SHAPES = {"layers.0.q_proj": (24, 40, 6), "layers.0.v_proj": (16, 40, 6), "layers.1.down_proj": (40, 56, 6)}


@pytest.fixture
def adapter(tmp_path: Path):  # noqa: ANN201
    tensors = lora_tensors(SHAPES, seed=3, dtype=torch.float32)
    # A flat spectrum (q_proj) beside steeply decaying ones: truncation and the budget solver have choices to make.
    for i, name in enumerate(SHAPES):
        key = f"base_model.model.{name}.lora_B.weight"
        tensors[key] = tensors[key] * torch.logspace(0, -4 * min(i, 1), 6)[None, :]
    return load_adapter(write_peft(tmp_path / "a", tensors, r=6, lora_alpha=12,
                                   target_modules=["q_proj", "v_proj", "down_proj"]))


def covariances(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for name, (_, inp, _) in SHAPES.items():
        mixing = torch.randn(inp, inp, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, inp,
                                                                                            dtype=torch.float64)
        X = torch.randn(300, inp, generator=gen, dtype=torch.float64) @ mixing.T  # correlated inputs
        result[name] = X.T @ X
    return result


def dense(f: ModuleFactors) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())


def delta(adapter, name: str) -> torch.Tensor:  # noqa: ANN001
    return adapter.delta_weight(name, torch.float64)


def by_label(variants: list) -> dict:  # noqa: ANN001
    return {v.label: v for v in variants}


def test_identity_is_the_adapter_and_full_rank_truncation_equals_it(adapter) -> None:  # noqa: ANN001
    variants = by_label(build_variants(adapter, ranks=(2, 6, 9)))
    identity = variants["identity"]
    assert identity.method == "identity" and identity.rank == 6
    assert identity.bytes == sum((o + i) * r * 2 for o, i, r in SHAPES.values())
    for name in SHAPES:
        B, A = adapter.factors(name)
        assert torch.equal(identity.factors[name].B, B) and torch.equal(identity.factors[name].A, A)
        assert identity.predicted[name].weight_sq == 0.0
        for label in ("svd-r6", "svd-r9"):  # at and beyond the adapter's rank: the adapter again
            torch.testing.assert_close(dense(variants[label].factors[name]), delta(adapter, name),
                                       rtol=1e-5, atol=1e-6)
            assert variants[label].predicted[name].weight_sq == pytest.approx(0.0, abs=1e-9)
    assert variants["svd-r6"].bytes == variants["svd-r9"].bytes == identity.bytes
    assert variants["svd-r6"].predicted_rel_error() == pytest.approx(0.0, abs=1e-6)
    assert variants["svd-r2"].bytes == sum((o + i) * 2 * 2 for o, i, _ in SHAPES.values())


def test_truncation_is_the_dense_optimum_and_predicts_its_own_error(adapter) -> None:  # noqa: ANN001
    variant = by_label(build_variants(adapter, ranks=(2,)))["svd-r2"]
    for name in SHAPES:
        W = delta(adapter, name)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = U[:, :2] * S[:2] @ Vh[:2]
        approx = dense(variant.factors[name])
        torch.testing.assert_close(approx, best, rtol=1e-5, atol=1e-6)
        assert variant.factors[name].B.dtype == torch.float32 and variant.factors[name].rank == 2
        assert variant.predicted[name].weight_sq == pytest.approx(float((W - approx).square().sum()), rel=1e-4)
        assert variant.predicted[name].output_sq is None
    assert variant.predicted_rel_error("output") is None


def test_quantized_factors_are_quants_dequantize_and_bytes_match_compare_quant(adapter) -> None:  # noqa: ANN001
    variants = by_label(build_variants(adapter, ranks=(2,), schemes=("int8-channel", "int4-g4")))
    for scheme_name in ("int8-channel", "int4-g4"):
        scheme = get_scheme(scheme_name)
        variant = variants[scheme_name]
        assert (variant.method, variant.scheme, variant.rank) == ("quant", scheme_name, 6)
        expected_bytes = 0
        for name, (out, inp, r) in SHAPES.items():
            B, A = adapter.factors(name)
            for stored, original in ((variant.factors[name].B, B), (variant.factors[name].A, A)):
                scale = choose_qparams(original, scheme)
                assert torch.equal(stored, dequantize(quantize(original, scale, scheme), scale, scheme))
            expected_bytes += quantized_bytes((out, r), scheme) + quantized_bytes((r, inp), scheme)
            # the same bytes as compare-quant's per-layer accounting of the same factors
            target = Target((out, inp), B=B, A=A, scale=adapter.modules[name].scale)
            assert quantize_target(target, scheme).bytes == quantized_bytes((out, r), scheme) + \
                quantized_bytes((r, inp), scheme)
        assert variant.bytes == expected_bytes


def test_mixed_rounds_the_balanced_truncated_factors(adapter) -> None:  # noqa: ANN001
    variants = by_label(build_variants(adapter, ranks=(3,), mixed_schemes=("int8-channel",)))
    svd, mixed = variants["svd-r3"], variants["svd-r3+int8-channel"]
    scheme = get_scheme("int8-channel")
    assert (mixed.method, mixed.rank, mixed.scheme) == ("svd+quant", 3, "int8-channel")
    size = 0
    for name, (out, inp, _) in SHAPES.items():
        truncated = svd.factors[name]
        # balanced: both factors carry sqrt(S) (neither holds the whole magnitude)
        torch.testing.assert_close(truncated.B.norm(dim=0), truncated.A.norm(dim=1), rtol=1e-4, atol=1e-7)
        for stored, original in ((mixed.factors[name].B, truncated.B), (mixed.factors[name].A, truncated.A)):
            scale = choose_qparams(original, scheme)
            assert torch.equal(stored, dequantize(quantize(original, scale, scheme), scale, scheme))
        size += quantized_bytes((out, 3), scheme) + quantized_bytes((3, inp), scheme)
        # predicted = truncation tail + rounding noise
        assert mixed.predicted[name].weight_sq > svd.predicted[name].weight_sq
    assert mixed.bytes == size < svd.bytes


def test_uniform_noise_matches_compare_quant_model_and_measurement() -> None:
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 8, generator=gen), torch.randn(8, 200, generator=gen)
    X = torch.randn(500, 200, generator=gen, dtype=torch.float64)
    C = X.T @ X
    scheme = get_scheme("int4-channel")
    target = Target((300, 200), B=B, A=A, scale=0.7)
    approx = quantize_target(target, scheme)
    factors = ModuleFactors(B, A, 0.7)
    predicted = uniform_noise_sq(factors, approx.steps["B"], approx.steps["A"], C)
    assert predicted == pytest.approx(uniform_noise_prediction(approx, target, C), rel=1e-10)
    # weight space (C = I) against the measured error of these 64,000 rounded entries: the model holds to ~10%
    measured = float((approx.dense() - target.dense()).square().sum())
    weight = uniform_noise_sq(factors, approx.steps["B"], approx.steps["A"])
    assert weight == pytest.approx(uniform_noise_prediction(approx, target, torch.eye(200, dtype=torch.float64)),
                                   rel=1e-10)
    assert 0.8 < measured / weight < 1.25


def test_activation_aware_variant_and_output_space_predictions(adapter) -> None:  # noqa: ANN001
    C = covariances()
    variants = by_label(build_variants(adapter, C, ranks=(2,)))
    svd, act = variants["svd-r2"], variants["svd-act-r2"]
    assert act.method == "svd-act" and act.bytes == svd.bytes
    for name in SHAPES:
        W = delta(adapter, name)
        for variant in (svd, act):
            E = dense(variant.factors[name]) - W
            predicted = variant.predicted[name]
            assert predicted.weight_sq == pytest.approx(float(E.square().sum()), rel=1e-4)
            assert predicted.output_sq == pytest.approx(float(((E @ C[name]) * E).sum()), rel=1e-4)
        # svd-act is optimal on the calibration outputs, plain SVD on the weights
        assert act.predicted[name].output_sq <= svd.predicted[name].output_sq * (1 + 1e-9)
        assert svd.predicted[name].weight_sq <= act.predicted[name].weight_sq * (1 + 1e-9)
        quant = variants["int8-channel"].predicted[name]
        assert quant.output_sq is not None and quant.output_sq > 0
    assert act.predicted_rel_error("output") <= svd.predicted_rel_error("output")
    per_module = act.module_rel_errors("output")
    name = "layers.0.q_proj"
    assert per_module[name] == pytest.approx((act.predicted[name].output_sq / act.reference[name].output_sq) ** 0.5)
    assert set(svd.module_rel_errors()) == set(SHAPES)


def test_svd_act_falls_back_to_svd_without_a_covariance(adapter) -> None:  # noqa: ANN001
    C = covariances()
    del C["layers.0.v_proj"]
    act = by_label(build_variants(adapter, C, ranks=(2,)))["svd-act-r2"]
    assert "plain SVD" in act.notes[0] and "layers.0.v_proj" in act.notes[0]
    assert act.predicted_rel_error("output") is None  # one module has no output-space prediction
    assert not any(v.method == "svd-act" for v in build_variants(adapter, ranks=(2,)))


def test_avg_rank_spends_at_most_the_uniform_budget_for_more_energy(adapter) -> None:  # noqa: ANN001
    variants = by_label(build_variants(adapter, ranks=(2,)))
    uniform, budget = variants["svd-r2"], variants["avg-rank-r2"]
    assert budget.method == "avg-rank" and budget.bytes <= uniform.bytes
    ranks = {n: f.rank for n, f in budget.factors.items()}
    assert len(set(ranks.values())) > 1  # the decaying spectra differ: the solver moves rank between modules
    kept = sum(budget.reference[n].weight_sq - p.weight_sq for n, p in budget.predicted.items())
    kept_uniform = sum(uniform.reference[n].weight_sq - p.weight_sq for n, p in uniform.predicted.items())
    assert kept >= kept_uniform - 1e-9
    for name in SHAPES:
        W = delta(adapter, name)
        E = dense(budget.factors[name]) - W
        assert budget.predicted[name].weight_sq == pytest.approx(float(E.square().sum()), rel=1e-4, abs=1e-12)
    assert budget.bytes == sum(lowrank_bytes((o, i), ranks[n]) for n, (o, i, _) in SHAPES.items())


def test_variant_list_and_summary(adapter) -> None:  # noqa: ANN001
    variants = build_variants(adapter, covariances(), ranks=(4, 1, 4))
    labels = [v.label for v in variants]
    assert labels[0] == "identity" and len(labels) == len(set(labels))
    assert labels[1:3] == ["svd-r1", "svd-r4"]
    assert {v.method for v in variants} == {"identity", "svd", "svd-act", "quant", "svd+quant", "avg-rank"}
    summary = variants[1].summary()
    assert set(summary) >= {"label", "method", "rank", "scheme", "bytes", "predicted_weight_rel_error",
                            "predicted_output_rel_error"}
    assert 0 < summary["predicted_weight_rel_error"] < 1


def test_bad_inputs(adapter, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(InvalidOptionError, match="ranks"):
        build_variants(adapter, ranks=(0,))
    with pytest.raises(InvalidOptionError, match="scheme"):
        build_variants(adapter, schemes=("int3-foo",))
    with pytest.raises(ModuleMismatchError, match="no module"):
        VariantPlan(adapter, modules=["nope"])
    with pytest.raises(ModuleMismatchError, match="covariance has shape"):
        VariantPlan(adapter, {"layers.0.q_proj": torch.eye(3)})
    tensors = lora_tensors({"q": (4, 5, 2)})
    tensors["base_model.model.q.lora_A.weight"][0, 0] = float("nan")
    broken = load_adapter(write_peft(tmp_path / "nan", tensors, r=2, lora_alpha=2))
    with pytest.raises(ModuleMismatchError, match="NaN"):
        VariantPlan(broken)


def test_zero_adapter_builds_without_dividing_by_zero(tmp_path: Path) -> None:
    tensors = lora_tensors({"q": (4, 5, 2)})
    tensors["base_model.model.q.lora_B.weight"].zero_()
    zero = load_adapter(write_peft(tmp_path / "zero", tensors, r=2, lora_alpha=2))
    variants = build_variants(zero, ranks=(1,))
    for variant in variants:
        assert float(dense(variant.factors["q"]).abs().max()) == 0.0
        rel = variant.predicted_rel_error()
        assert rel != rel  # NaN: no energy to be relative to


def test_span_covariance_gives_the_same_variants_as_the_full_covariance(adapter) -> None:  # noqa: ANN001
    """C kept only on A's row space (plus its diagonal) reproduces every prediction made from the full C."""
    from lora_tools.compare.span import SpanCovariance

    C = covariances()
    full = by_label(build_variants(adapter, C, ranks=(2, 3)))
    span = {name: SpanCovariance(C[name], adapter.factors(name)[1]) for name in SHAPES}
    assert span["layers.0.q_proj"].core.shape == (6, 6) and span["layers.0.q_proj"].diag.shape == (40,)
    small = by_label(build_variants(adapter, span, ranks=(2, 3)))
    assert set(full) == set(small) and any(v.method == "svd-act" for v in small.values())
    for label, variant in full.items():
        for space in ("weight", "output"):
            a, b = variant.predicted_rel_error(space), small[label].predicted_rel_error(space)
            assert (a is None and b is None) or b == pytest.approx(a, rel=1e-9, abs=1e-12), (label, space)
        for name, f in variant.factors.items():
            assert torch.allclose(dense(f), dense(small[label].factors[name]), rtol=1e-6, atol=1e-9), (label, name)
