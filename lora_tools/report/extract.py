"""Plain-text rendering of an extract report: the LoRA modules, then every other tensor that changed."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from lora_tools.report.tables import format_number


def _num(value: Any, digits: int = 4) -> str:
    return format_number(value, digits, missing="-")


def _change(row: dict[str, Any]) -> str:
    if row["rel_change"] is None and row["abs_change"] is not None:
        return f"{_num(row['abs_change'])} (abs.; T_0 = 0)"
    return _num(row["rel_change"])


def _stored(row: dict[str, Any]) -> str:
    if row["saved"]:
        return f"yes ({row['saved_as']})"
    if row["saved_as"] is not None:
        return f"no (--include-other: {row['saved_as']})"
    return "no (cannot be)"


def render_extract_report(report: dict[str, Any]) -> str:
    rows = [[r["name"], "x".join(map(str, r["shape"])), r["rank"], _num(r["retained_energy"], 6),
             _num(r["rel_fro_error"], 4), r["method"]] for r in report["modules"]]
    lines = [tabulate(rows, headers=["module", "shape", "rank", "retained energy", "rel. error", "svd"],
                      tablefmt="simple", disable_numparse=True), "",
             f"selection: {report['selection']}; {report['num_modules']} linear module(s) differ, "
             f"{report['num_unchanged']} identical"]
    others = report["other_tensors"]
    if others:
        table = [[r["name"], "x".join(map(str, r["shape"])), _change(r), _stored(r), r["note"] or ""]
                 for r in others]
        lines += ["", f"other tensors that differ ({len(others)}; ‖T_ft − T_0‖ / ‖T_0‖; "
                      f"{report['num_other_unchanged']} identical):",
                  tabulate(table, headers=["tensor", "shape", "rel. change", "in adapter", "note"],
                           tablefmt="simple", disable_numparse=True)]
    if report["modules_to_save"]:
        lines.append(f"modules_to_save: {', '.join(report['modules_to_save'])}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
