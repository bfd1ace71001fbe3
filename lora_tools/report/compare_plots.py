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
    """Held-out relative output error (all layers) against bits per parameter, one series per method family."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    rows = report["aggregate"]
    for method, marker in (("svd", "o"), ("svd-act", "s")):
        points = sorted((r["bits_per_param"], r["rel_error"], r["label"]) for r in rows
                        if r["method"] == method and r["rel_error"] == r["rel_error"])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=method, alpha=0.8)
    quant = [r for r in rows if r["method"].startswith("int") and r["rel_error"] == r["rel_error"]]
    for r in quant:
        ax.scatter([r["bits_per_param"]], [r["rel_error"]], marker="^", s=60, zorder=3)
        ax.annotate(r["label"], (r["bits_per_param"], r["rel_error"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter of the target matrix")
    ax.set_ylabel("held-out ‖ΔY‖ / ‖Y‖ (all layers)")
    ax.set_title(f"compare-quant, target {report['target']}: output error vs storage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, force)


def plot_error_histogram(report: dict[str, Any], path: Path, force: bool = False) -> None:
    """Histogram of |ΔY| entries (held-out, all layers, in units of rms(Y)) for each INT8 scheme and SVD at the
    same bytes; log-log, so the tails are visible."""
    plt = _pyplot()
    hist = report["error_histograms"]
    edges = hist["edges"]
    centres = [(a * b) ** 0.5 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    schemes = [s for s in report["schemes"] if s.startswith("int8")] or list(report["schemes"])
    for scheme in schemes[:2]:
        for label, style in ((scheme, "-"), (f"svd@{scheme}", "--")):
            counts = hist["counts"].get(label)
            if counts and sum(counts) > 0:
                total = sum(counts)
                ax.plot(centres, [c / total if c > 0 else float("nan") for c in counts], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{hist['unit']} (held-out)")
    ax.set_ylabel("fraction of entries")
    ax.set_title("Output-error entries: rounding vs truncation at equal bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, force)
