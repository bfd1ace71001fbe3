"""The identities behind exact LyCORIS factors (linalg/structured.py), on random shapes (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.linalg.structured import (
    cap_rank,
    face_split,
    khatri_rao,
    kron_factors,
    kron_singular_values,
    thin_full,
    tucker_flat,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
dims = st.integers(1, 7)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@SETTINGS
@given(out=dims, inp=dims, r1=dims, r2=dims)
def test_hadamard_of_products_is_one_product(out: int, inp: int, r1: int, r2: int) -> None:
    B1, A1, B2, A2 = randn(out, r1, seed=1), randn(r1, inp, seed=2), randn(out, r2, seed=3), randn(r2, inp, seed=4)
    B, A = face_split(B1, B2), khatri_rao(A1, A2)
    assert B.shape == (out, r1 * r2) and A.shape == (r1 * r2, inp)
    torch.testing.assert_close(B @ A, (B1 @ A1) * (B2 @ A2), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(a=dims, c=dims, b=dims, d=dims, r=dims, full1=st.booleans())
def test_kron_of_products_and_its_spectrum(a: int, c: int, b: int, d: int, r: int, full1: bool) -> None:
    W1 = randn(a, c, seed=5)
    P2, Q2 = randn(b, r, seed=6), randn(r, d, seed=7)
    side1 = thin_full(W1) if full1 else (W1, torch.eye(c, dtype=torch.float64))
    B, A = kron_factors(side1, (P2, Q2))
    dense = torch.kron(W1, P2 @ Q2)
    torch.testing.assert_close(B @ A, dense, rtol=1e-12, atol=1e-12)
    S = kron_singular_values(torch.linalg.svdvals(W1), torch.linalg.svdvals(P2 @ Q2))
    k = min(S.numel(), min(dense.shape))
    torch.testing.assert_close(S[:k], torch.linalg.svdvals(dense)[:k], rtol=0, atol=1e-10 * float(S[0]))


def test_thin_full_is_exact_without_rounding() -> None:
    W = randn(3, 5)
    for matrix in (W, W.T):
        P, Q = thin_full(matrix)
        assert P.shape[1] == min(matrix.shape) and torch.equal(P @ Q, matrix)


@SETTINGS
@given(r_u=dims, r_d=dims, inp=dims, kh=st.integers(1, 3), kw=st.integers(1, 3), out=dims)
def test_tucker_flat_is_the_flattened_conv_update(r_u: int, r_d: int, inp: int, kh: int, kw: int, out: int) -> None:
    core, down, up = randn(r_u, r_d, kh, kw, seed=8), randn(r_d, inp, seed=9), randn(out, r_u, seed=10)
    dense = torch.einsum("ij...,pi,jq->pq...", core, up, down)  # ΔW[p, q, k] = Σ up[p,i] core[i,j,k] down[j,q]
    torch.testing.assert_close((up @ tucker_flat(core, down)).reshape(dense.shape), dense, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(out=dims, inp=dims, k=st.integers(1, 12))
def test_cap_rank_keeps_the_product(out: int, inp: int, k: int) -> None:
    B, A = randn(out, k, seed=11), randn(k, inp, seed=12)
    B2, A2 = cap_rank(B, A)
    assert B2.shape[1] == min(k, out, inp)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-10, atol=1e-10)
