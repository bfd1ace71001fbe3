"""Pure quantize / dequantize primitives on 2-D (out, in) weights (conventions in ``lora_tools.quant``)."""

from __future__ import annotations

import math

import torch

from lora_tools.quant.schemes import Granularity, PerRow, PerTensor, QuantScheme

SCALE_DTYPE = torch.float16


def _grouped(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View ``w`` (out, in) as (out, n_groups, group) — zero-padded at the end of a row when needed."""
    out, inp = w.shape
    if isinstance(granularity, PerTensor):
        return w.reshape(1, 1, out * inp)
    if isinstance(granularity, PerRow):
        return w.reshape(out, 1, inp)
    size = granularity.group_size
    groups = math.ceil(inp / size)
    pad = groups * size - inp
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, groups, size)


def _ungrouped(g: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``_grouped``: back to (out, in), dropping the padding."""
    out, inp = shape
    return g.reshape(out, -1)[:, :inp]


@torch.no_grad()
def choose_qparams(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Scales for ``w`` (out, in): amax / qmax per group, rounded to float16; shape (out|1, n_groups|1, 1).

    An all-zero group gets scale 1 (any scale reproduces zeros exactly) so that quantize never divides by zero.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    grouped = _grouped(w.float(), scheme.granularity)
    amax = grouped.abs().amax(dim=-1, keepdim=True)
    scale = (amax / scheme.qmax).to(SCALE_DTYPE).to(torch.float32)
    # float16 underflow (amax < ~6e-8 · qmax) would give scale 0: keep the smallest positive float16 instead.
    tiny = torch.finfo(SCALE_DTYPE).smallest_normal
    scale = torch.where(amax == 0, torch.ones_like(scale), scale.clamp_min(tiny))
    return scale


@torch.no_grad()
def quantize(w: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (int8 storage, values in [-qmax, qmax]) of ``w`` (out, in) with round-half-to-even."""
    grouped = _grouped(w.float(), scheme.granularity)
    codes = torch.round(grouped / scale).clamp_(-scheme.qmax, scheme.qmax)
    return _ungrouped(codes, tuple(w.shape)).to(torch.int8)


@torch.no_grad()
def dequantize(codes: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float32 (out, in) values ``codes · scale`` (exact in float32: ≤ 8-bit codes times 11-bit mantissas)."""
    shape = (codes.shape[0], codes.shape[1])
    grouped = _grouped(codes.float(), scheme.granularity)
    return _ungrouped(grouped * scale, shape)


@torch.no_grad()
def step_sizes(w_shape: tuple[int, int], scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The grid step of every entry, (out, in): the scale of its group (for the uniform-noise prediction)."""
    out, inp = w_shape
    if isinstance(scheme.granularity, PerTensor):
        return scale.reshape(1, 1).expand(out, inp)
    if isinstance(scheme.granularity, PerRow):
        return scale.reshape(out, 1).expand(out, inp)
    size = scheme.granularity.group_size
    return scale.reshape(out, -1, 1).expand(out, scale.shape[1], size).reshape(out, -1)[:, :inp]


@torch.no_grad()
def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized float32 (out, in), per-entry step (out, in)): quantize then dequantize in one call."""
    scale = choose_qparams(w, scheme)
    return dequantize(quantize(w, scale, scheme), scale, scheme), step_sizes(tuple(w.shape), scale, scheme)
