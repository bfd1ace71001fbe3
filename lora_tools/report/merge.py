"""Plain-text renderings of merge, similarity, convert, fold and extract reports (tabulate)."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from lora_tools.report.tables import format_number


def _num(value: Any, digits: int = 4) -> str:
    return format_number(value, digits, missing="-")


def _ranks(ranks: list[int | None]) -> str:
    return "+".join("-" if r is None else str(r) for r in ranks)


def render_merge_table(report: dict[str, Any]) -> str:
    rows = [[r["name"], _ranks(r["ranks_in"]), r["rank_out"], _num(r["rel_error"], 3),
             _num(r.get("svd_error_at_rank"), 3) if report["method"] == "rank1-topk" else None,
             _num(r["max_abs_cosine"], 3), _num(r["max_subspace_overlap"], 3)]
            for r in report["modules"]]
    headers = ["module", "ranks in", "rank out", "rel. error vs Σ wᵢΔWᵢ", "svd error at same rank",
               "max |cos|", "max φ"]
    if report["method"] != "rank1-topk":
        rows = [row[:4] + row[5:] for row in rows]
        headers = headers[:4] + headers[5:]
    lines = [
        tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True),
        "",
        f"method: {report['method']} — {report['summary']}",
        f"reference: {report['reference']}",
        f"weights: {', '.join(f'{w:g}' for w in report['weights'])}; selection: {report['selection']}"
        + (f"; density {report['density']:g}" if report.get("density") is not None else "")
        + (f"; seed {report['seed']}" if report.get("seed") is not None else ""),
        f"max relative error vs the exact weighted sum: {_num(report['max_rel_error'], 3)}",
        f"parameters: {' + '.join(f'{p:,}' for p in report['params_in'])} -> {report['params_out']:,}",
        "max |cos| / max φ: interference between the inputs' updates (cosine as vectors; subspace overlap of "
        "their column spaces, Hu et al. 2021)",
    ]
    heads = report.get("heads") or {}
    if heads.get("kept"):
        lines.append(f"non-LoRA tensors (modules_to_save heads) kept ({heads['policy']}): {', '.join(heads['kept'])}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def render_similarity_table(report: dict[str, Any]) -> str:
    rows = [[r["name"], f"{r['rank_a']}/{r['rank_b']}", _num(r["cosine"], 4), _num(r["phi_left_top1"], 3),
             _num(r["phi_left_full"], 3), _num(r["phi_right_top1"], 3), _num(r["phi_right_full"], 3)]
            for r in report["modules"]]
    lines = [
        tabulate(rows, headers=["module", "ranks", "cos(ΔW_A, ΔW_B)", "φ_U(1,1)", "φ_U(rA,rB)", "φ_V(1,1)",
                                "φ_V(rA,rB)"], tablefmt="simple", disable_numparse=True),
        "",
        f"{report['num_common']} common module(s); only in A: {report['only_in_a']}, only in B: {report['only_in_b']}",
        "φ(i, j) = ‖U_A[:, :i]ᵀ U_B[:, :j]‖_F² / min(i, j) (Hu et al. 2021): 1 = the top subspaces coincide, "
        "0 = orthogonal; U: left (output) singular vectors, V: right (input)",
    ]
    return "\n".join(lines)


def render_convert_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['input']} ({report['input_format']}) -> {report['output']} ({report['output_format']})",
        f"modules: {report['num_modules']}; names resolved by: {report['name_source']}",
        f"verification: {report['bit_exact_modules']} of {report['num_modules']} module(s) bit-exact; "
        f"max relative difference of ΔW {_num(report['max_rel_difference'], 3)}",
    ]
    groups = {kind: n for kind, n in (report.get("layer_groups") or {}).items() if n}
    if groups:
        # Split or fused layers cannot keep their factors bit for bit (B is cut by rows, or A stacked and B made
        # block-diagonal): their ΔW is what the relative difference above measures.
        lines.append("layers re-grouped (factors re-arranged, ΔW compared): "
                     + ", ".join(f"{n} {kind}" for kind, n in groups.items()))
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def render_fold_report(report: dict[str, Any]) -> str:
    lines = [f"folded {report['num_modules']} module(s) of {report['adapter']} into {report['base']} -> "
             f"{report['output']} ({report['num_tensors']} tensors, {report['num_copied']} copied unchanged)"]
    heads = report.get("heads") or {}
    if heads:
        # modules_to_save copies (e.g. a classification head) replace the base's tensors, as in merge_and_unload
        lines.append(f"replaced {len(heads)} base tensor(s) by the adapter's trained copies (modules_to_save): "
                     + ", ".join(heads))
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
