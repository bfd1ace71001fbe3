"""compare-quant's evaluate stage: the held-out pass's per-token statistics, then each layer's report row.

The held-out tokens are handed over in chunks of ``STATS_CHUNK``: every temporary of the statistics is then a few
MB and freed blocks of one size are reused (whole 4k-token batches fragmented glibc's heap: compare-quant's
resident memory on SmolLM2 grew from 3.6 to 12.6 GB inside one batch). On SmolLM2, 1024-token chunks took the
held-out statistics from 68 s (256-token chunks: per-call overhead) to 32 s at the same 3.0 GB peak.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_tools.compare.metrics import (
    EnergyContext,
    approximation_error_structure,
    rel_error,
    snr_db,
    uniform_noise_prediction,
)
from lora_tools.compare.summary import mark_duplicates
from lora_tools.errors import LoraToolsError

# Relative tolerance of the built-in check: svd-act's calibration error² vs the eigenvalue tail (both float64).
OPTIMAL_CHECK_RTOL = 1e-6
STATS_CHUNK = 1024


@torch.no_grad()
def add_holdout_tokens(layer: Any, x: torch.Tensor) -> None:
    """One held-out batch of the layer's inputs x (T, in): every approximation's statistics (C_holdout is added
    by the caller, once per shared input)."""
    for start in range(0, x.shape[0], STATS_CHUNK):
        x32 = x[start:start + STATS_CHUNK].to(torch.float32)
        y = layer.target.apply(x32)  # (t, out)
        y_sq = y.square().sum(dim=1, dtype=torch.float64)  # (t,)
        for error_map, stats in zip(layer.error_maps, layer.stats, strict=True):
            stats.update(y, error_map(x32, y), y_sq)


def _stored_map(target: Any, device: torch.device) -> torch.Tensor | None:
    """The dense map (out, in) the metrics read, for dense targets only (a factored target's errors all come
    from its factors), as stored: the metrics read it in row blocks cast to float64, never a whole float64 copy
    (92 MB for a 2048 x 5632 layer)."""
    return None if target.factored else target.weight.to(device)


@torch.no_grad()
def measure_calibration(layer: Any, device: torch.device, keep_span: bool) -> None:
    """Everything that reads C_calib, right after the fit: each approximation's calibration error, the built-in
    check that svd-act's error² is the eigenvalue tail, the noise prediction on calibration inputs and (for the
    end-to-end stage) C_calib on the row space of A. The caller frees C_calib next (once every layer sharing it
    was measured), so a layer never holds two (in, in) covariances: the held-out one is allocated by the first
    held-out batch."""
    target = layer.target
    C_calib = layer.calib.gram
    W = _stored_map(target, device)
    context = EnergyContext(target, C_calib, W)
    errors = []
    for approx, (err_calib, _, _) in zip(layer.approximations, context.measure(layer.approximations), strict=True):
        if approx.method == "svd-act":
            expected = layer.eigen.tail_energy(approx.rank)
            if abs(err_calib - expected) > OPTIMAL_CHECK_RTOL * context.y + 1e-300:
                raise LoraToolsError(
                    f"internal check failed for {layer.name}: svd-act error² {err_calib:.6g} at rank "
                    f"{approx.rank} differs from the eigenvalue tail {expected:.6g}")
        errors.append(err_calib)
    layer.calib_energy = (context.y, errors)
    layer.eigen = None  # the check is done: an (out, m) float64 basis per layer is too much to hold for a block
    layer.calib_noise = [uniform_noise_prediction(approx, target, C_calib) for approx in layer.approximations]
    if keep_span and target.factored:
        from lora_tools.compare.span import SpanCovariance

        layer.span = SpanCovariance(C_calib, target.A)


@torch.no_grad()
def finalize_layer(layer: Any, device: torch.device) -> dict[str, Any]:
    """The layer's report row: Frobenius errors from C_holdout (and the calibration ones measured after the fit),
    error structure, noise-model prediction and the streamed per-token statistics."""
    target = layer.target
    has_hold = layer.holdout.tokens > 0
    W = _stored_map(target, device)
    hold_ctx = EnergyContext(target, layer.holdout.gram, W) if has_hold else None
    held_out = (hold_ctx.measure(layer.approximations) if hold_ctx is not None
                else [(0.0, 0.0, 0.0)] * len(layer.approximations))
    y_calib, calib_errors = layer.calib_energy
    y_hold = hold_ctx.y if hold_ctx is not None else 0.0
    computed = []
    for i, (approx, stats) in enumerate(zip(layer.approximations, layer.stats, strict=True)):
        err_calib = calib_errors[i]
        err_hold, y_hat_hold, inner = held_out[i]
        stable_rank, top1 = approximation_error_structure(target, approx, W)
        predicted = (uniform_noise_prediction(approx, target, layer.holdout.gram) if has_hold
                     else layer.calib_noise[i])
        measured = err_hold if has_hold else err_calib
        computed.append({
            "method": approx.method,
            "rank": approx.rank,
            "bytes": approx.bytes,
            "bits_per_param": 8.0 * approx.bytes / target.params,
            "rel_error": rel_error(y_hold, err_hold) if has_hold else math.nan,
            "rel_error_calib": rel_error(y_calib, err_calib),
            "snr_db": snr_db(y_hold, err_hold) if has_hold else math.nan,
            "cosine": inner / math.sqrt(y_hold * y_hat_hold) if y_hold > 0 and y_hat_hold > 0 else math.nan,
            **stats.summary(),
            "error_stable_rank": stable_rank,
            "error_top1_energy": top1,
            "uniform_noise_ratio": (measured / predicted if predicted else math.nan)
            if predicted is not None else None,
            "_energy": (y_hold, err_hold, y_calib, err_calib, inner, y_hat_hold),
        })
    results = []
    for index, budget in layer.entries:
        base = computed[index]
        label = f"{base['method']}@{budget}" if budget else layer.approximations[index].label
        results.append({"label": label, "method": base["method"], "rank": base["rank"],
                        "equal_budget_to": budget, **{k: v for k, v in base.items()
                                                      if k not in ("method", "rank")}})
    mark_duplicates(results, [index for index, _ in layer.entries])
    return {
        "name": layer.name,
        "model_module": layer.model_name,
        "kind": layer.lora.kind if layer.lora else "linear",
        "shape": list(target.shape),
        "params": target.params,
        "reference_bytes": target.reference_bytes,
        "optimal_rel_error_calib": layer.optimal,
        "notes": layer.notes,
        "results": results,
    }

