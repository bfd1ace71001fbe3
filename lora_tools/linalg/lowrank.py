"""The SVD of ``scale * B @ A`` from the factors alone.

With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), B·A = Q_b (R_b R_aᵀ) Q_aᵀ: the r x r core carries every singular value
and Q_b, Q_a (orthonormal columns) rotate its singular vectors back. Cost O((out + in)·r² + r³) instead of the
O(out·in·min(out, in)) of a dense SVD, and no out x in matrix is ever allocated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LowRankSVD:
    """``delta = U @ diag(S) @ Vh`` with U: (out, k), S: (k,), Vh: (k, in), k = min(r, out, in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


@torch.no_grad()
def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *, dtype: Any = torch.float64,
                compute_uv: bool = True) -> LowRankSVD:
    """Exact thin SVD of ``scale * B @ A`` (B: (out, r), A: (r, in)), computed in ``dtype``."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not chain: B {tuple(B.shape)} @ A {tuple(A.shape)}")
    B = B.to(dtype)
    A = A.to(dtype)
    if not compute_uv:
        # The singular values live in the core alone; skipping Q (orgqr) is most of the cost.
        r_b = torch.linalg.qr(B, mode="r")[1]  # (k_b, r)
        r_a = torch.linalg.qr(A.T, mode="r")[1]  # (k_a, r)
        S = torch.linalg.svdvals((r_b @ r_a.T) * scale)
        empty = B.new_zeros((0,))
        return LowRankSVD(empty, S, empty)
    q_b, r_b = torch.linalg.qr(B)  # q_b: (out, k_b), r_b: (k_b, r)
    q_a, r_a = torch.linalg.qr(A.T)  # q_a: (in, k_a), r_a: (k_a, r)
    core = (r_b @ r_a.T) * scale  # (k_b, k_a)
    u_core, S, vh_core = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(q_b @ u_core, S, vh_core @ q_a.T)


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *,
                    dtype: Any = torch.float64) -> torch.Tensor:
    """All r singular values of ``scale * B @ A``, descending; zeros beyond min(out, in) when r exceeds it."""
    rank = B.shape[1]
    S = lowrank_svd(B, A, scale, dtype=dtype, compute_uv=False).S.abs()
    if S.numel() < rank:
        S = torch.cat([S, S.new_zeros(rank - S.numel())])
    return S


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one CPU thread for the duration.

    The per-module problems are tiny ((out + in) x r); OpenMP fork/join costs more than they do, and on a busy
    machine a second thread waiting for a core made QR 100x slower in our measurements.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def idle_threads(limit: int | None = None) -> int:
    """Threads for one large dense problem (merge's TIES/DARE SVDs, extract's): the cores other work leaves idle
    (1-minute load average, less this process), at most ``limit`` (default torch's setting, which honours
    OMP_NUM_THREADS). A thread waiting for a busy core holds up the others at every OpenMP barrier: on a shared
    2-core machine under load, two threads made a 2304 x 768 SVD twice as slow as one."""
    limit = torch.get_num_threads() if limit is None else limit
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)  # this process is one of the runnable tasks
    except (AttributeError, OSError):  # no load average on this platform
        others = 0.0
    return max(1, min(limit, cores - math.floor(others)))
