"""PNG plots (matplotlib, Agg backend), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tools.atomic import atomic_path


def _leaf_kind(name: str) -> str:
    """Group modules by their last name part (q_proj, value, to_k, ...) for colouring."""
    parts = [p for p in name.replace("_", ".").split(".") if not p.isdigit()]
    return ".".join(name.split(".")[-2:]) if name.count(".") else (parts[-1] if parts else name)


def plot_spectra(report: dict[str, Any], path: Path, force: bool = False) -> None:
    """Normalised spectra σ_i/σ_1 of every module, log scale, one colour per module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["modules"] if r["sigma_max"] and r["sigma_max"] == r["sigma_max"]]
    kinds = sorted({_kind_label(r["name"]) for r in rows})
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    colours = {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    seen: set[str] = set()
    for row in rows:
        values = [v / row["sigma_max"] for v in row["singular_values"] if v is not None and v > 0]
        label = _kind_label(row["name"])
        ax.plot(range(1, len(values) + 1), values, color=colours[label], alpha=0.6, linewidth=1,
                marker=".", markersize=3, label=None if label in seen else label)
        seen.add(label)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1")
    name = Path(report["path"]).name or report["path"]
    ax.set_title(f"Normalised singular values of s·B·A — {name} ({len(rows)} modules)")
    ax.grid(True, which="both", alpha=0.3)
    if len(kinds) <= 20:
        ax.legend(fontsize=7, ncol=2, title="module type", title_fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _kind_label(name: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'attention.self.query' (the path without layer indices)."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    tail = parts[digits[-1] + 1:] if digits else parts[-1:]
    return ".".join(tail) or name


def plot_similarity(row: dict[str, Any], path: Path, force: bool = False) -> None:
    """Heat-maps of φ(i, j) for one module: left (output) and right (input) singular subspaces side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), dpi=120)
    for ax, key, title in ((axes[0], "phi_left", "left singular vectors (U)"),
                           (axes[1], "phi_right", "right singular vectors (V)")):
        grid = row[key]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper",
                          extent=(0.5, len(grid[0]) + 0.5, len(grid) + 0.5, 0.5))
        ax.set_xlabel("j (top-j of B)")
        ax.set_ylabel("i (top-i of A)")
        ax.set_title(f"φ(i, j), {title}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"Subspace similarity (Hu et al. 2021) — {row['name']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
