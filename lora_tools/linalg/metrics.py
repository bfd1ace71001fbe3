"""Scalar summaries of a singular-value spectrum (what `inspect` reports per module)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# Relative threshold of numerical rank: NumPy's matrix_rank convention (max(m, n) * eps * sigma_max),
# with float32 eps: the factors are at best float32-accurate after any training.
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class SpectrumMetrics:
    fro_norm: float
    sigma_max: float
    stable_rank: float  # ||ΔW||_F² / σ_max²
    effective_rank: float  # exp(Shannon entropy of σ/Σσ) — Roy & Vetterli, 2007
    rank_90: int  # smallest k keeping 90% of Σσ²
    rank_99: int
    numerical_rank: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def energy_rank(S: torch.Tensor, fraction: float) -> int:
    """Smallest k with Σ_{i<k} σ_i² >= fraction · Σσ² (0 for an all-zero spectrum)."""
    energy = S.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # A relative slack of a few ulps keeps F=1.0 from demanding the last, rounding-level value.
    hits = torch.nonzero(cumulative >= fraction - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else int(S.numel())


def spectrum_metrics(S: torch.Tensor, shape: tuple[int, int]) -> SpectrumMetrics:
    """Metrics of a descending, non-negative spectrum S of an (out, in) update."""
    S = S.double()
    if not bool(torch.isfinite(S).all()):
        nan = float("nan")
        return SpectrumMetrics(nan, nan, nan, nan, 0, 0, 0)
    sigma_max = float(S.max()) if S.numel() else 0.0
    if sigma_max == 0.0:
        return SpectrumMetrics(0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    # Work with σ/σ_max so that extreme scales (alpha of 1e-300 or 1e300) neither underflow nor overflow.
    ratios = S / sigma_max
    relative_energy = float(ratios.square().sum())
    p = ratios / ratios.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    tolerance = max(shape) * FLOAT32_EPS
    return SpectrumMetrics(
        fro_norm=sigma_max * math.sqrt(relative_energy),
        sigma_max=sigma_max,
        stable_rank=relative_energy,
        effective_rank=math.exp(entropy),
        rank_90=energy_rank(ratios, 0.90),
        rank_99=energy_rank(ratios, 0.99),
        numerical_rank=int((ratios > tolerance).sum()),
    )
