"""compare-quant's roll-ups: all layers together per method, duplicates marked, and the equal-bytes verdicts.

Which error a verdict uses is stated once, by ``evaluation``: ``held-out`` reads ``rel_error`` (tokens no fit saw),
``in-sample`` (``--holdout 0``) reads ``rel_error_calib``; every summary row carries the word, so no row can be
read as held-out when it is not.
"""

from __future__ import annotations

import math
from typing import Any

from lora_tools.compare.holdout import HELD_OUT
from lora_tools.compare.metrics import (
    TOKEN_LOG_RANGE,
    _hist_quantile,
    entry_histogram_edges,
    rel_error,
    snr_db,
)

# The truncation a scheme is judged against first: activation-aware SVD minimises the output error on the
# calibration inputs, so at equal bytes it is the strongest truncation compare-quant fits (plain SVD only
# minimises the weight error). It is not chosen by its held-out score, which would select on the test data.
BEST_TRUNCATION = "svd-act"


def error_key(evaluation: str) -> str:
    """The result field that holds the error of the tokens named by ``evaluation``."""
    return "rel_error" if evaluation == HELD_OUT else "rel_error_calib"


def mark_duplicates(results: list[dict[str, Any]], keys: list[Any]) -> None:
    """Set ``same_as`` on each result: None for the first of its key, else the label of that first result.

    Equal keys mean the same approximation (an equal-bytes rank that is also a --ranks rank, or two schemes
    whose bytes buy the same rank), so a reader needs the row once.
    """
    first: dict[Any, str] = {}
    for result, key in zip(results, keys, strict=True):
        result["same_as"] = first.get(key)
        first.setdefault(key, result["label"])


def aggregate(rows: list[dict[str, Any]], layer_stats: list[list[Any]]) -> tuple[list[dict[str, Any]],
                                                                               dict[str, Any]]:
    """Per method label over all layers: energies summed (so errors are ‖ΔY‖/‖Y‖ of all layers stacked).

    ``layer_stats[i][j]`` is the streaming ``OutputErrorStats`` of ``rows[i]["results"][j]``.
    """
    groups: dict[str, dict[str, Any]] = {}
    for row, entry_stats in zip(rows, layer_stats, strict=True):
        for result, stats in zip(row["results"], entry_stats, strict=True):
            g = groups.setdefault(result["label"], {
                "label": result["label"], "method": result["method"], "ranks": set(), "layer_ranks": [],
                "equal_budget_to": result["equal_budget_to"], "bytes": 0, "params": 0, "energy": [0.0] * 6,
                "worst": math.inf, "max_abs": 0.0, "token_hist": None, "entry_hist": None, "token_max": 0.0,
                "noise": [0.0, 0.0]})
            g["ranks"].add(result["rank"])
            g["layer_ranks"].append(result["rank"])
            g["bytes"] += result["bytes"]
            g["params"] += row["params"]
            g["energy"] = [a + b for a, b in zip(g["energy"], result["_energy"], strict=True)]
            if result["worst_token_cosine"] == result["worst_token_cosine"]:
                g["worst"] = min(g["worst"], result["worst_token_cosine"])
                g["max_abs"] = max(g["max_abs"], result["max_abs_error"])
                g["token_max"] = max(g["token_max"], result["token_error_max"])
            hist = stats.token_hist.cpu()
            g["token_hist"] = hist if g["token_hist"] is None else g["token_hist"] + hist
            if stats.entry_hist is not None:
                entry = stats.entry_hist.cpu()
                g["entry_hist"] = entry if g["entry_hist"] is None else g["entry_hist"] + entry
            ratio = result["uniform_noise_ratio"]
            if ratio is not None and ratio == ratio and ratio > 0:
                g["noise"][0] += result["_energy"][1]
                g["noise"][1] += result["_energy"][1] / ratio
    table = []
    histograms: dict[str, Any] = {"unit": "|ΔY entry| / rms(Y entry)", "edges": entry_histogram_edges(),
                                  "counts": {}}
    for label, g in groups.items():
        y_hold, err_hold, y_calib, err_calib, inner, y_hat = g["energy"]
        ranks = g["ranks"]
        has_hold = float(g["token_hist"].sum()) > 0
        table.append({
            "label": label,
            "method": g["method"],
            "rank": next(iter(ranks)) if len(ranks) == 1 else None,
            "equal_budget_to": g["equal_budget_to"],
            "bytes": g["bytes"],
            "bits_per_param": 8.0 * g["bytes"] / g["params"],
            "rel_error": rel_error(y_hold, err_hold) if has_hold else math.nan,
            "rel_error_calib": rel_error(y_calib, err_calib),
            "snr_db": snr_db(y_hold, err_hold) if has_hold else math.nan,
            "cosine": inner / math.sqrt(y_hold * y_hat) if y_hold > 0 and y_hat > 0 else math.nan,
            "worst_token_cosine": g["worst"] if has_hold else math.nan,
            "max_abs_error": g["max_abs"] if has_hold else math.nan,
            "token_error_p50": _hist_quantile(g["token_hist"], 0.5, TOKEN_LOG_RANGE, g["token_max"]),
            "token_error_p99": _hist_quantile(g["token_hist"], 0.99, TOKEN_LOG_RANGE, g["token_max"]),
            "uniform_noise_ratio": g["noise"][0] / g["noise"][1] if g["noise"][1] > 0 else None,
        })
        if g["entry_hist"] is not None:
            histograms["counts"][label] = [float(c) for c in g["entry_hist"]]
    # Over all layers, two low-rank labels are the same approximation when their ranks agree in every layer;
    # each rounding scheme is its own.
    mark_duplicates(table, [(g["method"], tuple(g["layer_ranks"])) if g["ranks"] != {None} else (label,)
                            for label, g in groups.items()])
    return table, histograms


def _ratio(a: float, b: float) -> float:
    low, high = sorted((a, b))
    return high / low if low > 0 else math.inf


def summary(layers: list[dict[str, Any]], aggregate_rows: list[dict[str, Any]], schemes: list[str],
            evaluation: str) -> list[dict[str, Any]]:
    """For each layer (and all layers together) and scheme: the scheme against plain SVD and against the best
    truncation (svd-act) at equal bytes — both errors, the winner and by what factor.

    Fields kept from the first version (read by other code): ``scheme_rel_error``, ``svd_rank``, ``svd_bytes``,
    ``svd_rel_error``, ``svd_act_rel_error``, ``winner`` and ``factor`` (both against plain SVD).
    """
    key = error_key(evaluation)

    def compare(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        by_label = {r["label"]: r for r in results}
        out = []
        for scheme in schemes:
            quant = by_label.get(scheme)
            svd = by_label.get(f"svd@{scheme}")
            best = by_label.get(f"{BEST_TRUNCATION}@{scheme}") or svd
            if quant is None or svd is None:
                continue
            q_err, s_err, b_err = quant[key], svd[key], best[key]
            out.append({
                "layer": name, "scheme": scheme, "evaluation": evaluation, "bytes": quant["bytes"],
                "svd_rank": svd["rank"], "svd_bytes": svd["bytes"], "scheme_rel_error": q_err,
                "svd_rel_error": s_err,
                "svd_act_rel_error": best[key] if best is not svd else None,
                "winner": scheme if q_err <= s_err else "svd", "factor": _ratio(q_err, s_err),
                "best_truncation_method": best["method"], "best_truncation_rank": best["rank"],
                "best_truncation_bytes": best["bytes"], "best_truncation_rel_error": b_err,
                "winner_vs_best": scheme if q_err <= b_err else best["method"],
                "factor_vs_best": _ratio(q_err, b_err),
            })
        return out

    rows = []
    for layer in layers:
        rows.extend(compare(layer["results"], layer["name"]))
    rows.extend(compare(aggregate_rows, "all layers"))
    return rows
