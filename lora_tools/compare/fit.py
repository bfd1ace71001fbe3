"""compare-quant's fit stage: every compression method applied to one layer, from its weights and C_calib only.

Nothing fitted here sees the held-out split. A layer gets: each quantization scheme, plain and activation-aware
truncation at each --ranks rank, and both truncations at the rank whose float16 factors take the bytes of each
scheme (equal budget); approximations shared by two rows are built once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lora_tools.compare.methods import (
    Approximation,
    ErrorMap,
    OutputEigen,
    activation_aware,
    equal_budget_rank,
    output_eigen,
    quantize_target,
    scheme_bytes,
    svd_truncation,
    target_svd,
    weight_gram,
)
from lora_tools.compare.metrics import OutputErrorStats
from lora_tools.quant import QuantScheme


@torch.no_grad()
def fit_layer(layer: Any, schemes: Sequence[QuantScheme], ranks: Sequence[int], device: torch.device) -> None:
    """Every method's approximation of the layer's target from its weights and C_calib, with the streaming
    statistics and error maps the held-out pass fills (``compare.evaluate``)."""
    target = layer.target
    C = layer.calib.gram
    # A dense layer with more outputs than inputs needs Wᵀ W for both its truncations and its output eigenbasis:
    # formed once. (When out <= in the output eigenbasis does not use W Wᵀ, so it is not held during that fit.)
    gram = weight_gram(target) if not target.factored and target.shape[0] > target.shape[1] else None
    # The widest truncation any row needs: a dense target's bases are kept to that many vectors (for a 2048 x 5632
    # layer, 750 of 2048 at int8-channel's equal budget), which the eigenvalues (all of them) do not limit.
    keep = max([rank for rank in ranks if rank <= target.max_rank]
               + [equal_budget_rank(target.shape, scheme_bytes(target, scheme), target.max_rank)
                  for scheme in schemes] + [1])
    eigen = output_eigen(target, C, gram, keep)
    total = eigen.total_energy
    layer.optimal = [math.sqrt(eigen.tail_energy(k) / total) if total > 0 else math.nan
                     for k in range(target.max_rank + 1)]
    svd = target_svd(target, gram, keep)
    del gram
    approximations: list[Approximation] = []
    entries: list[tuple[int, str | None]] = []  # (index into approximations, equal_budget_to)
    lowrank: dict[tuple[str, int], int] = {}

    def add_lowrank(rank: int, equal_budget_to: str | None) -> None:
        # An equal-budget rank that is also a --ranks rank reuses that approximation (and its statistics).
        for method, build in (("svd", lambda: svd_truncation(target, svd, rank)),
                              ("svd-act", lambda: activation_aware(target, eigen, rank))):
            if (method, rank) not in lowrank:
                lowrank[(method, rank)] = len(approximations)
                approximations.append(build())
            entries.append((lowrank[(method, rank)], equal_budget_to))

    for scheme in schemes:
        entries.append((len(approximations), None))
        approximations.append(quantize_target(target, scheme))
    quantized = list(approximations)
    for rank in ranks:
        if rank > target.max_rank:
            layer.notes.append(f"rank {rank} skipped: exceeds the layer's rank {target.max_rank}")
            continue
        add_lowrank(rank, None)
    for approx in quantized:
        add_lowrank(equal_budget_rank(target.shape, approx.bytes, target.max_rank), approx.method)
    layer.entries = entries
    layer.approximations = approximations
    # rms of one output entry on calibration: the unit of the error-entry histogram.
    entry_rms = math.sqrt(total / max(layer.calib.tokens * target.shape[0], 1))
    plotted = {i for i, budget in entries if budget is not None or approximations[i].steps}
    layer.stats = [OutputErrorStats(device, entry_rms, entry_histogram=i in plotted)
                   for i in range(len(approximations))]
    # Kept for the built-in check in evaluate.measure_calibration (which drops it): the eigenvalues, not the
    # eigenvectors every approximation is now built from.
    layer.eigen = OutputEigen(eigen.values, None)
    layer.error_maps = [ErrorMap(target, approx) for approx in approximations]

