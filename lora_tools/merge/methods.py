"""Merge methods as pure tensor functions of one module's inputs.

Every method receives the module's terms — (w_i, B_i·s_i, A_i) with the adapter's scale already folded into B, in
float64 — and returns merged factors (B: (out, k), A: (k, in)) whose product *is* the merged update (scale 1).
The exact methods (``cat``, ``svd``, ``rank1-topk``) stay in factor space: O((out + in)·(Σr)²) per module. The
published sparsification methods (``ties``, ``dare``, ``magnitude``) are defined entry-wise on ΔW and need the
dense out x in update of each input; the caller streams modules one at a time, so peak memory is one module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tools.linalg import lowrank_svd
from lora_tools.linalg.products import stack_factors
from lora_tools.linalg.truncate import RankRule, retained_energy
from lora_tools.merge.registry import register

# Dense problems up to this many entries run in float64 (tests, small layers); larger ones in float32.
FLOAT64_DENSE_LIMIT = 1 << 22


@dataclass(frozen=True)
class MergeTerm:
    """One adapter's contribution to one module: ``weight · B @ A`` with B = s·B_stored: (out, r), A: (r, in)."""

    weight: float
    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class MergeOptions:
    rank_rule: RankRule | None = None  # None: the method's default rank
    density: float = 0.2
    seed: int = 0
    module: str = ""  # seeds DARE's masks per module, deterministically


@dataclass
class MergedFactors:
    B: torch.Tensor  # (out, k)
    A: torch.Tensor  # (k, in)
    info: dict[str, Any] = field(default_factory=dict)  # method-specific numbers for the report


def weighted_stack(terms: Sequence[MergeTerm]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = Σ w_i·B_i @ A_i exactly: B = [w_1·B_1, ...], A = [A_1; ...]."""
    return stack_factors([(term.weight * term.B, term.A) for term in terms])


def default_rank(terms: Sequence[MergeTerm]) -> int:
    """PEFT's default for its SVD merges: the largest input rank."""
    return max(term.rank for term in terms)


def balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U·sqrt(S), A = sqrt(S)·Vh: neither factor carries the whole magnitude (better fp16 range)."""
    root = S.clamp_min(0).sqrt()
    return U * root, root[:, None] * Vh


def choose_rank(S: torch.Tensor, options: MergeOptions, default: int) -> int:
    limit = max(1, S.numel())
    if options.rank_rule is None:
        return max(1, min(default, limit))
    return max(1, min(options.rank_rule.select(S if S.numel() else S.new_zeros(1)), limit))


# --- exact methods -------------------------------------------------------------------------------------------


@register("cat", reference="exact concatenation of factors (no approximation)", exact=True, dense=False,
          summary="exact: stack w_i·s_i·B_i and A_i; rank Σ r_i")
def merge_cat(terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    B, A = weighted_stack(terms)
    return MergedFactors(B, A)


@register("svd", reference="Eckart–Young best rank-R approximation, SVD via QR of stacked factors",
          exact=True, dense=False, summary="best rank-R (or energy-F) approximation of Σ w_i·ΔW_i, never dense")
def merge_svd(terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    B, A = weighted_stack(terms)
    # QR of the stacked (out, Σr) and (in, Σr) factors and an SVD of the Σr x Σr core: the exact SVD of the sum.
    svd = lowrank_svd(B, A)
    k = choose_rank(svd.S, options, default_rank(terms))
    new_B, new_A = balanced(svd.U[:, :k], svd.S[:k], svd.Vh[:k])
    return MergedFactors(new_B, new_A, {"retained_energy": retained_energy(svd.S, k) if svd.S.numel() else 1.0})


@register("rank1-topk", reference="pooled rank-one components of each input's exact SVD (data-free heuristic)",
          exact=False, dense=False,
          summary="keep the R largest weighted σ_j·u_j·v_jᵀ over all inputs (default R = mean input rank)")
def merge_rank1_topk(terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    us, ss, vhs = [], [], []
    for term in terms:
        svd = lowrank_svd(term.weight * term.B, term.A)  # a negative weight flips u, σ stays >= 0
        us.append(svd.U)
        ss.append(svd.S)
        vhs.append(svd.Vh)
    U, S, Vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    order = torch.argsort(S, descending=True)
    U, S, Vh = U[:, order], S[order], Vh[order]
    default = max(1, round(sum(term.rank for term in terms) / len(terms)))
    k = choose_rank(S, options, default)
    new_B, new_A = balanced(U[:, :k], S[:k], Vh[:k])
    # What the same rank would give at best: the exact SVD of the weighted sum (cheap, from stacked factors).
    exact_S = lowrank_svd(*weighted_stack(terms), compute_uv=False).S
    pooled = float(S.square().sum())
    return MergedFactors(new_B, new_A, {
        "pooled_energy_kept": float(S[:k].square().sum()) / pooled if pooled > 0 else 1.0,
        "svd_error_at_rank": math.sqrt(max(0.0, 1.0 - retained_energy(exact_S, k))) if exact_S.numel() else 0.0,
    })


# --- dense, published sparsification methods -----------------------------------------------------------------


def dense_updates(terms: Sequence[MergeTerm]) -> list[torch.Tensor]:
    """Each input's weighted ΔW as a dense (out, in) matrix (float64 when small, else float32)."""
    out, inp = terms[0].B.shape[0], terms[0].A.shape[1]
    dtype = torch.float64 if out * inp <= FLOAT64_DENSE_LIMIT else torch.float32
    return [(term.weight * term.B.to(dtype)) @ term.A.to(dtype) for term in terms]


def keep_top_magnitude(update: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density·n) entries of largest magnitude (ties at the threshold are kept)."""
    if density >= 1.0:
        return update
    count = max(1, math.ceil(density * update.numel()))
    magnitudes = update.abs().flatten()
    threshold = torch.kthvalue(magnitudes, magnitudes.numel() - count + 1).values
    return torch.where(update.abs() >= threshold, update, torch.zeros((), dtype=update.dtype))


def truncated_dense(merged: torch.Tensor, terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    """Rank-R SVD of the dense merged update (here the out x in SVD is unavoidable: the update is full rank)."""
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    k = choose_rank(S.to(torch.float64), options, default_rank(terms))
    new_B, new_A = balanced(U[:, :k].to(torch.float64), S[:k].to(torch.float64), Vh[:k].to(torch.float64))
    return MergedFactors(new_B, new_A, {"retained_energy": retained_energy(S.to(torch.float64), k)})


@register("ties", reference="TIES-Merging: Yadav et al. 2023, 'Resolving Interference When Merging Models' "
          "(arXiv:2306.01708)", exact=False, dense=True, uses_density=True,
          summary="trim each w_i·ΔW_i to its top-density entries, elect signs, disjoint mean; then rank-R SVD")
def merge_ties(terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    trimmed = torch.stack([keep_top_magnitude(u, options.density) for u in dense_updates(terms)])
    # Elect the sign with the larger total mass per entry (the paper's Σ τ), then average only the agreeing,
    # non-zero entries ("disjoint mean").
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    counts = agrees.sum(dim=0).clamp_min(1)
    merged = (trimmed * agrees).sum(dim=0) / counts
    return truncated_dense(merged, terms, options)


def module_seed(seed: int, module: str, index: int) -> int:
    """A seed per (run seed, module, input): stable across runs and Python processes (no hash randomisation)."""
    return (seed * 1_000_003 + zlib.crc32(module.encode()) * 31 + index) % (2**63)


@register("dare", reference="DARE: Yu et al. 2023, 'Language Models are Super Mario: Absorbing Abilities from "
          "Homologous Models as a Free Lunch' (arXiv:2311.03099)", exact=False, dense=True, uses_density=True,
          summary="drop entries of each ΔW_i at random (keep density), rescale by 1/density, weighted sum; "
          "then rank-R SVD (deterministic with --seed)")
def merge_dare(terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    updates = dense_updates(terms)
    merged = torch.zeros_like(updates[0])
    for index, update in enumerate(updates):
        generator = torch.Generator().manual_seed(module_seed(options.seed, options.module, index))
        keep = torch.rand(update.shape, generator=generator, dtype=torch.float32) < options.density
        merged += torch.where(keep, update / options.density, torch.zeros((), dtype=update.dtype))
    return truncated_dense(merged, terms, options)


@register("magnitude", reference="magnitude pruning of task vectors (the trim step of TIES-Merging, Yadav et al. "
          "2023; PEFT's magnitude_prune)", exact=False, dense=True, uses_density=True,
          summary="keep the top-density entries of each w_i·ΔW_i by magnitude, sum; then rank-R SVD")
def merge_magnitude(terms: Sequence[MergeTerm], options: MergeOptions) -> MergedFactors:
    updates = dense_updates(terms)
    merged = torch.stack([keep_top_magnitude(u, options.density) for u in updates]).sum(dim=0)
    return truncated_dense(merged, terms, options)
