"""The compare-quant report: markdown rendered from the report dict, written with its JSON and plots.

Every number in report.md comes from the dict that is also written as report.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_tools.atomic import atomic_path
from lora_tools.errors import LoraToolsError, OutputExistsError

REPORT_FILES = ("report.md", "report.json", "error_vs_bits.png", "error_histogram.png")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("attention.", "att.")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _winner_cell(row: dict[str, Any]) -> str:
    if row["winner"] == "svd":
        return f"svd r{row['svd_rank']} ×{_num(row['factor'], 2)}"
    return f"**{row['scheme']}** ×{_num(row['factor'], 2)}"


def render_summary_table(report: dict[str, Any]) -> str:
    schemes = report["schemes"]
    by_layer: dict[str, dict[str, dict[str, Any]]] = {}
    for row in report["summary"]:
        by_layer.setdefault(row["layer"], {})[row["scheme"]] = row
    rows = []
    for layer, cells in by_layer.items():
        rows.append([_short(layer) if layer != "all layers" else "**all layers**"]
                    + [_winner_cell(cells[s]) if s in cells else "–" for s in schemes])
    return _table(["layer", *schemes], rows)


AGG_COLUMNS = [("label", "method"), ("bytes", "bytes"), ("bits_per_param", "bits/param"),
               ("rel_error", "rel. error (held-out)"), ("rel_error_calib", "rel. error (calib)"),
               ("snr_db", "SNR dB"), ("cosine", "cosine"), ("worst_token_cosine", "worst-token cos"),
               ("token_error_p99", "token err p99"), ("uniform_noise_ratio", "measured/uniform-noise")]
LAYER_COLUMNS = [("label", "method"), ("rank", "rank"), ("bytes", "bytes"), ("bits_per_param", "bits/param"),
                 ("rel_error", "rel. err"), ("rel_error_calib", "rel. err calib"), ("snr_db", "SNR dB"),
                 ("cosine", "cos"), ("worst_token_cosine", "worst cos"), ("max_abs_error", "max |ΔY|"),
                 ("token_error_p50", "tok p50"), ("token_error_p99", "tok p99"), ("token_error_max", "tok max"),
                 ("kurtosis", "kurtosis"), ("error_stable_rank", "err stable rank"),
                 ("error_top1_energy", "err top-1"), ("uniform_noise_ratio", "noise ratio")]


def _rows(results: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    body = [[r[k] if isinstance(r.get(k), str) else _num(r.get(k)) for k, _ in columns] for r in results]
    return _table([title for _, title in columns], body)


def _reading(report: dict[str, Any]) -> list[str]:
    """A few plain-language sentences, each derived from numbers in the report."""
    lines = []
    overall = [r for r in report["summary"] if r["layer"] == "all layers"]
    for row in overall:
        if row["winner"] == "svd":
            lines.append(f"- At the bytes of **{row['scheme']}**, plain SVD truncation has the smaller output error "
                         f"over all layers ({_num(row['svd_rel_error'])} vs {_num(row['scheme_rel_error'])}, "
                         f"×{_num(row['factor'], 2)}).")
        else:
            lines.append(f"- At equal bytes, **{row['scheme']}** beats SVD truncation over all layers: relative "
                         f"output error {_num(row['scheme_rel_error'])} vs {_num(row['svd_rel_error'])} "
                         f"(×{_num(row['factor'], 2)} smaller).")
    per_layer = [r for r in report["summary"] if r["layer"] != "all layers"]
    if per_layer:
        quant_wins = sum(r["winner"] != "svd" for r in per_layer)
        lines.append(f"- Layer by layer, rounding wins {quant_wins} of {len(per_layer)} (layer, scheme) pairings "
                     "at equal bytes.")
    agg = {r["label"]: r for r in report["aggregate"]}
    noise = [(label, r["uniform_noise_ratio"]) for label, r in agg.items() if r.get("uniform_noise_ratio")]
    if noise:
        spread = ", ".join(f"{label} {_num(ratio, 2)}" for label, ratio in noise)
        lines.append(f"- Rounding errors behave like independent uniform noise when the measured/predicted ratio "
                     f"is near 1 (Widrow's step²/12 model): {spread}.")
    act = [(r, agg.get(r["label"].replace("svd", "svd-act", 1))) for r in agg.values() if r["method"] == "svd"]
    better = [(s, a) for s, a in act if a is not None and a["rel_error"] == a["rel_error"]]
    if better:
        wins = sum(a["rel_error"] <= s["rel_error"] for s, a in better)
        lines.append(f"- The activation-aware truncation (svd-act, fitted on calibration inputs) has the smaller "
                     f"held-out error than plain SVD at {wins} of {len(better)} ranks/budgets; on calibration "
                     "inputs it is optimal by construction.")
    quant = [r for r in agg.values() if r["method"].startswith("int")]
    svd = [r for r in agg.values() if r["method"] == "svd" and r["equal_budget_to"]]
    if quant and svd:
        lines.append("- Error structure: rounding spreads its error over many directions (weight-error stable rank "
                     "is high), truncation concentrates it in the discarded directions — see the per-layer "
                     "`err stable rank` and `err top-1` columns and the histogram plot.")
    return lines


def render_compare_markdown(report: dict[str, Any], summary_only: bool = False) -> str:
    parts = ["# compare-quant: truncation vs quantization on real layer outputs", ""]
    parts.append(f"Target **{report['target']}** of adapter `{report['adapter']}` on base `{report['base_model']}`; "
                 f"device {report['device']}, forward dtype {report['dtype']}.  ")
    parts.append(f"Calibration: {report['calib']} — {report['calib_tokens']} tokens fit, "
                 f"{report['holdout_tokens']} held-out tokens ({report['holdout_sequences']} sequences) measure.")
    parts += ["", "## Winner at equal bytes", "",
              "Each cell: the smaller held-out relative output error ‖ΔY‖/‖Y‖ between the scheme and plain SVD "
              "truncation at the largest rank whose float16 factors fit in the same bytes, and by what factor.", "",
              render_summary_table(report)]
    if summary_only:
        return "\n".join(parts) + "\n"
    parts += ["", "## All layers together", "",
              "Errors are ‖ΔY‖/‖Y‖ over all layers stacked; `method@scheme` is truncation at the bytes of that "
              "scheme.", "", _rows(report["aggregate"], AGG_COLUMNS)]
    parts += ["", "## Reading", "", *_reading(report)]
    parts += ["", "## Plots", "", "![output error vs bits per parameter](error_vs_bits.png)", "",
              "![histogram of output-error entries](error_histogram.png)"]
    if report["unmatched_modules"] or report["skipped_modules"]:
        parts += ["", "## Modules not compared", ""]
        parts += [f"- `{name}`: not found in the base model" for name in report["unmatched_modules"]]
        parts += [f"- {name}" for name in report["skipped_modules"]]
    parts += ["", "## Per layer", "",
              "rel. err: held-out ‖ΔY‖/‖Y‖; tok p50/p99/max: per-token ‖Δy‖/‖y‖ (held-out); kurtosis: excess "
              "kurtosis of ΔY entries; err stable rank / top-1: of the weight error; noise ratio: measured / "
              "uniform-noise prediction."]
    for layer in report["layers"]:
        parts += ["", f"### {layer['name']} ({layer['shape'][0]} x {layer['shape'][1]})", "",
                  _rows(layer["results"], LAYER_COLUMNS)]
        if layer["notes"]:
            parts += [""] + [f"- {note}" for note in layer["notes"]]
    return "\n".join(parts) + "\n"


def check_report_dir(path: Path, force: bool) -> None:
    """Refuse before any computation: a report folder whose files exist (without --force), or a file path."""
    if path.exists() and not path.is_dir():
        raise LoraToolsError(f"{path}: --report needs a folder, and this is a file")
    existing = [name for name in REPORT_FILES if (path / name).exists()]
    if existing and not force:
        raise OutputExistsError(f"{path}: already holds {', '.join(existing)}; pass --force to overwrite them")


def write_compare_report(report: dict[str, Any], path: Path, *, force: bool, json_text: str) -> None:
    """report.md, report.json and the plots, each written atomically; other files in the folder are kept.

    All four are staged first and moved into place only once every one is written, so a failure half-way leaves
    no partial report (and no folder, if this call created it).
    """
    import contextlib

    from lora_tools.report.compare_plots import plot_error_histogram, plot_error_vs_bits

    check_report_dir(path, force)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            staged = {name: stack.enter_context(atomic_path(path / name, force=force)) for name in REPORT_FILES}
            staged["report.json"].write_text(json_text + "\n", encoding="utf-8")
            plot_error_vs_bits(report, staged["error_vs_bits.png"], force=True)
            plot_error_histogram(report, staged["error_histogram.png"], force=True)
            staged["report.md"].write_text(render_compare_markdown(report), encoding="utf-8")
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: never removes anything that was not ours
        raise
