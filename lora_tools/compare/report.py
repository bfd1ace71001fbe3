"""compare-quant's report stage: the per-layer rows rolled up into report.json's top level."""

from __future__ import annotations

from typing import Any

from lora_tools import __version__
from lora_tools.compare.options import display_path
from lora_tools.compare.summary import aggregate, summary


def build_report(job: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json's per-layer part for a finished job; ``rows`` from ``evaluate.finalize_layer``, in layer
    order. The ``end_to_end`` section is added by ``compare.whole_model``."""
    layers = rows
    layer_stats = [[layer.stats[index] for index, _ in layer.entries] for layer in job.layers]
    aggregate_rows, histograms = aggregate(layers, layer_stats)
    for row in layers:
        for result in row["results"]:
            result.pop("_energy")
    first = job.layers[0] if job.layers else None
    schemes = [s.name for s in job.schemes]
    return {
        "tool": f"loratools {__version__}",
        "base_model": display_path(job.base_path) if job.base_path else None,
        "base_note": job.base_note,
        "update_note": update_note(job.adapter),
        # The name the adapter gives its base, whether or not a base model was loaded.
        "adapter_base_model": job.adapter.base_model if job.adapter else None,
        "base_model_run": not job.random,
        "inputs": "random" if job.random else "captured",
        "adapter": display_path(job.adapter.path) if job.adapter else None,
        "target": job.options.target,
        "device": str(job.device),
        "dtype": job.options.dtype,
        "calib": job.calib_description,
        # Which tokens the errors in "summary" (and rel_error) were measured on; see compare.holdout.
        "evaluation": job.evaluation,
        "calib_tokens": first.calib.tokens if first else 0,
        "holdout_tokens": first.holdout.tokens if first else 0,
        "calib_sequences": len(job.calib_sequences),
        "holdout_sequences": len(job.holdout_sequences),
        "holdout_fraction": job.options.holdout,
        "min_tokens": max(layer.shape[1] for layer in job.layers) if job.layers else 0,
        "ranks": list(job.ranks),
        "schemes": schemes,
        "unmatched_modules": job.unmatched,
        "skipped_modules": job.skipped,
        "layers": layers,
        "aggregate": aggregate_rows,
        "summary": summary(layers, aggregate_rows, schemes, job.evaluation),
        "error_histograms": histograms,
    }


def update_note(adapter: Any) -> str | None:
    """What the report must say when modules store a structured update (LoHa, LoKr, Tucker, AdaLoRA, full): every
    method here works on its exact LoRA form (B·A of rank r1·r2 for LoHa), so 'the adapter's bytes' and the
    truncations are those of that form, not of the tensors as stored."""
    if adapter is None:
        return None
    kinds: dict[str, int] = {}
    for module in adapter.modules.values():
        if module.update_kind != "lora":
            kinds[module.update_kind] = kinds.get(module.update_kind, 0) + 1
    if not kinds:
        return None
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return (f"{listed} module(s) store a structured update; they are compared as its exact LoRA form (rank and "
            "bytes of that form, not of the tensors as stored)")
