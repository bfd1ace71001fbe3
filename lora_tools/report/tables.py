"""Plain-text renderings of inspect/spectrum reports (tabulate)."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate


def format_number(value: Any, digits: int = 4, missing: str = "nan") -> str:
    """A number for a text table: floats to ``digits`` significant digits, None as ``missing``."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _histogram_text(hist: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{n})" if len(hist) > 1 else k for k, n in hist.items()) or "-"


def render_summary(report: dict[str, Any]) -> str:
    lines = [
        ("path", report["path"]),
        ("format", report["format"]),
        ("base model", report["base_model"] or "unknown"),
        ("modules", f"{report['num_modules']} LoRA modules ({_histogram_text(report['kinds'])})"),
        ("ranks", _histogram_text(report["ranks"])),
        ("alphas", _histogram_text(report["alphas"])),
        ("scale rule", report["scale_rule"]),
        ("scales", _histogram_text(report["scales"])),
        ("dtypes", _histogram_text(report["dtypes"])),
        ("parameters", f"{report['total_params']:,}"),
        ("file size", f"{report['file_size']:,} bytes"),
    ]
    updates = report.get("updates") or {}
    if set(updates) - {"lora"}:  # LyCORIS/AdaLoRA: say what the file stores (issue 10)
        lines.insert(4, ("updates", _histogram_text(updates) + " (ranks: of the exact LoRA factors)"))
    if report["rank_pattern"]:
        lines.append(("rank_pattern", str(report["rank_pattern"])))
    if report["alpha_pattern"]:
        lines.append(("alpha_pattern", str(report["alpha_pattern"])))
    extras = report["extra_tensors"]
    if extras:
        shown = ", ".join(f"{e['key']} {e['shape']}" for e in extras[:5])
        more = f" (+{len(extras) - 5} more)" if len(extras) > 5 else ""
        lines.append(("extra tensors", f"{len(extras)}: {shown}{more}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in lines)


INSPECT_COLUMNS = ("module", "shape", "rank", "alpha", "scale", "‖ΔW‖F", "σmax", "stable rank", "eff. rank",
                   "r90", "r99", "num. rank", "flags")


def _rank_cell(row: dict[str, Any]) -> str:
    """The rank, with the kind of update when the file stores something other than B and A (issue 10)."""
    update = row.get("update", "lora")
    return str(row["rank"]) if update == "lora" else f"{row['rank']} ({update})"


def render_inspect_table(rows: list[dict[str, Any]]) -> str:
    table = [
        (r["name"], "x".join(map(str, r["shape"])), _rank_cell(r), format_number(r["alpha"]), format_number(r["scale"]),
         format_number(r["fro_norm"]), format_number(r["sigma_max"]), format_number(r["stable_rank"], 3), format_number(r["effective_rank"], 3),
         r["rank_90"], r["rank_99"], r["numerical_rank"], ",".join(r["flags"]) or "-")
        for r in rows
    ]
    return tabulate(table, headers=INSPECT_COLUMNS, tablefmt="simple", disable_numparse=True)


def render_warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    return "warnings:\n" + "\n".join(f"  - {w}" for w in warnings)


def render_spectrum_table(rows: list[dict[str, Any]], max_values: int = 16) -> str:
    table = []
    for r in rows:
        values = r["singular_values"]
        shown = " ".join(format_number(v, 4) for v in values[:max_values])
        if len(values) > max_values:
            shown += f" … (+{len(values) - max_values})"
        table.append((r["name"], r["rank"], shown))
    return tabulate(table, headers=("module", "rank", "singular values of s·B·A (descending)"),
                    tablefmt="simple", disable_numparse=True)


def render_truncate_table(report: dict[str, Any]) -> str:
    """Per-module ranks and errors of a truncation, then the totals."""
    rows = [
        [row["name"], row["old_rank"], row["new_rank"], format_number(row["retained_energy"], 6),
         format_number(row["rel_fro_error"], 4), ", ".join(row["flags"])]
        for row in report["modules"]
    ]
    table = tabulate(rows, headers=["module", "rank", "new rank", "retained energy", "rel. error", "flags"],
                     tablefmt="simple")
    before, after = report["params_before"], report["params_after"]
    lines = [
        table,
        "",
        f"selection: {report['selection']}",
        f"parameters: {before:,} -> {after:,} ({after / before:.1%})" if before else f"parameters: {after:,}",
        f"tensor bytes: {report['bytes_before']:,} -> {report['bytes_after']:,}",
        f"retained energy (all modules): {format_number(report['retained_energy'], 6)}",
    ]
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
