"""What `loratools inspect` and `loratools spectrum` compute: per-module spectra and an adapter summary.

The result is plain data (dicts, lists, floats) so that the JSON, the table and the plots render the same numbers.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from lora_tools import __version__
from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import InvalidOptionError
from lora_tools.formats.peft import natural_key
from lora_tools.linalg import single_threaded, spectrum_metrics
from lora_tools.updates import exact_singular_values

SORT_KEYS = ("name", "norm", "rank")


def select_modules(adapter: Adapter, module_glob: str | None) -> list[LoraModule]:
    modules = list(adapter.modules.values())
    if module_glob:
        modules = [m for m in modules if fnmatch.fnmatchcase(m.name, module_glob)]
        if not modules:
            raise InvalidOptionError(f"{adapter.path}: no module matches --module {module_glob!r} "
                                     f"(e.g. {next(iter(adapter.modules))!r})")
    return modules


@torch.no_grad()
def analyze_module(adapter: Adapter, module: LoraModule) -> dict[str, Any]:
    """Exact spectrum and its metrics for one module, from the factors only (float64)."""
    flags = list(module.flags)
    if module.update is None:
        B, A = adapter.factors(module.name, torch.float64)  # B: (out, r), A: (r, in)
        finite = bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
        if finite and not bool(B.any()):
            flags.append("zero_B")
        if finite and not bool(A.any()):
            flags.append("zero_A")
    else:  # LyCORIS/AdaLoRA (issue 10): checks on the stored tensors, factors only if the spectrum needs them
        B = A = None
        finite, zero = module.update.check(adapter.source)
        if finite and zero:
            flags.append("zero_update")
    if not finite:
        flags.append("nonfinite")
    if finite:
        S = exact_singular_values(adapter, module, B, A)  # LoKr/full diffs: from their own structure
        values: list[float | None] = [float(s) for s in S]
    else:
        S = torch.full((module.rank,), float("nan"), dtype=torch.float64)
        values = [None] * module.rank
    metrics = spectrum_metrics(S, (module.out_features, module.in_features))
    full_rank = min(module.rank, module.out_features, module.in_features)
    if module.rank > min(module.out_features, module.in_features):
        flags.append("rank_exceeds_shape")
    if finite and 0 < metrics.numerical_rank < full_rank:
        flags.append("rank_deficient")
    return {
        "name": module.name,
        "kind": module.kind,
        "update": module.update_kind,  # lora, loha, lokr, locon-tucker, adalora, full
        **({"update_detail": module.update.detail()} if module.update is not None else {}),
        "shape": [module.out_features, module.in_features],
        "weight_shape": list(module.weight_shape),
        "rank": module.rank,
        "alpha": module.alpha,
        "scale": module.scale,
        "dtype": module.dtype,
        "params": module.num_params,
        **metrics.as_dict(),
        "singular_values": values,
        "flags": flags,
    }


def sort_rows(rows: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    if sort not in SORT_KEYS:
        raise InvalidOptionError(f"unknown sort key {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    if sort == "norm":
        return sorted(rows, key=lambda r: -(r["fro_norm"] if r["fro_norm"] == r["fro_norm"] else -1.0))
    if sort == "rank":
        return sorted(rows, key=lambda r: (-r["rank"], natural_key(r["name"])))
    return sorted(rows, key=lambda r: natural_key(r["name"]))


def inspect_adapter(adapter: Adapter, module_glob: str | None = None, sort: str = "name",
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The full inspect report of an adapter as a JSON-ready dict (modules streamed one at a time)."""
    modules = select_modules(adapter, module_glob)
    rows = []
    with single_threaded():
        for module in modules:
            rows.append(analyze_module(adapter, module))
            if progress:
                progress(1)
    warnings = list(adapter.warnings)
    for row in rows:
        if "nonfinite" in row["flags"]:
            warnings.append(f"module {row['name']}: factors contain NaN or Inf values")
    zero = [r["name"] for r in rows if "zero_B" in r["flags"]]
    if zero:
        warnings.append(f"{len(zero)} module(s) have lora_B all zero (untrained; ΔW = 0), e.g. {zero[0]}")
    config = adapter.config
    return {
        "loratools_version": __version__,
        "path": str(adapter.path),
        "format": adapter.format,
        "base_model": adapter.base_model,
        "scale_rule": adapter.scale_rule,
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "num_modules": len(adapter.modules),
        "num_reported": len(rows),
        "total_params": adapter.total_params,
        "file_size": adapter.file_size,
        "ranks": _histogram(m.rank for m in adapter.modules.values()),
        "alphas": _histogram(m.alpha for m in adapter.modules.values()),
        "scales": _histogram(round(m.scale, 10) for m in adapter.modules.values()),
        "dtypes": _histogram(m.dtype for m in adapter.modules.values()),
        "kinds": _histogram(m.kind for m in adapter.modules.values()),
        "updates": _histogram(m.update_kind for m in adapter.modules.values()),
        "extra_tensors": [info.as_json() for info in adapter.extra_tensors],
        "metadata": {k: v for k, v in adapter.metadata.items() if len(v) <= 200},
        "warnings": warnings,
        "modules": sort_rows(rows, sort),
    }


def _histogram(values: Any) -> dict[str, int]:
    counts = Counter(values)
    return {_format_key(k): n for k, n in sorted(counts.items(), key=lambda kv: (str(type(kv[0])), kv[0]))}


def _format_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
