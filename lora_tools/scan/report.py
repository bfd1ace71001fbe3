"""``scan --report DIR``: report.md, report.json and two plots, from the summary data (data first, rendered second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from lora_tools.atomic import atomic_path

MAX_PROBLEM_ROWS = 200  # in the markdown; report.json lists every problem


REPORT_FILES = ("report.md", "report.json", "ranks.png", "slot_rank.png")


def check_report_folder(folder: Path, force: bool) -> None:
    """Refuse, before any scanning, a report folder that is a file or already holds a report (without --force)."""
    from lora_tools.errors import LoraToolsError, OutputExistsError

    if folder.exists() and not folder.is_dir():
        raise LoraToolsError(f"{folder}: --report names a folder, and this is a file")
    existing = [name for name in REPORT_FILES if (folder / name).exists()]
    if existing and not force:
        raise OutputExistsError(f"{folder / existing[0]}: already exists; pass --force to overwrite the report")


def write_report(summary: dict[str, Any], folder: Path, force: bool = False) -> list[Path]:
    """Write the report files into ``folder`` (created if needed); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = folder / "report.json"
    with atomic_path(json_path, force=force) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    written.append(json_path)
    plots = []
    if summary["histograms"]["nominal_rank"]:
        plots.append(_plot_ranks(summary, folder / "ranks.png", force))
    if summary["serving"].get("caps"):
        plots.append(_plot_caps(summary, folder / "slot_rank.png", force))
    md_path = folder / "report.md"
    with atomic_path(md_path, force=force) as tmp:
        tmp.write_text(render_markdown(summary, [p.name for p in plots]))
    return [md_path, json_path, *plots]


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    totals = summary["totals"]
    energy = summary["energy"]
    out = ["# loratools scan", "",
           f"{totals['adapters']:,} adapters: {totals['adapters'] - totals['errors']:,} read, "
           f"{totals['errors']:,} errors, {totals['flagged']:,} flagged; {totals['modules']:,} modules, "
           f"{totals['params']:,} parameters, {totals['bytes']:,} bytes on disk.", ""]
    serving = summary["serving"]
    if serving.get("adapters"):
        out += _serving_section(serving, energy)
    if summary["truncation"]:
        t = summary["truncation"]
        out += ["## Right-sized copies", "",
                f"{t.get('written', 0):,} written, {t.get('failed', 0):,} not (see problems): "
                f"{t.get('params_before', 0):,} -> {t.get('params_after', 0):,} parameters, "
                f"{t.get('bytes_before', 0):,} -> {t.get('bytes_after', 0):,} tensor bytes.", ""]
    out += ["## Groups by base model", ""]
    rows = [[base, g["adapters"], f"{g['params']:,}", _counts(g["formats"]), _rank_range(g["ranks"]),
             len(g["target_modules"]), _shorten(next(iter(g["target_modules"]), "-"))]
            for base, g in summary["groups"].items()]
    out += [tabulate(rows, headers=["base", "adapters", "params", "formats", "module ranks",
                                    "target-module sets", "most common set"], tablefmt="github"), ""]
    out += ["## Ranks", "", "Modules per rank range: nominal rank, rank keeping 99% of Σσ² (rank@99%), and rank "
            f"at --energy {energy:g} (exact counts per rank in report.json).", ""]
    hist = {name: _bucketed(counts) for name, counts in summary["histograms"].items()}
    buckets = sorted({b for h in hist.values() for b in h}, key=lambda b: b[0])
    out += [tabulate([[_bucket_label(b), hist["nominal_rank"].get(b, 0), hist["rank_99"].get(b, 0),
                       hist["rank_at_energy"].get(b, 0)] for b in buckets],
                     headers=["rank", "modules (nominal)", "modules (rank@99%)", f"modules (rank@{energy:g})"],
                     tablefmt="github"), ""]
    out += [f"![{name}]({name})" for name in plots] + [""]
    problems = summary["problems"]
    out += ["## Problems", "", f"{len(problems):,} adapters with an error or a flag"
            + (f" (first {MAX_PROBLEM_ROWS} here; all in report.json)" if len(problems) > MAX_PROBLEM_ROWS else "")
            + ".", ""]
    if problems:
        out += [tabulate([[p["path"], p["problem"].replace("|", "\\|")] for p in problems[:MAX_PROBLEM_ROWS]],
                         headers=["adapter", "problem"], tablefmt="github"), ""]
    return "\n".join(out)


def _serving_section(serving: dict[str, Any], energy: float) -> list[str]:
    now = serving["now"]
    rows = [["today (slot rank = largest nominal rank)", serving["slot_rank_now"], _gb(now["bytes"]), "-"]]
    everything = serving["truncate_everything"]
    rows.append([f"truncate everything at energy {energy:g}", serving["slot_rank_at_energy"],
                 _gb(everything["bytes"]), f"{everything['saving']:.1%}"])
    per = serving["per_adapter_slots"]
    rows.append(["per-adapter slots at that energy (paged servers)", "own", _gb(per["bytes"]),
                 f"{per['saving']:.1%}"])
    lines = ["## Serving memory", "",
             f"{serving['adapters']:,} adapters (fp16 slots, Σ(in+out)·R parameters each). Stored parameters: "
             f"{serving['stored']['now']:,} now, {serving['stored']['at_energy']:,} at energy {energy:g}.", "",
             tabulate(rows, headers=["scenario", "slot rank", "slot memory", "saving"], tablefmt="github"), "",
             f"Capping the slot rank at R (adapters needing more than R at energy {energy:g} are truncated to R; "
             "'worst module keeps' is the smallest share of Σσ² any of their modules keeps):", ""]
    cap_rows = [[c["slot_rank"], _gb(c["bytes"]), f"{c['saving']:.1%}", c["adapters_fitting"],
                 c["adapters_truncated_below_energy"], _share(c["worst_module_energy_min"]),
                 _share(c["worst_module_energy_median"])] for c in serving["caps"]]
    lines += [tabulate(cap_rows, headers=["slot rank R", "slot memory", "saving", "fit", "truncated below energy",
                                          "worst module keeps (min)", "(median)"], tablefmt="github"), ""]
    return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{n})" for k, n in counts.items())


def _bucketed(counts: dict[str, int]) -> dict[tuple[int, int], int]:
    """Counts per power-of-two range of ranks: 0, 1, 2, 3-4, 5-8, 9-16, ..."""
    out: dict[tuple[int, int], int] = {}
    for key, count in counts.items():
        rank = int(key)
        high = 1 << max(0, (rank - 1).bit_length()) if rank > 0 else 0
        low = high // 2 + 1 if high > 1 else high
        out[(low, high)] = out.get((low, high), 0) + count
    return out


def _bucket_label(bucket: tuple[int, int]) -> str:
    low, high = bucket
    return str(low) if low == high else f"{low}-{high}"


def _rank_range(ranks: dict[str, int]) -> str:
    values = [int(k) for k in ranks]
    return f"{min(values)}-{max(values)}" if values else "-"


def _shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.3f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.2f} MB"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _plot_ranks(summary: dict[str, Any], path: Path, force: bool) -> Path:
    """Side-by-side bars per rank: nominal vs rank@99% energy, per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["histograms"]
    keys = sorted({int(k) for k in hist["nominal_rank"]} | {int(k) for k in hist["rank_99"]})
    positions = range(len(keys))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.bar([p - 0.2 for p in positions], [hist["nominal_rank"].get(str(k), 0) for k in keys], width=0.4,
           label="nominal rank")
    ax.bar([p + 0.2 for p in positions], [hist["rank_99"].get(str(k), 0) for k in keys], width=0.4,
           label="rank keeping 99% of Σσ²")
    step = max(1, len(keys) // 24)
    ax.set_xticks(list(positions)[::step], [str(k) for k in keys][::step], fontsize=7)
    ax.set_xlabel("rank")
    ax.set_ylabel("modules")
    ax.set_yscale("log")
    ax.set_title(f"Nominal rank vs rank@99% energy — {summary['totals']['modules']:,} modules")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _plot_caps(summary: dict[str, Any], path: Path, force: bool) -> Path:
    """Slot memory and adapters fitting, against the slot rank cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    serving = summary["serving"]
    caps = serving["caps"]
    ranks = [c["slot_rank"] for c in caps] + [serving["slot_rank_now"]]
    memory = [c["bytes"] / 1e6 for c in caps] + [serving["now"]["bytes"] / 1e6]
    fitting = [100 * c["adapters_fitting"] / serving["adapters"] for c in caps] + [100.0]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(ranks, memory, marker="o", color="tab:blue", label="slot memory (MB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("slot rank R")
    ax.set_ylabel("slot memory (MB, fp16)")
    other = ax.twinx()
    other.plot(ranks, fitting, marker="s", color="tab:orange",
               label=f"adapters fitting at energy {summary['energy']:g} (%)")
    other.set_ylabel("adapters fitting (%)")
    other.set_ylim(0, 105)
    ax.set_title("Serving memory vs slot rank cap")
    handles = ax.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
