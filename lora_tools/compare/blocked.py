"""float64 products with a stored (float32) dense weight W, read a block of rows at a time.

A whole float64 copy of a 2048 x 5632 weight is 92 MB; the fit of one streamed layer used to hold up to one such
copy beside W C, C and the eigenbases (issue 12's memory target). Here only ROW_BLOCK rows of W are ever cast to
float64 at once, and every result is written into its own preallocated float64 tensor. The sums run in another
order than one large product, so results agree with ``W.double() @ M`` to float64 rounding, not bit for bit.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 256
F64 = torch.float64


def row_blocks(count: int, size: int = ROW_BLOCK) -> list[slice]:
    """Consecutive slices of ``size`` covering ``range(count)``: the unit of the float64 temporaries."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def weight_times(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """W M (W: (out, in), M: (in, k) float64) -> (out, k) float64, a block of W's rows (and the result's) at a
    time."""
    result = torch.empty(W.shape[0], M.shape[1], dtype=F64, device=M.device)
    for rows in row_blocks(W.shape[0]):
        torch.matmul(W[rows].to(F64), M, out=result[rows])
    return result


def times_weight_t(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """X Wᵀ (X: (k, in) float64, W: (out, in)) -> (k, out) float64, a block of W's rows (the result's columns) at
    a time."""
    result = torch.empty(X.shape[0], W.shape[0], dtype=F64, device=X.device)
    for rows in row_blocks(W.shape[0]):
        result[:, rows] = X @ W[rows].to(F64).T
    return result


def times_weight(M: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """M W (M: (k, out) float64, W: (out, in)) -> (k, in) float64, summed over blocks of W's rows."""
    result = torch.zeros(M.shape[0], W.shape[1], dtype=F64, device=M.device)
    for rows in row_blocks(W.shape[0]):
        result.addmm_(M[:, rows], W[rows].to(F64))
    return result


def sandwich(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """W C Wᵀ (W: (out, in), C: (in, in) float64) -> (out, out) float64, a block of rows at a time (each block's
    W C rows are dropped once used)."""
    result = torch.empty(W.shape[0], W.shape[0], dtype=F64, device=C.device)
    for rows in row_blocks(W.shape[0]):
        result[rows] = times_weight_t(W[rows].to(F64) @ C, W)
    return result


def gram(W: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of W in float64: W Wᵀ (out, out) when out <= in, else Wᵀ W (in, in); summed over
    blocks of columns (resp. rows) of W."""
    out, inp = W.shape
    if out <= inp:
        result = torch.zeros(out, out, dtype=F64, device=W.device)
        for cols in row_blocks(inp):
            block = W[:, cols].to(F64)  # (out, b)
            result.addmm_(block, block.T)
        return result
    result = torch.zeros(inp, inp, dtype=F64, device=W.device)
    for rows in row_blocks(out):
        block = W[rows].to(F64)  # (b, in)
        result.addmm_(block.T, block)
    return result
