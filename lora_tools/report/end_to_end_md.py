"""The end-to-end section of a report, as markdown rendered from the ``end_to_end`` dict (data first).

Every number shown comes from the dict (after ``compare.frontier.finalize``), which is also what report.json holds.
"""

from __future__ import annotations

import math
from typing import Any

from lora_tools.compare.frontier import frontier


def _num(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.2f}%"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _columns(cosine: bool) -> tuple[list[str], Any]:
    """Headers and a row renderer shared by the frontier and the full table."""
    if cosine:
        headers = ["label", "method", "bytes", "mean 1 − cos", "p99 1 − cos", "mean cos", "worst cos",
                   "effect kept"]

        def cells(r: dict[str, Any]) -> list[str]:
            return [r["label"], r["method"], _num(r["bytes"]), _num(r["kl_mean"]), _num(r["kl_p99"]),
                    _num(r.get("cosine_mean"), 6), _num(r.get("cosine_worst"), 6), _percent(r["effect_kept"])]
    else:
        headers = ["label", "method", "bytes", "mean KL", "p99 KL", "top-1", "perplexity", "effect kept"]

        def cells(r: dict[str, Any]) -> list[str]:
            return [r["label"], r["method"], _num(r["bytes"]), _num(r["kl_mean"]), _num(r["kl_p99"]),
                    _percent(r["top1"]), _num(r["ppl"], 4), _percent(r["effect_kept"])]
    return headers, cells


def _intro(section: dict[str, Any]) -> str:
    if section["metric"] == "cosine":
        return (f"Every variant ran {section['sequences']:,} held-out sequences through the full model "
                f"({section['forward_dtype']} on {section['device']}); its mean-pooled embeddings are compared with "
                "those of the unmodified adapter. Without the adapter the base model's embeddings have mean "
                f"cosine {_num(section.get('cosine_adapter_base_mean'), 6)} to the adapter's (1 − cos = "
                f"{_num(section['kl_adapter_base'])}): the adapter's whole effect, the yardstick of *effect kept*.")
    return (f"Every variant ran {section['positions']:,} next-token positions of {section['sequences']:,} held-out "
            f"sequences through the full model ({section['forward_dtype']} on {section['device']}) and is compared "
            f"with the unmodified adapter. Base model perplexity {_num(section['base_ppl'], 4)}, adapter perplexity "
            f"{_num(section['adapter_ppl'], 4)}; KL(P_adapter ‖ P_base) = {_num(section['kl_adapter_base'])} nats "
            f"per token (p99 {_num(section.get('kl_adapter_base_p99'))}): the adapter's whole effect, the yardstick "
            "of *effect kept*.")


def _recommendation(section: dict[str, Any]) -> str:
    rec = section.get("recommendation")
    if not rec:
        return ""
    if rec["label"] is None:
        return f"No recommendation: {rec['note']}."
    what = "1 − cos" if section["metric"] == "cosine" else "KL"
    reason = {
        "max_kl": f"the fewest bytes with mean {what} ≤ {_num(rec['limit'])}",
        "budget": f"the smallest mean {what} within {_num(rec['limit'])} bytes",
        "effect_kept": f"the fewest bytes keeping ≥ {_percent(rec['limit'])} of the adapter's effect",
    }.get(rec["criterion"], rec["criterion"])
    return (f"**Recommended: {rec['label']}** ({_num(rec['bytes'])} bytes, mean {what} {_num(rec['kl_mean'])}, "
            f"effect kept {_percent(rec['effect_kept'])}) — {reason}.")


HOW_TO_READ_KL = (
    "*KL* is the divergence, in nats per token, of the variant's next-token distribution from the unmodified "
    "adapter's (llama.cpp's `--kl-divergence` measure): 0 means identical predictions; the mean says how much is "
    "lost on average and the p99 how bad the worst 1% of positions get. *Top-1* is the share of positions where "
    "both pick the same most likely token. *Effect kept* is 1 − KL(adapter‖variant) / KL(adapter‖base): 100% is "
    "the adapter itself, 0% is no better than dropping the adapter, and a negative value is worse than dropping it.")
HOW_TO_READ_COSINE = (
    "For an encoder there is no next-token distribution: each sequence's embedding (mean-pooled over its tokens) "
    "under the variant is compared with the unmodified adapter's by cosine, and 1 − cos takes the place of KL "
    "(0 = the same direction). *Effect kept* is 1 − (1 − cos to the adapter) / (1 − cos of the base model to the "
    "adapter): 100% is the adapter itself, 0% is no better than dropping the adapter.")


def render_end_to_end(section: dict[str, Any]) -> str:
    """The ``## End-to-end`` markdown section: summary, recommendation, frontier, all variants, how to read them,
    and the predictor rank correlations."""
    cosine = section["metric"] == "cosine"
    headers, cells = _columns(cosine)
    parts = ["## End-to-end: the model's own outputs under each variant", "", _intro(section)]
    recommendation = _recommendation(section)
    if recommendation:
        parts += ["", recommendation]
    parts += ["", "### Rank × bits frontier", "",
              "Variants that no other variant beats on both bytes and divergence, by increasing size.", "",
              _table(headers, [cells(r) for r in frontier(section["variants"])])]
    full_headers = [*headers[:2], "rank", "scheme", *headers[2:], "frontier", "predicted rel. error (W / WX)"]
    rows = []
    for r in section["variants"]:
        row = cells(r)
        mean_rank = r.get("mean_rank")
        rank = _num(r["rank"]) if mean_rank is None or r["rank"] == mean_rank else \
            f"{_num(r['rank'])} (mean {_num(mean_rank)})"
        predicted = f"{_num(r.get('predicted_weight_rel_error'))} / {_num(r.get('predicted_output_rel_error'))}"
        rows.append([*row[:2], rank, r["scheme"] or "–", *row[2:], "✓" if r.get("on_frontier") else "",
                     predicted])
    parts += ["", "### All variants", "", _table(full_headers, rows)]
    parts += ["", "### How to read these numbers", "", HOW_TO_READ_COSINE if cosine else HOW_TO_READ_KL]
    predictors = section.get("predictors") or []
    if predictors:
        what = "1 − cos" if cosine else "KL"
        parts += ["", "### Which error is more controllable", "",
                  "Before any end-to-end run each method predicts its per-layer error: truncation from the "
                  "spectrum tail, activation-aware truncation from the calibration eigenvalues, rounding from "
                  "the uniform-noise model (step²/12). Spearman's ρ between those predictions (relative error "
                  "over all layers, in weight space W and on calibration outputs WX) and the measured mean "
                  f"{what} says how well each predictor orders its variants: 1 is a perfect ordering, "
                  "– means fewer than three variants or no prediction.", "",
                  _table(["method", "variants", "predictor", "ρ (W)", "ρ (WX)"],
                         [[p["method"], str(p["variants"]), p["predictor"], _num(p["spearman_weight"]),
                           _num(p["spearman_output"])] for p in predictors])]
    return "\n".join(parts) + "\n"
