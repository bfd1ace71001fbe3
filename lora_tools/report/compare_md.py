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
FRONTIER_PLOT = "frontier.png"  # only when the report has an end_to_end section


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


IN_SAMPLE = "in-sample"


def _evaluation(report: dict[str, Any]) -> str:
    # Reports written before the field existed were held-out whenever they had held-out tokens.
    return report.get("evaluation") or ("held-out" if report.get("holdout_tokens") else IN_SAMPLE)


def _error_key(report: dict[str, Any]) -> str:
    return "rel_error" if _evaluation(report) == "held-out" else "rel_error_calib"


def _rank_text(rank: Any) -> str:
    return f"r{rank}" if rank is not None else "mixed ranks"


def _versus(row: dict[str, Any], winner_key: str, factor_key: str, truncation: str) -> str:
    """'**int8-channel** ×45' when the scheme wins, 'svd-act r8 ×1.3' when the truncation does."""
    factor = f"×{_num(row[factor_key], 2)}"
    if row[winner_key] == row["scheme"]:
        return f"**{row['scheme']}** {factor}"
    return f"{truncation} {factor}"


def _title(report: dict[str, Any]) -> str:
    inputs = "synthetic Gaussian inputs" if report.get("inputs") == "random" else "real layer outputs"
    title = f"# compare-quant: truncation vs quantization on {inputs}"
    if _evaluation(report) == IN_SAMPLE:
        title += " — IN-SAMPLE (no held-out data)"
    return title


def _context(report: dict[str, Any]) -> list[str]:
    """Three lines: what was compared on which base, where the inputs came from, which tokens measure."""
    adapter = f"Adapter `{report['adapter']}`, target **{report['target']}**"
    random = report.get("inputs") == "random"
    if report["base_model"] is None:
        named = report.get("adapter_base_model")
        base = "; no base model was run" + (f" (the adapter names its base `{named}`)" if named else
                                            " (the adapter names no base)")
    elif random:
        base = f", on base `{report['base_model']}` (its weights only: the model was not run)"
    else:
        base = f", on base `{report['base_model']}`"
    lines = [f"{adapter}{base}; device {report['device']}, forward dtype {report['dtype']}.  "]
    if report.get("base_note"):
        lines.append(f"**Note:** {report['base_note']}.  ")
    if report.get("update_note"):
        lines.append(f"**Note:** {report['update_note']}.  ")
    if random:
        lines.append(f"Inputs: {report['calib']}. Every error is relative to the outputs on these synthetic "
                     "inputs, which are not what the layers see in the model.  ")
    else:
        lines.append(f"Inputs: captured from the base model (adapter applied) on the calibration text — "
                     f"{report['calib']}.  ")
    needed = report.get("min_tokens")
    floor = f" (at least {needed} each: the widest layer's input width)" if needed else ""
    if _evaluation(report) == IN_SAMPLE:
        lines.append(f"Evaluation: **IN-SAMPLE** (`--holdout 0`): every error is measured on the same "
                     f"{report['calib_tokens']} tokens the fits used. svd-act is optimal on exactly these tokens, "
                     "so its margin here is a best case; per-token statistics need held-out tokens and are "
                     "left out.")
    else:
        lines.append(f"Evaluation: **held-out**: fits used {report['calib_tokens']} calibration tokens; errors "
                     f"are measured on {report['holdout_tokens']} other tokens ({report['holdout_sequences']} "
                     f"sequences) that no fit saw{floor}.")
    return lines


def render_summary(report: dict[str, Any]) -> str:
    """All layers together: each scheme against the best truncation (svd-act) and plain SVD at equal bytes."""
    ev = _evaluation(report)
    per_layer = [r for r in report["summary"] if r["layer"] != "all layers"]
    agg = {r["label"]: r for r in report["aggregate"]}
    rows = []
    for row in report["summary"]:
        if row["layer"] != "all layers":
            continue
        scheme = row["scheme"]
        mine = [r for r in per_layer if r["scheme"] == scheme]
        won_best = sum(r["winner_vs_best"] == scheme for r in mine)
        won_svd = sum(r["winner"] == scheme for r in mine)
        best = f"{row['best_truncation_method']} {_rank_text(row['best_truncation_rank'])}"
        rows.append([scheme, _num(row["bytes"]), _num(agg[scheme]["bits_per_param"]) if scheme in agg else "–",
                     _num(row["scheme_rel_error"]),
                     f"{_num(row['best_truncation_rel_error'])} ({best})",
                     f"{_num(row['svd_rel_error'])} (svd {_rank_text(row['svd_rank'])})",
                     _versus(row, "winner_vs_best", "factor_vs_best", best),
                     _versus(row, "winner", "factor", f"svd {_rank_text(row['svd_rank'])}"),
                     f"{won_best}/{len(mine)}", f"{won_svd}/{len(mine)}"])
    headers = ["scheme", "bytes", "bits/param", f"scheme error ({ev})", "svd-act: best truncation",
               "plain svd", "winner vs svd-act", "winner vs svd", "layers won vs svd-act", "vs svd"]
    intro = (f"All layers together, {ev}: the relative output error ‖ΔY‖/‖Y‖ of each scheme, of the best "
             "truncation (svd-act: the rank-k map with the smallest output error on the calibration inputs) and "
             "of plain SVD truncation, both at the largest rank whose float16 factors fit in the scheme's bytes; "
             "the winner of each pairing and by what factor; and in how many layers the scheme wins.")
    return "\n".join([f"## Summary ({ev})", "", intro, "", _table(headers, rows)])


def render_winner_table(report: dict[str, Any]) -> str:
    """One row per layer, one cell per scheme: winner against svd-act, factor, and both errors."""
    schemes = report["schemes"]
    by_layer: dict[str, dict[str, dict[str, Any]]] = {}
    for row in report["summary"]:
        if row["layer"] != "all layers":
            by_layer.setdefault(row["layer"], {})[row["scheme"]] = row

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "–"
        factor = f"×{_num(row['factor_vs_best'], 2)}"
        winner = "**quant**" if row["winner_vs_best"] == row["scheme"] else \
            f"{row['best_truncation_method']} {_rank_text(row['best_truncation_rank'])}"
        return (f"{winner} {factor} · {_num(row['scheme_rel_error'])} vs "
                f"{_num(row['best_truncation_rel_error'])}")

    rows = [[_short(layer)] + [cell(cells.get(s)) for s in schemes] for layer, cells in by_layer.items()]
    return _table(["layer", *schemes], rows)


AGG_COLUMNS = [("label", "method"), ("bytes", "bytes"), ("bits_per_param", "bits/param"),
               ("rel_error", "rel. error (held-out)"), ("rel_error_calib", "rel. error (calib)"),
               ("snr_db", "SNR dB"), ("cosine", "cosine"), ("worst_token_cosine", "worst-token cos"),
               ("token_error_p99", "token err p99"), ("uniform_noise_ratio", "measured/uniform-noise")]
AGG_COLUMNS_IN_SAMPLE = [("label", "method"), ("bytes", "bytes"), ("bits_per_param", "bits/param"),
                         ("rel_error_calib", "rel. error (in-sample)"),
                         ("uniform_noise_ratio", "measured/uniform-noise")]
LAYER_COLUMNS = [("label", "method"), ("rank", "rank"), ("bytes", "bytes"), ("rel_error", "rel. err"),
                 ("rel_error_calib", "rel. err calib"), ("worst_token_cosine", "worst cos"),
                 ("token_error_p99", "tok p99"), ("kurtosis", "kurtosis"), ("error_stable_rank", "err stable rank"),
                 ("uniform_noise_ratio", "noise ratio")]
LAYER_COLUMNS_IN_SAMPLE = [("label", "method"), ("rank", "rank"), ("bytes", "bytes"),
                           ("rel_error_calib", "rel. err (in-sample)"), ("error_stable_rank", "err stable rank"),
                           ("uniform_noise_ratio", "noise ratio")]
SAME_BYTES = "same bytes as"


def _distinct(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per approximation: duplicates (``same_as``) folded into the first, whose label becomes the
    approximation's own name (``svd-r8``, not ``svd@int8-channel``) where one rank holds in every layer, and whose
    ``same bytes as`` lists every scheme whose bytes it matches."""
    rows: dict[str, dict[str, Any]] = {}
    for result in results:
        first = result.get("same_as") or result["label"]
        if first not in rows:
            shown = dict(result)
            if result["equal_budget_to"] and result["rank"] is not None:
                shown["label"] = f"{result['method']}-r{result['rank']}"
            shown[SAME_BYTES] = []
            rows[first] = shown
        if result["equal_budget_to"]:
            rows[first][SAME_BYTES].append(result["equal_budget_to"])
    for row in rows.values():
        row[SAME_BYTES] = ", ".join(row[SAME_BYTES]) or "–"
    return list(rows.values())


def _rows(results: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    columns = [*columns, (SAME_BYTES, SAME_BYTES)]
    body = [[r[k] if isinstance(r.get(k), str) else _num(r.get(k)) for k, _ in columns] for r in _distinct(results)]
    return _table([title for _, title in columns], body)


def _reading(report: dict[str, Any]) -> list[str]:
    """A few plain-language sentences, each derived from numbers in the report."""
    ev = _evaluation(report)
    lines = []
    per_layer = [r for r in report["summary"] if r["layer"] != "all layers"]
    for row in (r for r in report["summary"] if r["layer"] == "all layers"):
        scheme = row["scheme"]
        mine = [r for r in per_layer if r["scheme"] == scheme]
        best = f"{row['best_truncation_method']} {_rank_text(row['best_truncation_rank'])}"
        against = []
        for name, err, winner, factor in ((best, row["best_truncation_rel_error"], row["winner_vs_best"],
                                           row["factor_vs_best"]),
                                          (f"plain svd {_rank_text(row['svd_rank'])}", row["svd_rel_error"],
                                           row["winner"], row["factor"])):
            side = "below" if winner == scheme else "above"
            against.append(f"×{_num(factor, 2)} {side} {name} ({_num(err)})")
        won = sum(r["winner_vs_best"] == scheme for r in mine)
        lines.append(f"- **{scheme}**: {ev} error {_num(row['scheme_rel_error'])}, {' and '.join(against)}; "
                     f"it beats the best truncation in {won} of {len(mine)} layers.")
    agg = _distinct(report["aggregate"])
    noise = [(r["label"], r["uniform_noise_ratio"]) for r in agg if r.get("uniform_noise_ratio")]
    if noise:
        spread = ", ".join(f"{label} {_num(ratio, 2)}" for label, ratio in noise)
        lines.append(f"- Rounding errors behave like independent uniform noise when the measured/predicted ratio "
                     f"is near 1 (Widrow's step²/12 model): {spread}.")
    key = _error_key(report)
    by_label = {r["label"]: r for r in report["aggregate"]}
    pairs = [(r, by_label.get(r["label"].replace("svd", "svd-act", 1))) for r in report["aggregate"]
             if r["method"] == "svd" and not r.get("same_as")]
    pairs = [(s, a) for s, a in pairs if a is not None and a[key] == a[key]]
    if pairs and ev == IN_SAMPLE:
        lines.append(f"- svd-act has the smaller error than plain SVD at {sum(a[key] <= s[key] for s, a in pairs)} "
                     f"of {len(pairs)} ranks/budgets, but these are the tokens it was fitted to (optimal on them "
                     "by construction): this says nothing about new inputs.")
    elif pairs:
        lines.append(f"- The activation-aware truncation (svd-act, fitted on calibration inputs) has the smaller "
                     f"held-out error than plain SVD at {sum(a[key] <= s[key] for s, a in pairs)} of {len(pairs)} "
                     "ranks/budgets; on calibration inputs it is optimal by construction.")
    if any(r["method"].startswith("int") for r in agg) and any(r["method"] == "svd" for r in agg):
        lines.append("- Error structure: rounding spreads its error over many directions (weight-error stable rank "
                     "is high), truncation concentrates it in the discarded directions — see `err stable rank` in "
                     "the per-layer detail" + (" and the histogram plot." if ev != IN_SAMPLE else "."))
    return lines


def render_compare_markdown(report: dict[str, Any], summary_only: bool = False) -> str:
    ev = _evaluation(report)
    in_sample = ev == IN_SAMPLE
    parts = [_title(report), "", *_context(report)]
    section = report.get("end_to_end")
    if section:
        from lora_tools.report.end_to_end_md import render_end_to_end

        # What the model finally predicts comes first: it is the answer; the per-layer tables explain it.
        parts += ["", render_end_to_end(section).rstrip()]
        if not summary_only:
            parts += ["", "![bytes vs end-to-end divergence, frontier](frontier.png)"]
    elif report.get("end_to_end_skipped"):
        parts += ["", f"End-to-end evaluation not run: {report['end_to_end_skipped']}."]
    parts += ["", render_summary(report)]
    if summary_only:
        return "\n".join(parts) + "\n"
    parts += ["", f"## Reading ({ev})", "", *_reading(report)]
    parts += ["", "## Plots", "", "![output error vs bits per parameter](error_vs_bits.png)"]
    if not in_sample:
        parts += ["", "![histogram of output-error entries](error_histogram.png)"]
    parts += ["", f"## Winner per layer ({ev})", "",
              "Each cell: the smaller error at equal bytes between the scheme (**quant**) and the best truncation "
              "(svd-act at the rank that fits), by what factor, then both errors (scheme vs svd-act). Plain SVD "
              "is in the per-layer detail below.", "", render_winner_table(report)]
    parts += ["", f"## All layers together ({ev})", "",
              "Errors are ‖ΔY‖/‖Y‖ over all layers stacked. A truncation that several schemes' bytes buy is shown "
              f"once, with those schemes under `{SAME_BYTES}`.", "",
              _rows(report["aggregate"], AGG_COLUMNS_IN_SAMPLE if in_sample else AGG_COLUMNS)]
    if report["unmatched_modules"] or report["skipped_modules"]:
        parts += ["", "## Modules not compared", ""]
        parts += [f"- `{name}`: not found in the base model" for name in report["unmatched_modules"]]
        parts += [f"- {name}" for name in report["skipped_modules"]]
    legend = ("rel. err: in-sample ‖ΔY‖/‖Y‖ on the calibration tokens" if in_sample else
              "rel. err: held-out ‖ΔY‖/‖Y‖; worst cos: the lowest per-token cosine of y and ŷ; tok p99: 99th "
              "percentile of the per-token ‖Δy‖/‖y‖ (both held-out); kurtosis: excess kurtosis of ΔY entries")
    parts += ["", f"## Per-layer detail ({ev})", "",
              f"{legend}; err stable rank: of the weight error; noise ratio: measured / uniform-noise prediction. "
              "Every statistic of every row is also in report.json."]
    parts += ["", f"<details><summary>{len(report['layers'])} layers: every distinct approximation of each"
                  "</summary>", "", render_layer_detail(report), "", "</details>"]
    notes = [f"- {_short(layer['name'])}: {note}" for layer in report["layers"] for note in layer["notes"]]
    if notes:
        parts += ["", *notes]
    return "\n".join(parts) + "\n"


def render_layer_detail(report: dict[str, Any]) -> str:
    """One table for all layers (the layer named on every row, so it can be searched and sorted)."""
    columns = LAYER_COLUMNS_IN_SAMPLE if _evaluation(report) == IN_SAMPLE else LAYER_COLUMNS
    columns = [("layer", "layer"), *columns, (SAME_BYTES, SAME_BYTES)]
    body = []
    for layer in report["layers"]:
        for row in _distinct(layer["results"]):
            row["layer"] = _short(layer["name"])
            body.append([row[k] if isinstance(row.get(k), str) else _num(row.get(k)) for k, _ in columns])
    return _table([title for _, title in columns], body)


def check_report_dir(path: Path, force: bool) -> None:
    """Refuse before any computation: a report folder whose files exist (without --force), or a file path."""
    if path.exists() and not path.is_dir():
        raise LoraToolsError(f"{path}: --report needs a folder, and this is a file")
    existing = [name for name in (*REPORT_FILES, FRONTIER_PLOT) if (path / name).exists()]
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
            if report.get("end_to_end"):
                from lora_tools.report.frontier_plot import plot_frontier

                plot_frontier(report["end_to_end"], stack.enter_context(atomic_path(path / FRONTIER_PLOT,
                                                                                    force=force)), force=True)
            staged["report.md"].write_text(render_compare_markdown(report), encoding="utf-8")
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty: never removes anything that was not ours
        raise
