"""The collection-level summary of a scan, as plain data: totals, problems, groups by base, rank histograms and
the serving memory a right-sizing would save.

Serving model (multi-LoRA servers such as vLLM's ``--max-lora-rank`` or S-LoRA's unified pool): every adapter
slot is sized for one slot rank R, so an adapter costs ``R · Σ_modules (in + out)`` parameters however small its
own ranks. Today R must be the largest nominal rank in the collection. After truncating every module to the rank
keeping ``energy`` of its Σσ², R can drop to the largest of those ranks ("truncate everything"); with the slot
rank capped at a smaller R, adapters needing more are truncated to R and keep less than ``energy`` of it (the
table gives how many, and the worst share they keep).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

# Flags that describe an adapter without making it a problem.
BENIGN_FLAGS = frozenset({"dora"})
SERVING_BYTES_PER_PARAM = 2  # fp16/bf16 slots


def summarize(lines: Iterable[dict[str, Any]], energy: float) -> dict[str, Any]:
    """One pass over the result lines (in path order) -> the report's data."""
    totals: Counter[str] = Counter()
    problems: list[dict[str, Any]] = []
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"adapters": 0, "params": 0, "formats": Counter(),
                                                             "targets": Counter(), "ranks": Counter()})
    nominal: Counter[int] = Counter()
    rank_99: Counter[int] = Counter()
    at_energy: Counter[int] = Counter()
    serving: list[dict[str, Any]] = []  # per healthy adapter: what the slot table needs
    truncated: Counter[str] = Counter()
    for line in lines:
        totals["adapters"] += 1
        totals["seconds"] += line.get("seconds") or 0.0
        if line.get("error"):
            totals["errors"] += 1
            problems.append({"path": line["path"], "problem": line["error"]})
            continue
        totals["modules"] += line["num_modules"]
        totals["params"] += line["params"]
        totals["bytes"] += line["bytes"] or 0
        bad_flags = [f for f in line["flags"] if f not in BENIGN_FLAGS]
        if bad_flags:
            totals["flagged"] += 1
            problems.append({"path": line["path"], "problem": "flags: " + ", ".join(bad_flags)})
        group = groups[line["base_model"] or "(unknown base)"]
        group["adapters"] += 1
        group["params"] += line["params"]
        group["formats"][line["format"]] += 1
        group["targets"][", ".join(line["target_modules"])] += 1
        for module in line["modules"]:
            nominal[module["rank"]] += 1
            group["ranks"][module["rank"]] += 1
            if module["rank_at_energy"] is not None:
                rank_99[module["rank_99"]] += 1
                at_energy[module["rank_at_energy"]] += 1
        _count_truncation(line.get("truncation"), truncated, problems, line["path"])
        if line["params_at_energy"] is not None and line["modules"]:
            serving.append({"unit": line["rank_unit_params"], "params": line["params"],
                            "params_at_energy": line["params_at_energy"],
                            "nominal": max(m["rank"] for m in line["modules"]),
                            "needed": max(m["rank_at_energy"] for m in line["modules"]),
                            "worst_at": line["energy_at_rank"] or {}})
        else:
            totals["unservable"] += 1  # NaN/Inf factors: no spectrum, left out of the memory figures
    return {
        "energy": energy,
        "totals": {key: totals[key] for key in ("adapters", "errors", "flagged", "modules", "params", "bytes")}
        | {"worker_seconds": round(totals["seconds"], 3), "left_out_of_serving": totals["unservable"]},
        "problems": problems,
        "groups": {base: {"adapters": g["adapters"], "params": g["params"], "formats": dict(g["formats"]),
                          "target_modules": dict(g["targets"].most_common()),
                          "ranks": {str(k): v for k, v in sorted(g["ranks"].items())}}
                   for base, g in sorted(groups.items())},
        "histograms": {"nominal_rank": _sorted(nominal), "rank_99": _sorted(rank_99),
                       "rank_at_energy": _sorted(at_energy)},
        "serving": serving_memory(serving, energy),
        "truncation": dict(truncated),
    }


def _count_truncation(truncation: dict[str, Any] | None, counts: Counter[str], problems: list[dict[str, Any]],
                      path: str) -> None:
    if not truncation:
        return
    if truncation.get("error"):
        counts["failed"] += 1
        problems.append({"path": path, "problem": "not right-sized: " + truncation["error"]})
        return
    counts["written"] += 1
    counts["params_before"] += truncation["params_before"]
    counts["params_after"] += truncation["params_after"]
    counts["bytes_before"] += truncation["bytes_before"]
    counts["bytes_after"] += truncation["bytes_after"]


def _sorted(counter: Counter[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counter.items())}


def serving_memory(adapters: list[dict[str, Any]], energy: float) -> dict[str, Any]:
    """Slot memory now, after truncating everything at ``energy``, and with the slot rank capped at each R."""
    if not adapters:
        return {"adapters": 0}
    units = sum(a["unit"] for a in adapters)
    slot_now = max(a["nominal"] for a in adapters)
    slot_after = max(a["needed"] for a in adapters)
    right_sized = sum(a["unit"] * a["needed"] for a in adapters)

    def memory(params: int) -> dict[str, Any]:
        return {"params": params, "bytes": params * SERVING_BYTES_PER_PARAM}

    caps = []
    cap = 1
    while cap < slot_now:
        short = [a for a in adapters if a["needed"] > cap]
        kept = [a["worst_at"].get(str(cap), 1.0) for a in short]
        caps.append({"slot_rank": cap, **memory(units * cap), "saving": 1 - cap / slot_now,
                     "adapters_fitting": len(adapters) - len(short), "adapters_truncated_below_energy": len(short),
                     "worst_module_energy_min": min(kept) if kept else None,
                     "worst_module_energy_median": statistics.median(kept) if kept else None})
        cap *= 2
    return {
        "adapters": len(adapters),
        "bytes_per_param": SERVING_BYTES_PER_PARAM,
        "stored": {"now": sum(a["params"] for a in adapters),
                   "at_energy": sum(a["params_at_energy"] for a in adapters)},
        "slot_rank_now": slot_now,
        "slot_rank_at_energy": slot_after,
        "now": memory(units * slot_now),
        "truncate_everything": {**memory(units * slot_after), "saving": 1 - slot_after / slot_now if slot_now else 0.0},
        "per_adapter_slots": {**memory(right_sized), "saving": 1 - right_sized / (units * slot_now)
                              if slot_now else 0.0},
        "caps": caps,
    }
