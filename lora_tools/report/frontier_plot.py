"""The rank x bits frontier as a PNG (matplotlib, Agg backend), written atomically: bytes against end-to-end
divergence on log-log axes, one marker per method, the Pareto frontier as a staircase, every point labelled."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_tools.atomic import atomic_path
from lora_tools.compare.frontier import frontier

MARKERS = {"identity": "*", "svd": "o", "svd-act": "s", "quant": "^", "svd+quant": "D", "avg-rank": "v"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Below this fraction of KL(adapter‖base) a divergence is float rounding of the forward pass (a full-rank
# "truncation" differs from the adapter only by float32 rounding of its factors): such points sit on the axis
# floor instead of stretching the axis down to 1e-15.
FLOOR_RATIO = 1e-9
LABEL_GAP = (0.07, 0.035)  # axes fractions: a label closer than this to a placed one is left out (crowding)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _floor(rows: list[dict[str, Any]], base: Any) -> float:
    values = [r["kl_mean"] for r in rows if _positive(r["kl_mean"])]
    floor = FLOOR_RATIO * base if _positive(base) else 0.0
    return max(floor, min(values)) if values else 1.0


def plot_frontier(section: dict[str, Any], path: Path, force: bool = False, title: str | None = None) -> None:
    """Plot ``section`` (an ``end_to_end`` dict after ``frontier.finalize``) to ``path``.

    A log axis cannot show a divergence of 0 (the adapter against itself): such variants are named in a note
    under the axes. Divergences below ``FLOOR_RATIO`` x KL(adapter‖base) are drawn on the floor, hollow.
    Coincident variants share one label; labels that would overlap one already placed are left out (frontier
    variants are labelled first), every variant is still in the tables.
    """
    plt = _pyplot()
    rows = [r for r in section["variants"] if _positive(r["bytes"])]
    cosine = section["metric"] == "cosine"
    base = section.get("kl_adapter_base")
    floor = _floor(rows, base)
    drawn = [r for r in rows if _positive(r["kl_mean"])]

    def y(row: dict[str, Any]) -> float:
        return max(row["kl_mean"], floor)

    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    ax.set_xscale("log")
    ax.set_yscale("log")
    cmap = plt.get_cmap("tab10")
    for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        colour = cmap(index % 10)
        for low, points in ((False, [r for r in drawn if r["method"] == method and r["kl_mean"] >= floor]),
                            (True, [r for r in drawn if r["method"] == method and r["kl_mean"] < floor])):
            if points:
                ax.scatter([r["bytes"] for r in points], [y(r) for r in points], marker=MARKERS.get(method, "o"),
                           s=36, alpha=0.85, zorder=3, label=None if low else method,
                           facecolors="none" if low else colour, edgecolors=colour)
    line = [r for r in frontier(rows) if _positive(r["kl_mean"])]
    if line:
        # A staircase: the lowest divergence reachable with at most that many bytes.
        ax.step([r["bytes"] for r in line], [y(r) for r in line], where="post", color="black", linewidth=1,
                alpha=0.7, label="Pareto frontier", zorder=2)
    recommendation = section.get("recommendation") or {}
    chosen = next((r for r in drawn if r["label"] == recommendation.get("label")), None)
    if chosen is not None:
        ax.scatter([chosen["bytes"]], [y(chosen)], s=220, facecolors="none", edgecolors="red", linewidths=1.5,
                   label=f"recommended ({recommendation['criterion']})", zorder=4)
    if _positive(base):
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model (adapter removed)")
    ax.autoscale_view()
    _labels(ax, drawn, y)
    notes = []
    zero = [r["label"] for r in rows if not _positive(r["kl_mean"])]
    if zero:
        notes.append(f"not drawn (divergence 0 or missing): {', '.join(zero)}")
    if any(r["kl_mean"] < floor for r in drawn):
        notes.append(f"hollow: below {floor:.1e} (rounding level), drawn on the floor")
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7, alpha=0.7)
    ax.set_xlabel("stored bytes of the whole adapter")
    ax.set_ylabel("mean 1 − cos of pooled embeddings" if cosine else "mean KL(P_adapter ‖ P_variant), nats/token")
    ax.set_title(title or "Rank × bits: end-to-end divergence from the unmodified adapter")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    try:
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _labels(ax: Any, rows: list[dict[str, Any]], y: Any) -> None:
    """Annotate points: coincident ones under one joined label, frontier first, crowded ones left out."""
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["bytes"], y(r)), []).append(r)
    ordered = sorted(groups.items(), key=lambda item: not any(r.get("on_frontier") for r in item[1]))
    to_axes = ax.transData + ax.transAxes.inverted()
    placed: list[tuple[float, float]] = []
    for (x_value, y_value), members in ordered:
        fx, fy = to_axes.transform((x_value, y_value))
        if any(abs(fx - px) < LABEL_GAP[0] and abs(fy - py) < LABEL_GAP[1] for px, py in placed):
            continue
        placed.append((fx, fy))
        on = any(r.get("on_frontier") for r in members)
        ax.annotate(" = ".join(r["label"] for r in members), (x_value, y_value), textcoords="offset points",
                    xytext=(4, 3), fontsize=7 if on else 6, alpha=1.0 if on else 0.6)
