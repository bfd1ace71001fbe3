"""Rank selection for truncation, as pure functions of singular-value spectra.

Every rule takes a descending, non-negative spectrum ``S`` (the exact singular values of one module's scaled
update ``s·B·A``) and returns how many leading singular triplets to keep. By Eckart–Young the best rank-k
approximation in Frobenius (and spectral) norm keeps the k largest, so choosing a rank is all there is to choose;
the kept fraction of energy is ``Σ_{i<k} σ_i² / Σ σ_i²`` and the relative Frobenius error is ``sqrt(1 − that)``.

Every rule returns at least 1: a rank-0 module cannot be written in PEFT or kohya files (PEFT would re-create the
layer from its config on load and initialise it), so an all-zero update keeps one zero triplet instead.

The dynamic rules follow the *definitions* of kohya-ss/sd-scripts ``networks/resize_lora.py`` (``sv_ratio``,
``sv_fro``, ``sv_cumulative``) but not its indexing: there, ``index_sv_*`` already returns the number of values
needed (a count, e.g. ``searchsorted(...) + 1``) and ``rank_resize`` adds 1 again (``new_rank = index + 1``), so
every dynamic resize keeps one singular value more than its own criterion asks for (``sv_ratio`` also uses a
strict ``σ > σ_max / T``). Here each rule returns exactly the smallest rank that meets its criterion, so
``kohya_rank == min(rank_here + 1, len(S))`` whenever no σ equals the cut-off. kohya also caps the result at
``len(S) − 1`` before adding 1; here the cap is ``len(S)``.

The global budget rule (``allocate_ranks``) picks per-module ranks whose total factor parameter count fits a
budget and maximise the total retained energy Σ_m Σ_{i<k_m} σ_{m,i}². It is a multiple-choice knapsack. With one
cost per rank for every module (same shapes), taking singular values greedily by σ² is optimal (every item costs
the same and each module's gains are non-increasing, so an exchange argument applies). With unequal costs
(q_proj 4096+4096 vs up_proj 4096+11008 parameters per rank) greedy-by-σ²-per-parameter is *not* always optimal
(it can strand budget; see the counter-example in the tests), so ``allocate_ranks`` solves the knapsack exactly
by dynamic programming over the budget in units of the gcd of the costs, and falls back to that greedy rule only
when the table would be too large.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_tools.errors import InvalidOptionError

# Relative slack so that a criterion met up to rounding (F = 1.0, T equal to a ratio in the data) counts as met.
_SLACK = 1e-12
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# Above this many DP cells (modules x extra ranks x budget units) the exact allocation is too slow in Python;
# allocate_ranks then uses the greedy rule and says so.
MAX_DP_CELLS = 400_000_000


def _spectrum(S: torch.Tensor) -> torch.Tensor:
    S = S.detach().to(torch.float64).flatten()
    if S.numel() == 0:
        raise ValueError("empty spectrum")
    return S


def fixed_rank(S: torch.Tensor, rank: int) -> int:
    """``min(rank, len(S))`` (at least 1)."""
    return max(1, min(int(rank), _spectrum(S).numel()))


def energy_fraction_rank(S: torch.Tensor, fraction: float) -> int:
    """Smallest k with ``Σ_{i<k} σ_i² >= fraction · Σ σ_i²`` (PEFT's float-rank convention, by energy)."""
    return _cumulative_rank(_spectrum(S).square(), fraction)


def sv_ratio_rank(S: torch.Tensor, ratio: float) -> int:
    """kohya ``sv_ratio``: keep every ``σ_i >= σ_max / ratio`` (``ratio >= 1``)."""
    S = _spectrum(S)
    if float(S[0]) == 0.0:
        return 1
    cutoff = float(S[0]) / ratio * (1.0 - _SLACK)
    return max(1, int((S >= cutoff).sum()))


def sv_fro_rank(S: torch.Tensor, target: float) -> int:
    """kohya ``sv_fro``: smallest k with ``sqrt(Σ_{i<k} σ_i² / Σ σ_i²) >= target``."""
    return _cumulative_rank(_spectrum(S).square(), target * target)


def sv_cumulative_rank(S: torch.Tensor, target: float) -> int:
    """kohya ``sv_cumulative``: smallest k with ``Σ_{i<k} σ_i / Σ σ_i >= target``."""
    return _cumulative_rank(_spectrum(S), target)


def _cumulative_rank(weights: torch.Tensor, fraction: float) -> int:
    total = float(weights.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(weights, 0) / total
    hits = torch.nonzero(cumulative >= fraction - _SLACK)
    return max(1, int(hits[0]) + 1 if hits.numel() else weights.numel())


@dataclass(frozen=True)
class RankRule:
    """A per-module rank rule: ``fixed`` (value = rank), ``energy`` (fraction) or a kohya dynamic method."""

    method: str
    value: float

    def __post_init__(self) -> None:
        validate_rule(self.method, self.value)

    def select(self, S: torch.Tensor) -> int:
        if self.method == "fixed":
            return fixed_rank(S, int(self.value))
        if self.method == "energy":
            return energy_fraction_rank(S, self.value)
        if self.method == "sv_ratio":
            return sv_ratio_rank(S, self.value)
        if self.method == "sv_fro":
            return sv_fro_rank(S, self.value)
        return sv_cumulative_rank(S, self.value)

    @property
    def description(self) -> str:
        if self.method == "fixed":
            return f"rank {int(self.value)}"
        if self.method == "energy":
            return f"energy {self.value:g}"
        return f"{self.method} {self.value:g}"


def validate_rule(method: str, value: float) -> None:
    """Raise ``InvalidOptionError`` for a value the rule cannot use."""
    if not math.isfinite(value):
        raise InvalidOptionError(f"{method}: the value must be finite, found {value}")
    if method == "fixed":
        if value != int(value) or value < 1:
            raise InvalidOptionError(f"rank must be a positive integer, found {value:g}")
    elif method in ("energy", "sv_fro", "sv_cumulative"):
        if not 0.0 < value <= 1.0:
            raise InvalidOptionError(f"{method}: the fraction must lie in (0, 1], found {value:g}")
    elif method == "sv_ratio":
        if value < 1.0:
            raise InvalidOptionError(
                f"sv_ratio: the threshold T keeps σ >= σ_max / T and must be >= 1, found {value:g}")
    else:
        raise InvalidOptionError(f"unknown rank rule {method!r}; choose fixed, energy or one of "
                                 f"{', '.join(DYNAMIC_METHODS)}")


def retained_energy(S: torch.Tensor, rank: int) -> float:
    """``Σ_{i<rank} σ_i² / Σ σ_i²`` (1.0 for an all-zero update: nothing is lost)."""
    energy = _spectrum(S).square()
    total = float(energy.sum())
    if total == 0.0:
        return 1.0
    if rank >= energy.numel():
        return 1.0
    return min(1.0, float(energy[:rank].sum()) / total)


def relative_error(retained: float) -> float:
    """Relative Frobenius error ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` of the best rank-k approximation, from its energy."""
    return math.sqrt(max(0.0, 1.0 - retained))


@dataclass(frozen=True)
class Allocation:
    ranks: list[int]
    cost: int  # factor parameters used
    energy: float  # Σ retained σ² over all modules
    method: str  # "exact" (dynamic programming) or "greedy"


def allocate_ranks(energies: Sequence[torch.Tensor], unit_costs: Sequence[int], budget: int,
                   *, max_cells: int = MAX_DP_CELLS) -> Allocation:
    """Ranks ``1 <= k_m <= len(energies[m])`` with ``Σ k_m·unit_costs[m] <= budget`` maximising Σ retained σ².

    ``energies[m]`` are module m's σ² (descending); ``unit_costs[m]`` its parameters per rank (out + in). Exact
    (multiple-choice knapsack by dynamic programming) unless the table exceeds ``max_cells``; then greedy.
    """
    if len(energies) != len(unit_costs):
        raise ValueError("one unit cost per module")
    if not energies:
        return Allocation([], 0, 0.0, "exact")
    if any(c <= 0 for c in unit_costs):
        raise ValueError("unit costs must be positive")
    floor_cost = sum(unit_costs)  # every module keeps at least rank 1
    if budget < floor_cost:
        raise InvalidOptionError(f"budget of {budget} parameters is below the {floor_cost} needed to keep rank 1 "
                                 "in every module")
    unit = math.gcd(*unit_costs)
    units = [c // unit for c in unit_costs]
    free = (budget - floor_cost) // unit  # budget units left after rank 1 everywhere
    extras = [max(0, e.numel() - 1) for e in energies]
    cells = sum(min(x, free // u) for x, u in zip(extras, units, strict=True)) * (free + 1)
    if cells > max_cells:
        ranks = greedy_allocate(energies, unit_costs, budget)
        method = "greedy"
    else:
        ranks = _knapsack(energies, units, free)
        method = "exact"
    cost = sum(k * c for k, c in zip(ranks, unit_costs, strict=True))
    energy = sum(float(e[:k].double().sum()) for e, k in zip(energies, ranks, strict=True))
    return Allocation(ranks, cost, energy, method)


def _knapsack(energies: Sequence[torch.Tensor], units: list[int], free: int) -> list[int]:
    # best[b]: the largest extra energy (beyond rank 1 everywhere) using exactly b budget units; -inf if none.
    best = torch.full((free + 1,), float("-inf"), dtype=torch.float64)
    best[0] = 0.0
    choices: list[torch.Tensor] = []  # per module: extra ranks taken, for each b of the updated table
    for energy, u in zip(energies, units, strict=True):
        gains = torch.cumsum(energy.double().flatten()[1:], 0)  # gains[j-1]: energy of ranks 2..j+1
        updated = best.clone()
        choice = torch.zeros(free + 1, dtype=torch.int16)
        for j in range(1, gains.numel() + 1):
            shift = j * u
            if shift > free:
                break
            candidate = best[: free + 1 - shift] + float(gains[j - 1])
            better = candidate > updated[shift:]
            updated[shift:] = torch.where(better, candidate, updated[shift:])
            choice[shift:][better] = j
        best = updated
        choices.append(choice)
    b = int(torch.argmax(best))  # first maximum: the cheapest of equally good allocations
    ranks: list[int] = []
    for choice, u in zip(reversed(choices), reversed(units), strict=True):
        j = int(choice[b])
        ranks.append(1 + j)
        b -= j * u
    return ranks[::-1]


def greedy_allocate(energies: Sequence[torch.Tensor], unit_costs: Sequence[int], budget: int) -> list[int]:
    """Rank 1 everywhere, then repeatedly the next singular value with the largest σ² per parameter that fits.

    Optimal when all unit costs are equal; otherwise it can leave budget unused that a better mix would spend.
    """
    ranks = [1] * len(energies)
    remaining = budget - sum(unit_costs)
    if remaining < 0:
        raise InvalidOptionError(f"budget of {budget} parameters is below the {sum(unit_costs)} needed to keep "
                                 "rank 1 in every module")
    heap = [(-float(e[1]) / c, m) for m, (e, c) in enumerate(zip(energies, unit_costs, strict=True))
            if e.numel() > 1]
    heapq.heapify(heap)
    while heap:
        _, m = heapq.heappop(heap)
        if unit_costs[m] > remaining:
            continue  # the budget only shrinks, so this module can never grow again
        ranks[m] += 1
        remaining -= unit_costs[m]
        if ranks[m] < energies[m].numel():
            heapq.heappush(heap, (-float(energies[m][ranks[m]]) / unit_costs[m], m))
    return ranks
