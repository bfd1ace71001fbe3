"""An input covariance kept only where a LoRA module's variants can see it.

Every variant of a module ΔW = s·B·A (truncated, activation-aware, rounded, mixed) reads the calibration covariance
C (in x in) through forms x C yᵀ with x, y in the row space of A — right singular vectors, s·R·A, the unrounded A
of a truncation — plus diag(C) for the rounding noise of A (Widrow's model, ``variants.uniform_noise_sq``). With
Q (in, r) an orthonormal basis of that row space, x C yᵀ = (x Q)(Qᵀ C Q)(y Q)ᵀ exactly, so C can be replaced by
the r x r core Qᵀ C Q and the diagonal: 24 kB instead of 2.7 MB for a SmolLM2 q_proj at r=8, 0.6 MB instead of
254 MB for a 5632-wide down_proj at r=16. The end-to-end stage keeps these instead of C for every layer, so a
streamed base never holds more than one block's full covariances.
"""

from __future__ import annotations

import torch


class SpanCovariance:
    """C restricted to the row space of A (``basis`` Q (in, k), ``core`` Qᵀ C Q (k, k)) and diag(C), float64."""

    def __init__(self, C: torch.Tensor, A: torch.Tensor) -> None:
        C = C.to(torch.float64)
        Q, _ = torch.linalg.qr(A.to(torch.float64).T)  # (in, k)
        self.basis = Q
        self.core = Q.T @ C @ Q  # (k, k)
        self.diag = torch.diagonal(C).clone()  # (in,)
        self.shape = tuple(C.shape)

    def sandwich(self, M: torch.Tensor) -> torch.Tensor:
        """M C Mᵀ for rows of M (m, in) in the row space of A."""
        P = M.to(torch.float64) @ self.basis  # (m, k)
        return P @ self.core @ P.T

    def quadratic_rows(self, M: torch.Tensor) -> torch.Tensor:
        """(M C Mᵀ)_ii for rows of M in the row space of A."""
        P = M.to(torch.float64) @ self.basis
        return ((P @ self.core) * P).sum(dim=1)
