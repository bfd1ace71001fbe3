"""Norms, inner products and subspace overlaps of low-rank products, from the factors alone.

Everything here works on pairs (B: (out, r), A: (r, in)) standing for the product B @ A, and never forms the
out x in matrix. A sum of products Σ B_i A_i is itself one product of stacked factors, [B_1, B_2, ...] @
[A_1; A_2; ...], which is how merges and differences are measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_factors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = Σ B_i @ A_i: B = [B_1, B_2, ...] (out, Σr), A = [A_1; A_2; ...] (Σr, in)."""
    if not pairs:
        raise ValueError("nothing to stack")
    return torch.cat([b for b, _ in pairs], dim=1), torch.cat([a for _, a in pairs], dim=0)


@torch.no_grad()
def lowrank_fro_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B @ A‖_F from the R factors of thin QRs: B = Q_b R_b, Aᵀ = Q_a R_a give ‖B A‖_F = ‖R_b R_aᵀ‖_F.

    Unlike the Gram-matrix formula sqrt(Σ (BᵀB) ∘ (AAᵀ)) this does not square the condition number, so the norm
    of a difference that cancels to rounding level (an exact merge checked against the sum) comes out at
    rounding level instead of at its square root.
    """
    B = B.to(torch.float64)
    A = A.to(torch.float64)
    r_b = torch.linalg.qr(B, mode="r")[1]  # (k_b, r)
    r_a = torch.linalg.qr(A.T, mode="r")[1]  # (k_a, r)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


@torch.no_grad()
def lowrank_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius inner product ⟨B1 A1, B2 A2⟩ = trace(A1ᵀ B1ᵀ B2 A2) = Σ (B1ᵀ B2) ∘ (A1 A2ᵀ)."""
    B1, A1, B2, A2 = (t.to(torch.float64) for t in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def cosine(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Cosine between two low-rank products seen as vectors (0 when either is zero)."""
    n1, n2 = lowrank_fro_norm(B1, A1), lowrank_fro_norm(B2, A2)
    if n1 == 0.0 or n2 == 0.0:
        return 0.0
    return max(-1.0, min(1.0, lowrank_inner(B1, A1, B2, A2) / (n1 * n2)))


def relative_difference(B: torch.Tensor, A: torch.Tensor, B_ref: torch.Tensor, A_ref: torch.Tensor) -> float:
    """‖B A − B_ref A_ref‖_F / ‖B_ref A_ref‖_F, via the stacked difference [B, −B_ref] @ [A; A_ref]."""
    B, A, B_ref, A_ref = (t.to(torch.float64) for t in (B, A, B_ref, A_ref))
    reference = lowrank_fro_norm(B_ref, A_ref)
    difference = lowrank_fro_norm(*stack_factors([(B, A), (-B_ref, A_ref)]))
    if reference == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / reference


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """Normalised subspace similarity of the LoRA paper (Hu et al. 2021, section 7.2).

    ``phi[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j)`` for orthonormal columns U1: (d, k1), U2: (d, k2),
    ordered by singular value: 1 when the smaller of the two top subspaces lies inside the other, 0 when they are
    orthogonal. Computed with two cumulative sums over the k1 x k2 matrix of squared overlaps.
    """
    overlap = (U1.to(torch.float64).T @ U2.to(torch.float64)).square()  # (k1, k2)
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return (cumulative / torch.minimum(i, j)).clamp(0.0, 1.0)
