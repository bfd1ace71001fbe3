"""Exact fused <-> split LoRA factors: one layer whose output stacks several projections (Flux ``img_attn.qkv``,
``linear1`` = q, k, v and the MLP input) against one LoRA per projection.

With ΔW = s·B·A, B: (out, r), A: (r, in), the rows of ΔW that belong to part i are s·B[rows_i]·A, so:

* fused -> split: every part keeps A and takes its rows of B (rank r each). When B is block-diagonal (zero outside
  one column range per part, as a file that was once split and fused has it), part i takes its column range of B
  and the same rows of A instead: rank r_i, the smaller file, the same update.
* split -> fused: A stacked, B block-diagonal: rank Σ r_i; the common scale is the first part's, and a part with
  another scale has it folded into its block of B (s_i/s), so every row of ΔW is unchanged. A part that is absent
  (a file trained on q, k, v but not the MLP input) is a block of zero rows with no columns.
"""

from __future__ import annotations

import torch

from lora_tools.errors import ModuleMismatchError


def row_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def check_sizes(where: str, rows: int, sizes: list[int], parts: list[str]) -> None:
    """Refuse a fused layer whose rows are not the parts' sizes added up (a file of another model or width)."""
    if sum(sizes) != rows:
        shown = " + ".join(f"{size} ({part.rsplit('.', 1)[-1]})" for size, part in zip(sizes, parts, strict=True))
        raise ModuleMismatchError(f"{where}: fused layer has {rows} output rows but its parts add up to "
                                  f"{shown} = {sum(sizes)}; not a layer of this model")


def block_columns(B: torch.Tensor, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Column range of each row block when B (out, r) is block-diagonal; None otherwise.

    Equal ranges (r/n each) are tried first: what a fused file written from equal-rank parts holds. Otherwise each
    column must be non-zero in at most one row block, in row-block order; all-zero columns join the block before
    them. A block with no column of its own is allowed only when its rows are all zero (an absent part)."""
    n, rank = len(sizes), B.shape[1]
    if n < 2 or rank == 0:
        return None
    bounds = row_bounds(sizes)
    nonzero = torch.stack([(B[a:b] != 0).any(dim=0) for a, b in bounds])  # (n, r)
    if rank % n == 0:
        width = rank // n
        mask = torch.zeros_like(nonzero)
        for i in range(n):
            mask[i, i * width:(i + 1) * width] = True
        if not bool((nonzero & ~mask).any()):
            return [(i * width, (i + 1) * width) for i in range(n)]
    if bool((nonzero.sum(dim=0) > 1).any()):
        return None
    owners = [int(nonzero[:, j].nonzero()[0]) if bool(nonzero[:, j].any()) else -1 for j in range(rank)]
    previous = next((o for o in owners if o >= 0), None)
    if previous is None:
        return None  # B is zero: nothing tells the blocks apart
    filled = []
    for owner in owners:
        previous = owner if owner >= 0 else previous
        filled.append(previous)
    if filled != sorted(filled):
        return None
    columns = []
    for i in range(n):
        taken = [j for j, owner in enumerate(filled) if owner == i]
        if not taken and bool(nonzero[i].any()):
            return None
        columns.append((taken[0], taken[-1] + 1) if taken else (0, 0))
    return columns


def split_fused(B: torch.Tensor, A: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """(B_i, A_i) of each part of a fused layer, B: (out, r), A: (r, in); None for a part that a block-diagonal B
    leaves without columns (its update is zero: an absent part of a file fused with --allow-partial)."""
    bounds = row_bounds(sizes)
    columns = block_columns(B, sizes)
    if columns is None:
        return [(B[a:b], A) for a, b in bounds]
    parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for (a, b), (c, d) in zip(bounds, columns, strict=True):
        parts.append((B[a:b, c:d], A[c:d]) if d > c else None)
    return parts


def fuse_parts(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None], sizes: list[int],
               in_features: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, scale) of the fused layer from its parts' (B_i, A_i, s_i), None for an absent part (zero rows).

    B_i: (sizes[i], r_i), A_i: (r_i, in). Factors keep the widest dtype of the parts; a part whose scale differs
    from the first part's has s_i/s folded into its block of B (in float64, then cast)."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ModuleMismatchError("no part of the fused layer is present")
    dtype = present[0][0].dtype
    for B, A, _ in present:
        dtype = torch.promote_types(dtype, torch.promote_types(B.dtype, A.dtype))
    scale = present[0][2]
    ranks = [p[1].shape[0] if p is not None else 0 for p in parts]
    fused_B = torch.zeros(sum(sizes), sum(ranks), dtype=dtype)
    fused_A = torch.zeros(sum(ranks), in_features, dtype=dtype)
    column = 0
    for (a, b), part, rank in zip(row_bounds(sizes), parts, ranks, strict=True):
        if part is None:
            continue
        B, A, part_scale = part
        block = B.to(dtype)
        if part_scale != scale:
            block = (B.to(torch.float64) * (part_scale / scale)).to(dtype)
        fused_B[a:b, column:column + rank] = block
        fused_A[column:column + rank] = A.to(dtype)
        column += rank
    return fused_B, fused_A, scale


def swap_halves(B: torch.Tensor) -> torch.Tensor:
    """B with its two row halves swapped (Flux final_layer (shift, scale) <-> diffusers norm_out (scale, shift))."""
    half = B.shape[0] // 2
    return torch.cat([B[half:], B[:half]], dim=0)
