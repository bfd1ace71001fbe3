"""The QR-core SVD against dense float64 SVD and brute force, including hard spectra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.linalg import lowrank_svd, singular_values, spectrum_metrics
from lora_tools.linalg.metrics import energy_rank


def random_factors(out: int, inp: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out, rank, generator=gen, dtype=torch.float64),
            torch.randn(rank, inp, generator=gen, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 40), rank=st.integers(1, 12), seed=st.integers(0, 10_000),
       scale=st.floats(1e-3, 1e3))
def test_singular_values_match_dense_svd(out: int, inp: int, rank: int, seed: int, scale: float) -> None:
    B, A = random_factors(out, inp, rank, seed)
    ours = singular_values(B, A, scale)
    dense = torch.linalg.svdvals(scale * B @ A)
    k = min(out, inp, rank)
    assert ours.shape == (rank,)
    assert torch.all(ours[k:] == 0)
    assert (ours[:k] - dense[:k]).abs().max() <= 1e-10 * dense[0]


def test_singular_vectors_reconstruct_the_update() -> None:
    B, A = random_factors(50, 30, 6, 3)
    svd = lowrank_svd(B, A, 0.5)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, 0.5 * B @ A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.Vh @ svd.Vh.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_spectrum_spanning_eleven_decades() -> None:
    """σ from 1e-8 to 1e3: each value must come out with small relative error (float64 dense as reference)."""
    gen = torch.Generator().manual_seed(0)
    out, inp, rank = 200, 120, 12
    U, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(3, -8, rank, dtype=torch.float64)
    # Unbalanced factors on purpose: B carries the large part, A the small.
    B = U * sigma.sqrt() * 10
    A = (V * sigma.sqrt() / 10).T
    ours = singular_values(B, A)
    assert torch.allclose(ours, sigma, rtol=1e-6, atol=0)


def test_rank_larger_than_the_layer_pads_with_zeros() -> None:
    B, A = random_factors(3, 5, 8, 1)
    values = singular_values(B, A)
    assert values.shape == (8,)
    assert torch.all(values[3:] == 0) and torch.all(values[:3] > 0)


def test_metrics_of_a_known_spectrum() -> None:
    S = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    m = spectrum_metrics(S, (10, 10))
    assert m.fro_norm == pytest.approx(math.sqrt(22))
    assert m.sigma_max == 4.0
    assert m.stable_rank == pytest.approx(22 / 16)
    p = S / S.sum()
    assert m.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    # energies 16, 4, 1, 1 of 22: 16/22 = 0.727, 20/22 = 0.909, 21/22 = 0.9545, 22/22
    assert m.rank_90 == 2
    assert m.rank_99 == 4
    assert m.numerical_rank == 4


def test_zero_spectrum_is_defined_without_division_by_zero() -> None:
    m = spectrum_metrics(torch.zeros(4, dtype=torch.float64), (8, 8))
    assert (m.fro_norm, m.sigma_max, m.stable_rank, m.effective_rank) == (0.0, 0.0, 0.0, 0.0)
    assert (m.rank_90, m.rank_99, m.numerical_rank) == (0, 0, 0)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0, 1e6), min_size=1, max_size=20), fraction=st.floats(0.01, 1.0))
def test_energy_rank_is_the_smallest_sufficient_rank(values: list[float], fraction: float) -> None:
    S = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    k = energy_rank(S, fraction)
    total = float(S.square().sum())
    if total == 0:
        assert k == 0
        return
    kept = lambda j: float(S[:j].square().sum()) / total  # noqa: E731
    assert kept(k) >= fraction - 1e-12
    assert k == 1 or kept(k - 1) < fraction - 1e-12


def test_mixed_precision_inputs_are_upcast() -> None:
    B, A = random_factors(64, 48, 4, 7)
    B16, A16 = B.half(), A.half()
    ours = singular_values(B16, A16)
    dense = torch.linalg.svdvals(B16.double() @ A16.double())[:4]
    torch.testing.assert_close(ours, dense, rtol=1e-10, atol=0)


@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1e150, 1e300])
def test_metrics_survive_extreme_scales(scale: float) -> None:
    S = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64) * scale
    m = spectrum_metrics(S, (10, 10))
    assert m.stable_rank == pytest.approx(22 / 16)
    assert m.fro_norm == pytest.approx(math.sqrt(22) * scale, rel=1e-12)
    assert (m.rank_90, m.rank_99, m.numerical_rank) == (2, 4, 4)


def test_rank_one_update_is_exact() -> None:
    """A rank-1 adapter: σ_1 = |s|·‖b‖·‖a‖, one non-trivial direction, every rank metric 1."""
    B, A = random_factors(40, 30, 1, 11)
    svd = lowrank_svd(B, A, -0.75)
    expected = 0.75 * float(B.norm()) * float(A.norm())
    assert svd.S.shape == (1,) and float(svd.S[0]) == pytest.approx(expected, rel=1e-14)
    torch.testing.assert_close(svd.U * svd.S @ svd.Vh, -0.75 * B @ A, rtol=1e-12, atol=1e-14)
    m = spectrum_metrics(svd.S.abs(), (40, 30))
    assert (m.rank_90, m.rank_99, m.numerical_rank) == (1, 1, 1)
    assert m.stable_rank == pytest.approx(1.0) and m.effective_rank == pytest.approx(1.0)


def test_bf16_factors_are_analysed_in_float64() -> None:
    """bf16 factors are upcast before any product: the result is the float64 SVD of the bf16 values, not of a
    bf16 product (whose 8-bit mantissa would cost ~1e-3 relative)."""
    B, A = random_factors(96, 80, 6, 13)
    B16, A16 = B.bfloat16(), A.bfloat16()
    ours = singular_values(B16, A16, 3.0)
    dense = torch.linalg.svdvals(3.0 * B16.double() @ A16.double())[:6]
    torch.testing.assert_close(ours, dense, rtol=1e-10, atol=0)
    assert ours.dtype == torch.float64
