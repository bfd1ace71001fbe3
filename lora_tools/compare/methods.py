"""The compression methods compared by ``compare-quant``, as pure functions of a target matrix (and C).

A *target* is the (out, in) linear map being stored: ΔW = s·B·A (kept factored), W0 + ΔW or W0 (dense). Every
method returns an ``Approximation`` that can (a) apply itself to inputs, x (T, in) -> x Ŵᵀ (T, out), without
materialising anything that grows with tokens, and (b) materialise Ŵ densely for the matrix metrics.

Methods:

* ``int8-*`` / ``int4-*``: weight-only rounding (``lora_tools.quant``). For a factored target the factors B and A
  are quantized (each as its own (rows, cols) matrix) and the error is that of s·B_q·A_q.
* ``svd``: the rank-k truncated SVD (Eckart–Young: best rank k in Frobenius norm of the *weight* error).
* ``svd-act``: the rank-k map minimising the *output* error ‖(Ŵ − W) X‖_F on the calibration inputs:
  Ŵ = U_k U_kᵀ W with U_k the top-k eigenvectors of W C Wᵀ, C = X Xᵀ. This is the projection of the outputs
  Y = W X onto their top-k principal directions, so its error² is the sum of the tail eigenvalues of W C Wᵀ;
  it needs no inverse of C (works when C is singular, unlike whitening via C^{-1/2}). Same idea as the
  activation-aware truncations of ASVD (Yuan et al., 2023) and SVD-LLM (Wang et al., 2024), written as an output
  projection.

Storage of a rank-k approximation is counted as float16 factors: (out + in) · k · 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora_tools.calibration import activation_aware_factors
from lora_tools.compare import blocked
from lora_tools.quant import QuantScheme, fake_quantize, quantized_bytes

FP16_BYTES = 2


@dataclass
class Target:
    """The map being compressed: dense ``weight`` (out, in) or factored ``scale · B @ A``."""

    shape: tuple[int, int]
    weight: torch.Tensor | None = None  # (out, in), float32
    B: torch.Tensor | None = None  # (out, r)
    A: torch.Tensor | None = None  # (r, in)
    scale: float = 1.0

    @property
    def factored(self) -> bool:
        return self.weight is None

    @property
    def max_rank(self) -> int:
        full = min(self.shape)
        return min(full, self.B.shape[1]) if self.factored else full

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def reference_bytes(self) -> int:
        """float16 storage of the target as it is: factors for ΔW, the dense matrix otherwise."""
        if self.factored:
            return (self.shape[0] + self.shape[1]) * self.B.shape[1] * FP16_BYTES
        return self.params * FP16_BYTES

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.factored:
            return self.scale * (self.B.to(dtype) @ self.A.to(dtype))
        return self.weight.to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> x Wᵀ (T, out) in x's dtype."""
        if self.factored:
            return self.scale * ((x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T)
        return x @ self.weight.to(x.dtype).T


@dataclass
class Approximation:
    """One method's stored version Ŵ of a target, factored (left @ right) or dense."""

    method: str
    bytes: int
    rank: int | None = None
    left: torch.Tensor | None = None  # (out, k): Ŵ = scale · left @ right
    right: torch.Tensor | None = None  # (k, in)
    scale: float = 1.0
    weight: torch.Tensor | None = None  # (out, in) when dense
    # Per-entry rounding steps of the quantized matrices ("W", or "B" and "A"), each shaped like that matrix,
    # for the uniform-noise prediction (metrics.uniform_noise_prediction).
    steps: dict[str, torch.Tensor] = field(default_factory=dict)
    # σ² of the weight error Ŵ − W when the method knows them (a truncated SVD: the spectrum's tail), so the
    # error structure needs no decomposition of an (out, in) error.
    error_sigma_sq: torch.Tensor | None = None

    @property
    def label(self) -> str:
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.weight is not None:
            return self.weight.to(dtype)
        return self.scale * (self.left.to(dtype) @ self.right.to(dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return x @ self.weight.to(x.dtype).T
        return self.scale * ((x @ self.right.to(x.dtype).T) @ self.left.to(x.dtype).T)


class ErrorMap:
    """x (T, in) -> ΔY = x (Ŵ − W)ᵀ (T, out), in float32, for the per-token statistics on held-out batches.

    When target and approximation are both factored, E = Ŵ − W = [s'·L, −s·B] @ [R; A] has rank ≤ k + r, so
    ΔY costs (in + out)·(k + r) per token instead of in·out, and the factors are combined in float64 before the
    cast. Otherwise ΔY = x Ŵᵀ − x Wᵀ in float32: the cancellation costs about eps32·‖Y‖, three orders of magnitude
    below the smallest errors reported (INT8, ~1e-3·‖Y‖), which is ample for percentiles, cosines and kurtosis.
    """

    def __init__(self, target: Target, approx: Approximation, dtype: torch.dtype = torch.float32) -> None:
        self.target = target
        self.approx = approx
        self.dtype = dtype
        self.right: torch.Tensor | None = None
        if approx.weight is None and target.factored:
            self.right = torch.cat([approx.right.to(torch.float64), target.A.to(torch.float64)]).to(dtype)
            self.left = torch.cat([approx.scale * approx.left.to(torch.float64),
                                   -target.scale * target.B.to(torch.float64)], dim=1).to(dtype)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ΔY for inputs x (T, in) whose exact outputs y = x Wᵀ are already known."""
        if self.right is not None:
            return (x @ self.right.T) @ self.left.T  # (T, k + r) @ (k + r, out)
        return self.approx.apply(x) - y


def lowrank_bytes(shape: tuple[int, int], rank: int) -> int:
    return (shape[0] + shape[1]) * rank * FP16_BYTES


def equal_budget_rank(shape: tuple[int, int], budget: int, max_rank: int) -> int:
    """Largest k with (out + in) · k · 2 bytes <= budget, capped at ``max_rank`` (0 when not even k=1 fits)."""
    return max(0, min(max_rank, budget // ((shape[0] + shape[1]) * FP16_BYTES)))


def scheme_bytes(target: Target, scheme: QuantScheme) -> int:
    """Bytes of the target stored with ``scheme`` (its factors B and A when factored)."""
    if target.factored:
        return quantized_bytes(tuple(target.B.shape), scheme) + quantized_bytes(tuple(target.A.shape), scheme)
    return quantized_bytes(target.shape, scheme)


@torch.no_grad()
def quantize_target(target: Target, scheme: QuantScheme) -> Approximation:
    """Round the target (or, when factored, its factors B and A) with ``scheme``."""
    size = scheme_bytes(target, scheme)
    if target.factored:
        B_q, step_B = fake_quantize(target.B.float(), scheme)  # (out, r)
        A_q, step_A = fake_quantize(target.A.float(), scheme)  # (r, in)
        return Approximation(scheme.name, size, left=B_q, right=A_q, scale=target.scale,
                             steps={"B": step_B, "A": step_A})
    W_q, step = fake_quantize(target.weight.float(), scheme)
    return Approximation(scheme.name, size, weight=W_q, steps={"W": step})


@dataclass(frozen=True)
class TargetSVD:
    """The target's singular structure in float64, descending.

    Factored targets: the exact thin SVD U (out, m), S (m,), Vh (m, in) from the factors (QR + core SVD).
    Dense targets: the eigenpairs of the smaller Gram matrix only — ``basis`` holds the leading left singular
    vectors (``side`` "left", out <= in: eigenvectors of W Wᵀ) or right ones ("right": of Wᵀ W), as many as the
    caller keeps, ``sigma_sq`` all the σ².
    A rank-k truncation is then the projection of W onto the top k of them, U_k (U_kᵀ W) or (W V_k) V_kᵀ, which is
    the truncated SVD (Eckart–Young) without the other side's vectors; an error in the computed subspace changes
    the approximation's error only to second order. For a 2048 x 5632 layer this is ~4x cheaper than the SVD.
    """

    U: torch.Tensor | None = None
    S: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    sigma_sq: torch.Tensor | None = None
    side: str | None = None


@torch.no_grad()
def weight_gram(target: Target) -> torch.Tensor:
    """The smaller Gram matrix of a dense target, float64: W Wᵀ when out <= in, else Wᵀ W."""
    return blocked.gram(target.weight)


def _leading(values: torch.Tensor, vectors: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh's ascending pairs -> all values descending and the top ``keep`` vectors (all when None), as a copy
    that does not keep the full basis alive."""
    count = vectors.shape[1] if keep is None else min(keep, vectors.shape[1])
    return values.flip(0), vectors[:, vectors.shape[1] - count:].flip(1).clone()


@torch.no_grad()
def target_svd(target: Target, gram: torch.Tensor | None = None, keep: int | None = None) -> TargetSVD:
    """Exact SVD from the factors for ΔW (no out x in SVD); the smaller Gram's eigenpairs for a dense target
    (``gram``: ``weight_gram(target)`` when the caller has it already; ``keep``: the most leading singular vectors
    any truncation will use, default all)."""
    if target.factored:
        from lora_tools.linalg import lowrank_svd

        svd = lowrank_svd(target.B, target.A, target.scale, dtype=torch.float64)
        return TargetSVD(svd.U, svd.S, svd.Vh)
    side = "left" if target.shape[0] <= target.shape[1] else "right"
    values, vectors = _leading(*torch.linalg.eigh(weight_gram(target) if gram is None else gram), keep)
    return TargetSVD(basis=vectors, sigma_sq=values.clamp_min(0), side=side)


def svd_truncation(target: Target, svd: TargetSVD, rank: int) -> Approximation:
    if svd.basis is None:
        k = min(rank, svd.S.numel())
        # A copy, not a view: a view would keep the whole (m, in) Vh of the layer alive with the approximation.
        left, right, tail = svd.U[:, :k] * svd.S[:k], svd.Vh[:k].clone(), svd.S[k:].square()
    else:
        k = min(rank, svd.sigma_sq.numel())
        if k > svd.basis.shape[1]:
            raise ValueError(f"rank {k} needs more singular vectors than the {svd.basis.shape[1]} kept")
        basis = svd.basis[:, :k].clone()
        W = target.weight  # as stored: read in row blocks (compare/blocked.py)
        left, right = ((basis, blocked.times_weight(basis.T, W)) if svd.side == "left"
                       else (blocked.weight_times(W, basis), basis.T.contiguous()))
        tail = svd.sigma_sq[k:]
    return Approximation("svd", lowrank_bytes(target.shape, rank), rank=rank, left=left, right=right,
                         error_sigma_sq=tail.clone())


@dataclass(frozen=True)
class OutputEigen:
    """Eigendecomposition of W C Wᵀ, descending: values (m,), the leading vectors (out, k <= m) orthonormal."""

    values: torch.Tensor
    vectors: torch.Tensor | None  # None once the approximations are built (compare.fit)

    def tail_energy(self, rank: int) -> float:
        """Σ_{i>k} λ_i: the optimal output error² at rank k (clamped at 0: tiny negative λ are rounding)."""
        return float(self.values[rank:].clamp_min(0).sum())

    @property
    def total_energy(self) -> float:
        return float(self.values.clamp_min(0).sum())


@torch.no_grad()
def output_eigen(target: Target, C: torch.Tensor, gram: torch.Tensor | None = None,
                 keep: int | None = None) -> OutputEigen:
    """Eigenpairs of W C Wᵀ (out x out) — through an r x r core when W = s·B·A is factored.

    Factored: B = Q R (thin QR, Q: (out, r)), so W C Wᵀ = Q (s² R G Rᵀ) Qᵀ with G = A C Aᵀ (r x r); the core's
    eigenvectors V give U = Q V. Dense: eigh of the (out, out) matrix when out <= in, else an (in, in) eigenproblem
    and a QR (below), which starts from Wᵀ W (``gram``: ``weight_gram(target)`` when the caller has it already);
    all the eigenvalues, and the top ``keep`` eigenvectors (default all). The stored W is read in row blocks
    (compare/blocked.py): no float64 copy of it is held.
    """
    C = C.to(torch.float64)
    if target.factored:
        vectors, values, _ = activation_aware_factors(target.B, target.A, target.scale, C)
    else:
        W = target.weight
        if W.shape[0] <= W.shape[1]:
            M = blocked.sandwich(W, C)  # (out, out), symmetric up to rounding: eigh reads its lower triangle
            values, vectors = _leading(*torch.linalg.eigh(M), keep)
            return OutputEigen(values, vectors)
        else:
            # More outputs than inputs (gate/up projections): W C Wᵀ = (W L)(W L)ᵀ with C = L Lᵀ, so its nonzero
            # eigenvalues are those of the (in, in) matrix Lᵀ (Wᵀ W) L = V Λ Vᵀ, and its top-k eigenvectors span
            # the columns of W L V_k. Only (in, in) eigenproblems (not an O(out³) one), and instead of the thin SVD
            # of the (out, in) W L — whose LAPACK workspace alone is ~230 MB for 5632 x 2048 — a QR of W L V: its
            # first k columns are an orthonormal basis of that span for every k at once (what activation_aware
            # projects on), without dividing by small singular values.
            c_values, L = torch.linalg.eigh(C)  # C is symmetric: eigh reads its lower triangle
            L.mul_(c_values.clamp_min(0).sqrt())  # (in, in): C = L Lᵀ
            K = L.T @ (weight_gram(target) if gram is None else gram) @ L  # (in, in)
            values, V = _leading(*torch.linalg.eigh(K), keep)
            del K
            # Q's first k columns depend on the first k columns of W L V only: the QR of the kept ones suffices.
            vectors, _ = torch.linalg.qr(blocked.weight_times(W, L @ V))  # (out, keep)
    return OutputEigen(values, vectors)


def activation_aware(target: Target, eigen: OutputEigen, rank: int) -> Approximation:
    """Ŵ = U_k (U_kᵀ W): stored as U_k (out, k) and U_kᵀ W (k, in)."""
    if not target.factored and rank > eigen.vectors.shape[1]:
        raise ValueError(f"rank {rank} needs more eigenvectors than the {eigen.vectors.shape[1]} kept")
    U_k = eigen.vectors[:, :rank].clone()  # (out, k); a copy: the full (out, m) basis need not outlive the fit
    if target.factored:
        right = target.scale * ((U_k.T @ target.B.to(torch.float64)) @ target.A.to(torch.float64))
    else:
        right = blocked.times_weight(U_k.T, target.weight)
    return Approximation("svd-act", lowrank_bytes(target.shape, rank), rank=rank, left=U_k, right=right)

