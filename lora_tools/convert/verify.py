"""Proof of a conversion: the written file, read back, against the input, module by module (convert.run).

Factors bit for bit where they were copied; otherwise the rebuilt ΔW (low rank, never densified) within
``MAX_REL_DIFFERENCE``, for 1:1 modules and for every stretch of rows of a fused/split group.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.convert.group_factors import group_differences
from lora_tools.convert.image_plan import LayerGroup
from lora_tools.errors import LoraToolsError, ModuleMismatchError
from lora_tools.linalg.products import relative_difference

# A conversion whose rebuilt ΔW differs from the input's by more than this (relative) is refused.
MAX_REL_DIFFERENCE = 1e-6


class VerificationError(LoraToolsError):
    """The converted adapter does not reproduce the input."""


@torch.no_grad()
def verify(original: Adapter, written: Adapter, mapping: dict[str, str],
           groups: list[LayerGroup] | None = None) -> dict[str, Any]:
    """Compare every module of ``written`` (read back from disk) with ``original``; raise on any loss."""
    bit_exact = 0
    worst = 0.0
    worst_module = None
    expected = set(mapping.values())
    for group in groups or []:
        expected.update(group.out_names)
        for name, diff in group_differences(original, written, group):
            if diff > worst or math.isnan(diff):
                worst, worst_module = diff, name
    for name, out_name in mapping.items():
        module = original.modules[name]
        if out_name not in written.modules:
            raise VerificationError(f"verification failed: module {name} ({out_name}) is missing from the output")
        out = written.modules[out_name]
        same_factors = all(
            _bit_equal(original.source.get(a.key), written.source.get(b.key)) and a.dtype == b.dtype
            for a, b in ((module.a_info, out.a_info), (module.b_info, out.b_info)))
        if same_factors and out.scale == module.scale and out.kind == module.kind:
            bit_exact += 1
            continue
        if out.kind != module.kind:
            raise VerificationError(f"verification failed: module {name} is {module.kind} in the input but "
                                    f"{out.kind} in the output")
        if same_factors:
            diff = abs(out.scale - module.scale) / abs(module.scale) if module.scale else abs(out.scale)
        else:
            B, A = original.factors(name, torch.float64)
            B2, A2 = written.factors(out_name, torch.float64)
            diff = relative_difference(out.scale * B2, A2, module.scale * B, A)
        if diff > worst or math.isnan(diff):
            worst, worst_module = diff, name
    if not set(written.modules) <= expected:
        extra = sorted(set(written.modules) - expected)
        raise VerificationError(f"verification failed: the output has {len(extra)} unexpected module(s), e.g. "
                                f"{extra[:1]}")
    if not worst <= MAX_REL_DIFFERENCE:
        raise VerificationError(f"verification failed: module {worst_module}: the rebuilt ΔW differs from the "
                                f"input by {worst:.3g} (relative); nothing written")
    return {"bit_exact_modules": bit_exact, "max_rel_difference": worst, "worst_module": worst_module}


def _bit_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike torch.equal, NaN factors copied as stored compare equal)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def check_finite(adapter: Adapter, names: Any) -> None:
    """Refuse modules with NaN/Inf factors: a converted copy would spread a broken adapter under a new name."""
    for name in names:
        B, A = adapter.factors(name)
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise ModuleMismatchError(f"{adapter.path}: module {name}: LoRA factors contain NaN or Inf; refusing to "
                                      "convert (pass --allow-nonfinite to copy them unchanged)")
