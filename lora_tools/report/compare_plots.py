"""PNG plots of the compare-quant report (matplotlib, Agg backend), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tools.atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, force: bool) -> None:
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)


def plot_error_vs_bits(report: dict[str, Any], path: Path, force: bool = False) -> None:
    """Relative output error (all layers; held-out, or in-sample after --holdout 0) against bits per parameter,
    one series per method family; each approximation once (rows marked ``same_as`` repeat another)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    in_sample = report.get("evaluation") == "in-sample"
    key = "rel_error_calib" if in_sample else "rel_error"
    rows = [r for r in report["aggregate"] if not r.get("same_as") and r[key] == r[key]]
    for method, marker in (("svd", "o"), ("svd-act", "s")):
        points = sorted((r["bits_per_param"], r[key], r["label"]) for r in rows if r["method"] == method)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=method, alpha=0.8)
    for r in (r for r in rows if r["method"].startswith("int")):
        ax.scatter([r["bits_per_param"]], [r[key]], marker="^", s=60, zorder=3)
        ax.annotate(r["label"], (r["bits_per_param"], r[key]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter of the target matrix")
    ax.set_ylabel(f"{'IN-SAMPLE' if in_sample else 'held-out'} ‖ΔY‖ / ‖Y‖ (all layers)")
    inputs = ", synthetic Gaussian inputs" if report.get("inputs") == "random" else ""
    ax.set_title(f"compare-quant, target {report['target']}{inputs}: output error vs storage"
                 + (" (IN-SAMPLE)" if in_sample else ""))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, force)


def plot_error_histogram(report: dict[str, Any], path: Path, force: bool = False) -> None:
    """Histogram of |ΔY| entries (held-out, all layers, in units of rms(Y)) for each INT8 scheme and the two
    truncations (svd, svd-act) at the same bytes; log-log, so the tails are visible."""
    plt = _pyplot()
    hist = report["error_histograms"]
    edges = hist["edges"]
    centres = [(a * b) ** 0.5 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    schemes = [s for s in report["schemes"] if s.startswith("int8")] or list(report["schemes"])
    for scheme in schemes[:2]:
        for label, style in ((scheme, "-"), (f"svd@{scheme}", "--"), (f"svd-act@{scheme}", ":")):
            counts = hist["counts"].get(label)
            if counts and sum(counts) > 0:
                total = sum(counts)
                ax.plot(centres, [c / total if c > 0 else float("nan") for c in counts], style, label=label)
    if not ax.get_legend_handles_labels()[0]:
        # --holdout 0: the entries are streamed from held-out tokens only, and there are none.
        ax.text(0.5, 0.5, "no held-out tokens (--holdout 0): no error-entry histogram", ha="center",
                va="center", transform=ax.transAxes)
        fig.tight_layout()
        _save(fig, path, force)
        return
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{hist['unit']} (held-out)")
    ax.set_ylabel("fraction of entries")
    ax.set_title("Output-error entries: rounding vs truncation at equal bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, force)
