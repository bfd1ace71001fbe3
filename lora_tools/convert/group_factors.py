"""Factors of the output layers of a split, fuse or row swap (convert/image_plan.py), and their proof.

Built in the widest dtype of the inputs (no rounding: rows and columns are copied, only a fuse of parts with
different scales multiplies a block of B). Verification reads the written file back and compares, for every
stretch of rows, the input's update with the output's: ΔW_in[rows] = ΔW_out[rows'] to the relative tolerance
``convert.run`` allows, and zero where a fuse filled an absent part.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lora_tools.adapter import Adapter
from lora_tools.convert.fused import check_sizes, fuse_parts, row_bounds, split_fused, swap_halves
from lora_tools.convert.image_plan import LayerGroup
from lora_tools.linalg.products import relative_difference


@dataclass
class GroupOutput:
    name: str
    kind: str  # the input's layer kind (linear; conv for SDXL's renamed convs never reach here)
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    scale: float


def _stored(adapter: Adapter, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a module as stored (dtype kept), 2-D."""
    module = adapter.modules[name]
    B = adapter.source.get(module.b_info.key)
    A = adapter.source.get(module.a_info.key)
    return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)


@torch.no_grad()
def build_group(adapter: Adapter, group: LayerGroup) -> list[GroupOutput]:
    """The output modules of one group (an absent part of a block-diagonal split yields no module)."""
    if group.kind in ("swap", "split"):
        name = group.inputs[0]
        assert name is not None
        module = adapter.modules[name]
        B, A = _stored(adapter, name)
        if group.kind == "swap":
            if B.shape[0] % 2:
                check_sizes(f"{adapter.path}: module {name}", B.shape[0], [B.shape[0] // 2] * 2,
                            ["shift", "scale"])
            return [GroupOutput(group.out_names[0], module.kind, swap_halves(B), A, module.scale)]
        check_sizes(f"{adapter.path}: module {name}", B.shape[0], group.sizes, group.out_names)
        outputs = []
        for out_name, part in zip(group.out_names, split_fused(B, A, group.sizes), strict=True):
            if part is not None:
                outputs.append(GroupOutput(out_name, module.kind, part[0].contiguous(), part[1].contiguous(),
                                           module.scale))
        return outputs
    parts: list[tuple[torch.Tensor, torch.Tensor, float] | None] = []
    in_features = 0
    for name in group.inputs:
        if name is None:
            parts.append(None)
            continue
        B, A = _stored(adapter, name)
        in_features = A.shape[1]
        parts.append((B, A, adapter.modules[name].scale))
    first = next(adapter.modules[n] for n in group.inputs if n is not None)
    B, A, scale = fuse_parts(parts, group.sizes, in_features)
    return [GroupOutput(group.out_names[0], first.kind, B, A, scale)]


def _pieces(group: LayerGroup) -> Iterator[tuple[str | None, tuple[int, int] | None, str, tuple[int, int] | None]]:
    """(input, its rows, output, its rows) stretches that must hold the same update; rows None: all rows."""
    if group.kind == "swap":
        yield group.inputs[0], (0, -1), group.out_names[0], (-1, 0)  # halves, resolved from shapes
        yield group.inputs[0], (-1, 0), group.out_names[0], (0, -1)
    elif group.kind == "split":
        for out_name, bounds in zip(group.out_names, row_bounds(group.sizes), strict=True):
            yield group.inputs[0], bounds, out_name, None
    else:
        for name, bounds in zip(group.inputs, row_bounds(group.sizes), strict=True):
            yield name, None, group.out_names[0], bounds


def _rows(B: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    if rows is None:
        return B
    half = B.shape[0] // 2
    if rows == (0, -1):
        return B[:half]
    if rows == (-1, 0):
        return B[half:]
    return B[rows[0]:rows[1]]


def _copied_difference(B_in: torch.Tensor, A_in: torch.Tensor, scale_in: float, B_out: torch.Tensor,
                       A_out: torch.Tensor, scale_out: float) -> float | None:
    """The relative difference of s·B·A when the output holds the input's non-zero columns of B and their rows of
    A bit for bit (what a split or fuse writes): then only the scales can differ. None when it does not."""
    used_in = B_in.any(dim=0).nonzero().flatten()
    used_out = B_out.any(dim=0).nonzero().flatten()
    if used_in.numel() != used_out.numel() or B_in.dtype != B_out.dtype or A_in.dtype != A_out.dtype:
        return None
    if not (torch.equal(B_in[:, used_in], B_out[:, used_out]) and torch.equal(A_in[used_in], A_out[used_out])):
        return None
    if used_in.numel() == 0 or scale_in == scale_out:
        return 0.0
    return abs(scale_out - scale_in) / abs(scale_in) if scale_in else math.inf


@torch.no_grad()
def group_differences(original: Adapter, written: Adapter, group: LayerGroup) -> Iterator[tuple[str, float]]:
    """(module, relative difference) for every stretch of rows of the group; inf for a missing output module,
    except the absent part a block-diagonal split leaves out, which must have been zero in the input."""
    for name, in_rows, out_name, out_rows in _pieces(group):
        if out_name not in written.modules:
            if name is not None and in_rows is not None:
                B, _ = _stored(original, name)
                yield (out_name, 0.0 if not bool(_rows(B, in_rows).any()) else math.inf)
            else:
                yield out_name, math.inf
            continue
        B_out, A_out = _stored(written, out_name)
        B_out = _rows(B_out, out_rows)
        scale_out = written.modules[out_name].scale
        if name is None:  # an absent part: the fused rows must hold no update
            yield out_name, 0.0 if not bool(B_out.any()) else math.inf
            continue
        B_in, A_in = _stored(original, name)
        B_in = _rows(B_in, in_rows)
        scale_in = original.modules[name].scale
        copied = _copied_difference(B_in, A_in, scale_in, B_out, A_out, scale_out)
        if copied is not None:  # exact, without a QR of the stacked factors
            yield name, copied
            continue
        yield name, relative_difference(scale_out * B_out.double(), A_out.double(), scale_in * B_in.double(),
                                        A_in.double())


def group_mapping(groups: list[LayerGroup]) -> dict[str, str]:
    """Input module -> output name(s), for the report: a split lists its parts, a fuse's inputs name the layer."""
    mapping = {}
    for group in groups:
        for name in group.inputs:
            if name is not None:
                mapping[name] = " + ".join(group.out_names)
    return mapping
