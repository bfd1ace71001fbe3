"""compare/blocked.py: float64 products with a float32 weight read a block of rows at a time equal the products of
its whole float64 copy (to float64 rounding), on shapes that do not divide into blocks; and compare-quant's fit,
which keeps only the leading basis vectors its truncations use, builds the same approximations as from all."""

from __future__ import annotations

import pytest
import torch

from lora_tools.compare import blocked
from lora_tools.compare.methods import Target, activation_aware, output_eigen, svd_truncation, target_svd

F64 = torch.float64


def _close(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.dtype == F64 and x.shape == y.shape
    assert float((x - y).abs().max()) <= 1e-12 * float(y.abs().max())


@pytest.mark.parametrize("shape", [(600, 300), (300, 600), (257, 257)])
def test_blocked_products_equal_the_whole_float64_products(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=generator)  # float32, as stored
    W64 = W.to(F64)
    X = torch.randn(shape[1], shape[1] + 7, generator=generator, dtype=F64)
    C = X @ X.T
    M = torch.randn(shape[1], 9, generator=generator, dtype=F64)
    N = torch.randn(11, shape[0], generator=generator, dtype=F64)
    _close(blocked.weight_times(W, M), W64 @ M)
    _close(blocked.times_weight(N, W), N @ W64)
    _close(blocked.times_weight_t(M.T.contiguous(), W), M.T @ W64.T)
    _close(blocked.sandwich(W, C), W64 @ C @ W64.T)
    _close(blocked.gram(W), W64 @ W64.T if shape[0] <= shape[1] else W64.T @ W64)
    assert [(s.start, s.stop) for s in blocked.row_blocks(600)] == [(0, 256), (256, 512), (512, 600)]


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_kept_leading_vectors_give_the_same_truncations(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(1)
    target = Target(shape, weight=torch.randn(shape, generator=generator))
    X = torch.randn(shape[1], 400, generator=generator, dtype=F64)
    C = X @ X.T
    full_eigen, kept_eigen = output_eigen(target, C), output_eigen(target, C, keep=20)
    full_svd, kept_svd = target_svd(target), target_svd(target, keep=20)
    assert kept_eigen.vectors.shape[1] == kept_svd.basis.shape[1] == 20
    _close(kept_eigen.values, full_eigen.values)
    _close(kept_svd.sigma_sq, full_svd.sigma_sq)
    for rank in (1, 7, 20):
        for kept, full in ((activation_aware(target, kept_eigen, rank), activation_aware(target, full_eigen, rank)),
                           (svd_truncation(target, kept_svd, rank), svd_truncation(target, full_svd, rank))):
            # Bases agree up to each vector's sign (and rotations within rounding), the products exactly enough.
            assert float((kept.dense() - full.dense()).abs().max()) <= 1e-9 * float(full.dense().abs().max())
    with pytest.raises(ValueError, match="kept"):
        activation_aware(target, kept_eigen, 21)
    with pytest.raises(ValueError, match="kept"):
        svd_truncation(target, kept_svd, 21)
