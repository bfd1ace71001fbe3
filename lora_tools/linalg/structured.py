"""Exact LoRA factors (B, A) of structured updates: Hadamard, Kronecker and Tucker products of thin factors.

Every identity here is exact algebra, so an update that LyCORIS stores as a product of small tensors becomes a
plain low-rank product ``B @ A`` without forming the out x in matrix:

- Hadamard (LoHa): (B1 A1) ⊙ (B2 A2) = (B1 • B2)(A1 ∗ A2), with ``•`` the row-wise Kronecker (face-splitting)
  product, (out, r1·r2), and ``∗`` the column-wise Khatri–Rao product, (r1·r2, in).
- Kronecker (LoKr): kron(P1 Q1, P2 Q2) = kron(P1, P2) · kron(Q1, Q2) (mixed-product property); the singular
  values of kron(W1, W2) are all products σi(W1)·σj(W2).
- Tucker-2 core (LoCon ``lora_mid``, LoHa ``hada_t*``, LoKr ``lokr_t2``): W[p, q, k] = Σ_ij U[p, i] T[i, j, k]
  D[j, q] flattened to (p, q·k) is U @ M with M[i, (q, k)] = Σ_j T[i, j, k] D[j, q]: rank r, exactly.
"""

from __future__ import annotations

import torch


def face_split(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: row i is kron(B1[i], B2[i]). B1: (n, r1), B2: (n, r2) -> (n, r1·r2)."""
    return (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], -1)


def khatri_rao(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: column j is kron(A1[:, j], A2[:, j]). (r1, m), (r2, m) -> (r1·r2, m)."""
    return (A1[:, None, :] * A2[None, :, :]).reshape(-1, A1.shape[1])


def tucker_flat(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """M with U @ M = the flattened Tucker product: core (r_u, r_d, *k), down (r_d, in) -> (r_u, in·prod(k)).

    The column order (input channel major, kernel position minor) is PyTorch's conv weight layout flattened, so
    U @ M reshaped to (out, in, *k) is the conv update."""
    return torch.einsum("ij...,jq->iq...", core, down).reshape(core.shape[0], -1)


def thin_full(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P @ Q = W exactly and inner size min(m, n): an identity on the short side, so no rounding at
    all (a QR or SVD would round). W: (m, n)."""
    m, n = W.shape
    if m <= n:
        return torch.eye(m, dtype=W.dtype, device=W.device), W
    return W, torch.eye(n, dtype=W.dtype, device=W.device)


def cap_rank(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with inner size min(k, out, in): when k exceeds a side, a thin QR of that factor folds it
    into the other (B A = Q (R A)), exact up to rounding. Non-finite factors are left alone (QR of NaN fails)."""
    out, k = B.shape
    inp = A.shape[1]
    if k <= min(out, inp) or not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
        return B, A
    if out <= inp:
        q, r = torch.linalg.qr(B)  # q: (out, out), r: (out, k)
        return q, r @ A
    q, r = torch.linalg.qr(A.T)  # q: (in, in), r: (in, k)
    return B @ r.T, q.T


def kron_factors(side1: tuple[torch.Tensor, torch.Tensor],
                 side2: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of kron(P1 Q1, P2 Q2) = kron(P1, P2) @ kron(Q1, Q2)."""
    (P1, Q1), (P2, Q2) = side1, side2
    return torch.kron(P1, P2), torch.kron(Q1, Q2)


def kron_singular_values(S1: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    """All singular values of kron(W1, W2) from those of W1 and W2, descending."""
    return torch.sort((S1[:, None] * S2[None, :]).reshape(-1), descending=True).values
