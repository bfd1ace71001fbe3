"""The global part of the whole-adapter variants, and their factors built one group of modules at a time.

``compare.variants`` gives each family per module. A whole-adapter variant also needs what spans modules: the
list of variants (labels, methods, ranks, schemes), the avg-rank allocation (``allocate_ranks`` is a knapsack over
*all* modules' spectra), the stored rank shared by every module (the identity and quant rows), and the notes.
``VariantPlan`` computes those once from every module's spectrum (S only: (r,) float64 each) and keeps the
``Variant`` objects that carry the summaries. ``VariantPlan.build(names)`` then decomposes just those modules
(SVD bases, activation-aware eigenfactors), returns every variant's factors for them, adds their bytes, predicted
errors and reference energies to the variants, and keeps nothing else: a streamed base
(``compare.end_to_end_stream``) builds one decoder block's modules, runs them and drops them, so it never holds
more than one block's factors; the whole model in memory builds everything at once (``build_all``). Either way
the factors are the same tensors (each module's work depends on that module and the global allocation only), and
once every module is built the summaries are summed in the plan's module order, so they are equal to the bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lora_tools.adapter import Adapter
from lora_tools.compare.span import SpanCovariance
from lora_tools.compare.variants import (
    DEFAULT_MIXED_SCHEMES,
    DEFAULT_RANKS,
    ModuleFactors,
    PredictedError,
    Variant,
    decompose,
    module_variant,
)
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.linalg.truncate import allocate_ranks
from lora_tools.quant import DEFAULT_SCHEMES, QuantScheme, get_scheme

Covariances = Mapping[str, torch.Tensor | SpanCovariance]


@dataclass(frozen=True)
class _Family:
    """How to build one variant's factors for a module: the family, its uniform rank k (or the allocation of an
    avg-rank variant: module -> rank) and its rounding scheme."""

    method: str
    rank: int | None = None
    scheme: QuantScheme | None = None
    allocation: Mapping[str, int] | None = None

    def module_rank(self, name: str) -> int | None:
        return self.allocation[name] if self.allocation is not None else self.rank


class VariantPlan:
    """Every whole-adapter variant of ``adapter`` over ``modules`` (default: all), identity first, then svd,
    svd-act (only with ``covariances``), quant, svd+quant and avg-rank; see ``build_variants``.

    Construction reads every module once for its spectrum (checking its factors and covariance shape), so bad
    input is refused before any factors are built. ``variants`` are the summaries' carriers, complete (bytes,
    predicted errors, reference energies, ranks) once ``build`` has seen every module exactly once.
    """

    @torch.no_grad()
    def __init__(self, adapter: Adapter, covariances: Covariances | None = None,
                 modules: Iterable[str] | None = None, *, ranks: Sequence[int] = DEFAULT_RANKS,
                 schemes: Sequence[str] = DEFAULT_SCHEMES, mixed_schemes: Sequence[str] = DEFAULT_MIXED_SCHEMES,
                 avg_rank: bool = True, identity: bool = True) -> None:
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise InvalidOptionError(f"ranks must be positive integers, got {list(ranks)}")
        ranks = sorted(set(ranks))
        quant_schemes = [get_scheme(s) for s in dict.fromkeys(schemes)]
        mixed = [get_scheme(s) for s in dict.fromkeys(mixed_schemes)]
        self.adapter = adapter
        self.covariances = dict(covariances or {})
        self.names = list(dict.fromkeys(adapter.modules if modules is None else modules))
        unknown = [n for n in self.names if n not in adapter.modules]
        if unknown:
            raise ModuleMismatchError(f"{adapter.path}: no module {unknown[0]!r} in the adapter")
        if not self.names:
            raise ModuleMismatchError(f"{adapter.path}: no modules to build variants from")
        # The global pass: per module its spectrum, (out, in) and stored rank; the bases are dropped at once.
        spectra: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, int]] = {}
        stored: set[int] = set()
        for name in self.names:
            basis = decompose(adapter, name, self.covariances.get(name), spectrum_only=True)
            spectra[name], shapes[name] = basis.S, basis.shape
            stored.add(int(basis.B.shape[1]))
            del basis
        stored_rank = stored.pop() if len(stored) == 1 else None  # what the identity and quant rows keep
        plain = [n for n in self.names if self.covariances.get(n) is None]
        self.reference: dict[str, PredictedError] = {}  # shared by every variant, as the denominators are
        self.families: list[_Family] = []
        self.variants: list[Variant] = []

        def add(label: str, family: _Family, rank: int | None, scheme: str | None,
                notes: list[str] | None = None) -> None:
            self.families.append(family)
            self.variants.append(Variant(label, family.method, rank, scheme, 0, {}, {}, self.reference,
                                         notes or []))

        if identity:
            add("identity", _Family("identity"), stored_rank, None)
        for k in ranks:
            add(f"svd-r{k}", _Family("svd", k), k, None)
        if len(plain) < len(self.names):  # some module has a covariance
            note = [f"{len(plain)} module(s) without calibration inputs truncated by plain SVD, e.g. {plain[0]}"] \
                if plain else []
            for k in ranks:
                add(f"svd-act-r{k}", _Family("svd-act", k), k, None, list(note))
        for scheme in quant_schemes:
            add(scheme.name, _Family("quant", scheme=scheme), stored_rank, scheme.name)
        for scheme in mixed:
            for k in ranks:
                add(f"svd-r{k}+{scheme.name}", _Family("svd+quant", k, scheme), k, scheme.name)
        if avg_rank:
            for k in ranks:
                allocation, note = self._allocate(k, spectra, shapes)
                add(f"avg-rank-r{k}", _Family("avg-rank", k, allocation=allocation), k, None, [note])
        self._planned, self._built = set(self.names), set()

    def _allocate(self, rank: int, spectra: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, tuple[int, int]]) -> tuple[dict[str, int], str]:
        """The global budget of uniform rank ``rank`` (min(rank, module rank) each, as ``truncate --avg-rank``),
        reallocated across all modules for the most retained Σσ²; at most the bytes of ``svd-r{rank}``."""
        unit_costs = [shapes[n][0] + shapes[n][1] for n in self.names]
        budget = sum(min(rank, spectra[n].numel()) * c for n, c in zip(self.names, unit_costs, strict=True))
        allocation = allocate_ranks([spectra[n].square() for n in self.names], unit_costs, budget)
        note = (f"{allocation.method} allocation: ranks {min(allocation.ranks)}-{max(allocation.ranks)}, "
                f"{allocation.cost:,} of {budget:,} parameters")
        return dict(zip(self.names, allocation.ranks, strict=True)), note

    @property
    def complete(self) -> bool:
        """Whether every module has been built (the summaries are final)."""
        return len(self._built) == len(self.names)

    @torch.no_grad()
    def build(self, names: Iterable[str]) -> list[dict[str, ModuleFactors]]:
        """Every variant's factors for ``names`` (aligned with ``variants``), adding those modules' bytes,
        predicted errors, ranks and reference energies to the variants. Each module once: a second build of it
        would count its bytes twice."""
        names = list(names)
        for name in names:
            if name not in self._planned:
                raise ModuleMismatchError(f"{self.adapter.path}: module {name!r} is not in this variant plan")
            if name in self._built or names.count(name) > 1:
                raise ValueError(f"module {name} built twice for these variants (its bytes would count twice)")
        built: list[dict[str, ModuleFactors]] = [{} for _ in self.variants]
        for name in names:
            basis = decompose(self.adapter, name, self.covariances.get(name))
            self.reference[name] = basis.reference
            for family, variant, factors in zip(self.families, self.variants, built, strict=True):
                f, size, predicted = module_variant(basis, family.method, family.module_rank(name), family.scheme)
                factors[name] = f
                variant.bytes += size
                variant.predicted[name] = predicted
                variant.ranks[name] = f.rank
            self._built.add(name)
            del basis  # its bases go now: only the returned factors stay
        if self.complete:
            self._in_plan_order()
        return built

    def _in_plan_order(self) -> None:
        """Module order of the summaries = the plan's, whatever order the groups came in: the sums of
        ``predicted_rel_error`` then add the same floats in the same order as an all-at-once build."""
        reference = dict(self.reference)
        self.reference.clear()
        self.reference.update((n, reference[n]) for n in self.names)  # in place: every variant shares it
        for variant in self.variants:
            variant.predicted = {n: variant.predicted[n] for n in self.names}
            variant.ranks = {n: variant.ranks[n] for n in self.names}

    def build_all(self) -> list[Variant]:
        """Every variant with its factors for every module (the whole model in memory)."""
        for variant, factors in zip(self.variants, self.build(self.names), strict=True):
            variant.factors = factors
        return self.variants


@torch.no_grad()
def build_variants(adapter: Adapter, covariances: Covariances | None = None, *,
                   ranks: Sequence[int] = DEFAULT_RANKS, schemes: Sequence[str] = DEFAULT_SCHEMES,
                   mixed_schemes: Sequence[str] = DEFAULT_MIXED_SCHEMES, avg_rank: bool = True,
                   identity: bool = True, modules: Iterable[str] | None = None) -> list[Variant]:
    """Every whole-adapter variant, identity first, then svd, svd-act (only with ``covariances``), quant,
    svd+quant and avg-rank, with its factors for every module. ``modules`` restricts the variants to those adapter
    modules (default: all).

    Ranks at or above a module's rank keep that module whole (its bytes and error are those of its full rank).
    An avg-rank variant whose allocation is uniform duplicates ``svd-r{k}``; it is still listed (the report
    shows the solver found nothing better).
    """
    return VariantPlan(adapter, covariances, modules, ranks=ranks, schemes=schemes, mixed_schemes=mixed_schemes,
                       avg_rank=avg_rank, identity=identity).build_all()
