"""The rank x bits frontier of end-to-end results, a recommendation, and how well each predictor orders variants.

Works on the plain rows of ``end_to_end.evaluate_variants`` (``bytes``, ``kl_mean``, ``method``, predicted errors)
so it can be tested on hand-made points. ``kl_mean`` is the mean KL for causal LMs and the mean 1 − cos of pooled
embeddings for encoders; everything here treats it as "divergence, lower is better".

* Pareto frontier of (bytes, kl_mean): a variant is on it when no other variant is at most as large *and* at most
  as divergent, strictly better in one of the two. Equal points do not dominate each other (both stay on it).
* Recommendation (the adapter itself, method ``identity``, is never recommended — it is the reference):
  ``max_kl`` -> the fewest bytes with kl_mean <= max_kl (ties: smaller KL, then the first listed);
  ``budget`` -> the smallest kl_mean with bytes <= budget (ties: fewer bytes, then the first listed);
  neither -> by default the fewest bytes keeping ``DEFAULT_EFFECT_KEPT`` of the adapter's effect
  (kl_mean <= (1 − 0.95)·KL(adapter‖base)); an unmet default gives a recommendation with ``label`` None,
  an unmet ``max_kl``/``budget`` raises ``NoVariantMeetsError`` naming the closest variant.
* Predictors: Spearman rank correlation between each variant's predicted relative error (weight space and, with
  calibration data, output space; see ``compare.variants``) and its measured kl_mean, per method and over all
  variants. Ties get average ranks; ρ is the Pearson correlation of the ranks (None below ``MIN_POINTS``
  variants or when either side is constant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lora_tools.errors import InvalidOptionError

DEFAULT_EFFECT_KEPT = 0.95
MIN_POINTS = 3  # Spearman over two points is always ±1: it says nothing
PREDICTORS = {
    "svd": "spectrum tail Σσ² beyond k",
    "svd-act": "calibration eigenvalue tail Σλ beyond k",
    "quant": "uniform rounding noise (step²/12)",
    "svd+quant": "spectrum tail + rounding noise",
    "avg-rank": "spectrum tail at the allocated ranks",
}


class NoVariantMeetsError(InvalidOptionError):
    """--max-kl or --budget that no variant satisfies."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (bytes, divergence): True when no other point dominates it. Non-finite points are never on it."""
    flags = []
    for i, (size, value) in enumerate(points):
        if not (_finite(size) and _finite(value)):
            flags.append(False)
            continue
        dominated = any(
            j != i and _finite(s) and _finite(v) and s <= size and v <= value and (s < size or v < value)
            for j, (s, v) in enumerate(points))
        flags.append(not dominated)
    return flags


def mark_frontier(rows: list[dict[str, Any]]) -> None:
    """Set ``on_frontier`` on every row (in place)."""
    for row, flag in zip(rows, pareto_flags([(r["bytes"], r["kl_mean"]) for r in rows]), strict=True):
        row["on_frontier"] = flag


def frontier(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows on the frontier, by increasing bytes (then decreasing divergence)."""
    flags = pareto_flags([(r["bytes"], r["kl_mean"]) for r in rows])
    return sorted((r for r, f in zip(rows, flags, strict=True) if f), key=lambda r: (r["bytes"], -r["kl_mean"]))


def _describe(row: dict[str, Any]) -> str:
    return f"{row['label']} (mean KL {row['kl_mean']:.3g}, {row['bytes']:,} bytes)"


def check_recommendation_options(max_kl: float | None, budget: int | None) -> None:
    """Refuse bad --max-kl / --budget values before any work (``recommend`` checks them again)."""
    if max_kl is not None and budget is not None:
        raise InvalidOptionError("give --max-kl or --budget, not both")
    if max_kl is not None and not (_finite(max_kl) and max_kl >= 0):
        raise InvalidOptionError(f"--max-kl must be a finite number >= 0, got {max_kl}")
    if budget is not None and not (_finite(budget) and budget > 0):
        raise InvalidOptionError(f"--budget must be a positive number of bytes, got {budget}")


def recommend(rows: Sequence[dict[str, Any]], *, max_kl: float | None = None, budget: int | None = None,
              kl_adapter_base: float | None = None) -> dict[str, Any]:
    """The recommended variant for ``max_kl`` or ``budget`` (at most one), as a plain dict."""
    check_recommendation_options(max_kl, budget)
    indexed = [(i, r) for i, r in enumerate(rows)
               if r.get("method") != "identity" and _finite(r["kl_mean"]) and _finite(r["bytes"])]
    if not indexed:
        raise NoVariantMeetsError("no evaluated variant to recommend (every variant's divergence is missing)")
    if budget is not None:
        fits = [(i, r) for i, r in indexed if r["bytes"] <= budget]
        if not fits:
            smallest = min(indexed, key=lambda p: (p[1]["bytes"], p[1]["kl_mean"], p[0]))[1]
            raise NoVariantMeetsError(f"--budget {budget:,} bytes: no variant fits; the smallest is "
                                      f"{_describe(smallest)}")
        chosen = min(fits, key=lambda p: (p[1]["kl_mean"], p[1]["bytes"], p[0]))[1]
        return _recommendation("budget", budget, chosen)
    criterion, limit = "max_kl", max_kl
    if max_kl is None:
        if not (_finite(kl_adapter_base) and kl_adapter_base > 0):
            return _recommendation("effect_kept", DEFAULT_EFFECT_KEPT, None,
                                   "the adapter does not change the model's outputs: nothing to keep")
        criterion, limit = "effect_kept", DEFAULT_EFFECT_KEPT
        max_kl = (1.0 - DEFAULT_EFFECT_KEPT) * kl_adapter_base
    within = [(i, r) for i, r in indexed if r["kl_mean"] <= max_kl]
    if not within:
        closest = min(indexed, key=lambda p: (p[1]["kl_mean"], p[1]["bytes"], p[0]))[1]
        if criterion == "effect_kept":
            return _recommendation(criterion, limit, None, f"no variant keeps {DEFAULT_EFFECT_KEPT:.0%} of the "
                                   f"adapter's effect; the closest is {_describe(closest)}")
        raise NoVariantMeetsError(f"--max-kl {max_kl:g}: no variant is within it; the closest is "
                                  f"{_describe(closest)}")
    chosen = min(within, key=lambda p: (p[1]["bytes"], p[1]["kl_mean"], p[0]))[1]
    return _recommendation(criterion, limit, chosen)


def _recommendation(criterion: str, limit: float | None, row: dict[str, Any] | None,
                    note: str | None = None) -> dict[str, Any]:
    keys = ("label", "method", "rank", "scheme", "bytes", "kl_mean", "top1", "effect_kept")
    result: dict[str, Any] = {"criterion": criterion, "limit": limit}
    result.update({k: (row.get(k) if row is not None else None) for k in keys})
    result["note"] = note
    return result


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman's ρ over the pairs where both values are finite (None when undefined)."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if _finite(a) and _finite(b)]
    if len(pairs) < MIN_POINTS:
        return None
    rx = average_ranks([a for a, _ in pairs])
    ry = average_ranks([b for _, b in pairs])
    mean = (len(pairs) + 1) / 2  # the mean of 1..n, which average ranks preserve
    sxy = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mean) ** 2 for a in rx)
    syy = sum((b - mean) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def predictor_analysis(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (and ``all``): how well predicted relative errors order the variants by measured kl_mean."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("method") != "identity":
            groups.setdefault(row["method"], []).append(row)
    groups["all"] = [r for rows_ in groups.values() for r in rows_]
    result = []
    for method, members in groups.items():
        measured = [r["kl_mean"] for r in members]
        result.append({
            "method": method,
            "variants": len(members),
            "predictor": PREDICTORS.get(method, "each variant's own method's prediction, pooled"),
            "spearman_weight": spearman([r.get("predicted_weight_rel_error") for r in members], measured),
            "spearman_output": spearman([r.get("predicted_output_rel_error") for r in members], measured),
        })
    return result


def finalize(section: dict[str, Any], *, max_kl: float | None = None, budget: int | None = None) -> dict[str, Any]:
    """Add ``on_frontier`` to every variant, ``recommendation`` and ``predictors`` to the section (in place)."""
    rows = section["variants"]
    mark_frontier(rows)
    section["recommendation"] = recommend(rows, max_kl=max_kl, budget=budget,
                                          kl_adapter_base=section.get("kl_adapter_base"))
    section["predictors"] = predictor_analysis(rows)
    return section
