"""Output-error metrics: exact ones from C = X Xᵀ, per-token ones streamed batch by batch in bounded memory.

For a weight error E (out, in) and inputs X (in, T), ‖E X‖_F² = tr(E C Eᵀ) with C = X Xᵀ: every Frobenius error
(and the global cosine) comes from the accumulated C alone, calibration and held-out alike. Statistics that need
individual tokens (worst-token cosine, per-token percentiles, max abs entry, kurtosis) are streamed by
``OutputErrorStats``: running sums, running extrema and fixed log-spaced histograms, so memory does not grow with
the number of tokens (percentiles are read off the histogram, ~1% resolution).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_tools.compare.blocked import row_blocks
from lora_tools.compare.methods import Approximation, Target

# Per-token relative error ‖Δy_t‖ / ‖y_t‖: 10^-8 .. 10^4 in 2400 bins (0.005 decades ≈ 1.2% per bin).
TOKEN_LOG_RANGE = (-8.0, 4.0)
TOKEN_BINS = 2400
# |ΔY entries| / rms(Y entries) for the histogram plot: 10^-8 .. 10^2.
ENTRY_LOG_RANGE = (-8.0, 2.0)
ENTRY_BINS = 200
# Entry errors are first counted by their float32 bit patterns (metrics._entry_bins): 64 bins per octave.
RAW_SHIFT = 17


class EnergyContext:
    """Per layer and per C: what every method's energies share, computed once.

    For a factored target ΔW = s·B·A, the right factors of ``svd`` and ``svd-act`` lie in the row space of A, so
    with Aᵀ = Q R (Q: (in, r)) everything about them reduces to the r x r matrix Q_ᵀ C Q; quantized factors A_q
    leave that space and need one (r, in) @ (in, in) product each. A dense target's methods are measured together
    in one pass over blocks of W's rows (``measure``): each block's W C rows are shared by all of them and dropped,
    so neither W C nor a float64 copy of W is held (92 MB each for a 2048 x 5632 layer).
    """

    def __init__(self, target: Target, C: torch.Tensor, W: torch.Tensor | None) -> None:
        self.target = target
        self.C = C.to(torch.float64)
        self.W = W  # the dense map as stored (float32), read in row blocks
        self._y: float | None = None
        if target.factored:
            self.sB = target.scale * target.B.to(torch.float64)  # (out, r)
            self.A = target.A.to(torch.float64)  # (r, in)
            self.Q, _ = torch.linalg.qr(self.A.T)  # (in, r)
            self.C_q = self.Q.T @ self.C @ self.Q  # (r, r)
            self.AC = self.A @ self.C  # (r, in)
            self.G_a = self.AC @ self.A.T  # (r, r)
            self._y = float(((self.sB @ self.G_a) * self.sB).sum())

    @property
    def y(self) -> float:
        """‖W X‖² (a dense target's comes with ``measure``; alone it costs one pass over W)."""
        if self._y is None:
            self.measure([])
        return self._y  # type: ignore[return-value]

    @torch.no_grad()
    def measure(self, approximations: list[Approximation]) -> list[tuple[float, float, float]]:
        """(‖E X‖², ‖Ŵ X‖², <W X, Ŵ X>) in float64 for each approximation Ŵ, E = Ŵ − W (a dense target's all in
        one pass over W)."""
        if self.target.factored:
            return [self._factored(approx) for approx in approximations]
        f64 = torch.float64
        W, C = self.W, self.C
        # Per low-rank approximation Ŵ = s·L R: ‖Ŵ X‖² = s² tr(L (R C Rᵀ) Lᵀ), from the (k, k) R C Rᵀ.
        rights, grams = {}, {}
        for i, approx in enumerate(approximations):
            if approx.weight is None:
                right = rights[i] = approx.right.to(f64)  # (k, in)
                grams[i] = torch.cat([(right[part] @ C) @ right.T for part in row_blocks(right.shape[0])])
        y = 0.0
        err = [0.0] * len(approximations)
        y_hat = [0.0] * len(approximations)
        inner = [0.0] * len(approximations)
        for rows in row_blocks(W.shape[0]):  # float64 temporaries of a few rows, not (out, in)
            W_rows = W[rows].to(f64)
            WC_rows = W_rows @ C  # (b, in)
            y += float((WC_rows * W_rows).sum())
            for i, approx in enumerate(approximations):
                if approx.weight is not None:  # dense rounding
                    W_hat = approx.weight[rows].to(f64)
                    E = W_hat - W_rows
                    err[i] += float(((E @ C) * E).sum())
                    inner[i] += float((WC_rows * W_hat).sum())
                else:
                    left = approx.scale * approx.left[rows].to(f64)  # (b, k)
                    inner[i] += float(((WC_rows @ rights[i].T) * left).sum())
                    y_hat[i] += float(((left @ grams[i]) * left).sum())
        self._y = y
        results = []
        for i, approx in enumerate(approximations):
            if approx.weight is not None:
                results.append((err[i], err[i] - y + 2 * inner[i], inner[i]))
            else:
                results.append((max(y + y_hat[i] - 2 * inner[i], 0.0), y_hat[i], inner[i]))
        return results

    def _factored(self, approx: Approximation) -> tuple[float, float, float]:
        left = approx.scale * approx.left.to(torch.float64)  # (out, k)
        right = approx.right.to(torch.float64)  # (k, in)
        k = right.shape[0]
        if approx.steps:  # quantized factors: A_q is outside A's row space
            RC = right @ self.C  # (k, in)
            G = torch.cat([torch.cat([RC @ right.T, RC @ self.A.T], dim=1),
                           torch.cat([self.AC @ right.T, self.G_a], dim=1)], dim=0)  # (k + r, k + r)
        else:
            P = torch.cat([right @ self.Q, self.A @ self.Q], dim=0)  # (k + r, r) coordinates in the basis Q
            G = P @ self.C_q @ P.T
        L = torch.cat([left, -self.sB], dim=1)  # (out, k + r): E = L [right; A]
        err = float(((L @ G) * L).sum())
        y_hat = float(((left @ G[:k, :k]) * left).sum())
        return err, y_hat, (self.y + y_hat - err) / 2


def snr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def rel_error(signal: float, noise: float) -> float:
    return math.sqrt(max(noise, 0.0) / signal) if signal > 0 else math.nan


@torch.no_grad()
def approximation_error_structure(target: Target, approx: Approximation, W: torch.Tensor) -> tuple[float, float]:
    """(stable rank ‖E‖_F²/σ_1², top-1 energy share σ_1²/‖E‖_F²) of the weight error E = Ŵ − W (out, in).

    The two are reciprocals; both are reported because each reads naturally ("noise spread over ~300 directions"
    vs "one direction holds 40% of the error"). The σ² come from the method when it knows them (a truncated
    SVD), as exact singular values from the factors when both are low rank, else as the eigenvalues of E's
    smaller Gram matrix, which is cheaper than an SVD and exact enough for the largest one."""
    if approx.error_sigma_sq is not None:
        return _structure_from_sigma_sq(approx.error_sigma_sq)
    if approx.weight is None and target.factored:
        from lora_tools.linalg import lowrank_svd

        L = torch.cat([approx.scale * approx.left.to(torch.float64),
                       -target.scale * target.B.to(torch.float64)], dim=1)
        R = torch.cat([approx.right.to(torch.float64), target.A.to(torch.float64)], dim=0)
        S = lowrank_svd(L, R, compute_uv=False).S
        return _structure_from_sigma_sq(S.square())
    # A dense target: E's Gram matrix summed over blocks of E, never the whole float64 E (nor Ŵ).
    out, inp = W.shape
    gram = torch.zeros(min(out, inp), min(out, inp), dtype=torch.float64, device=W.device)
    for part in row_blocks(out if out > inp else inp):
        if out > inp:  # Eᵀ E = Σ over row blocks
            E = _dense_block(approx, part, slice(None), W.device) - W[part].to(torch.float64)
            gram.addmm_(E.T, E)
        else:  # E Eᵀ = Σ over column blocks
            E = _dense_block(approx, slice(None), part, W.device) - W[:, part].to(torch.float64)
            gram.addmm_(E, E.T)
    return _structure_from_sigma_sq(torch.linalg.eigvalsh(gram).clamp_min(0))


def _dense_block(approx: Approximation, rows: slice, cols: slice, device: Any) -> torch.Tensor:
    """Ŵ[rows, cols] in float64 on ``device``, from the dense matrix or the factors (s · L[rows] @ R[:, cols])."""
    if approx.weight is not None:
        return approx.weight[rows, cols].to(device, torch.float64)
    left, right = approx.left[rows].to(device, torch.float64), approx.right[:, cols].to(device, torch.float64)
    return approx.scale * (left @ right)


def _structure_from_sigma_sq(sigma_sq: torch.Tensor) -> tuple[float, float]:
    total = float(sigma_sq.clamp_min(0).sum())
    top = float(sigma_sq.max()) if sigma_sq.numel() else 0.0
    if total <= 0 or top <= 0:
        return 0.0, math.nan
    return total / top, top / total


@torch.no_grad()
def uniform_noise_prediction(approx: Approximation, target: Target, C: torch.Tensor) -> float | None:
    """Predicted ‖E X‖² if every rounding error were independent, uniform on ±step/2 (variance step²/12).

    This is Widrow's classical additive-noise model of a uniform quantizer (Widrow, 1956; Widrow & Kollár,
    "Quantization Noise", 2008). For a dense W_q = W + N: E‖N X‖² = Σ_o Σ_j step_oj²/12 · C_jj.
    For quantized factors, s·B_q·A_q − s·B·A ≈ s·(N_B A + B N_A) to first order, whose expectation is
    s² [Σ_o Σ_i stepB_oi²/12 · (A C Aᵀ)_ii + Σ_i (Σ_j stepA_ij²/12 · C_jj) · ‖B_:i‖²]; the N_B N_A term is
    second order and dropped. Returns None for methods that do not round.
    """
    if not approx.steps:
        return None
    C = C.to(torch.float64)
    diag = torch.diagonal(C)  # (in,)
    if "W" in approx.steps:
        step = approx.steps["W"]
        return sum(float((step[rows].to(torch.float64).square() @ diag).sum())
                   for rows in row_blocks(step.shape[0])) / 12.0
    B = target.B.to(torch.float64)
    A = target.A.to(torch.float64)
    step_B = approx.steps["B"].to(torch.float64)  # (out, r)
    step_A = approx.steps["A"].to(torch.float64)  # (r, in)
    G_diag = torch.einsum("ij,jk,ik->i", A, C, A)  # (r,): (A C Aᵀ)_ii
    from_B = float((step_B.square() @ G_diag).sum()) / 12.0
    from_A = float(((step_A.square() @ diag) * B.square().sum(dim=0)).sum()) / 12.0
    return target.scale ** 2 * (from_B + from_A)


class OutputErrorStats:
    """Streaming statistics of ΔY = Ŷ − Y on held-out tokens, on the device the batches arrive on."""

    def __init__(self, device: Any, entry_rms: float, entry_histogram: bool = True) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.entry_rms = entry_rms if entry_rms > 0 else 1.0
        self.tokens = 0
        self.power_sums = torch.zeros(5, **f64)  # n, Σe, Σe², Σe³, Σe⁴ over entries of ΔY
        self.max_abs = torch.zeros((), **f64)
        self.min_cos = torch.full((), math.inf, **f64)
        self.token_max = torch.zeros((), **f64)
        self.token_hist = torch.zeros(TOKEN_BINS, **f64)
        # The entry histogram is the costliest statistic (one bin per output entry): only kept for the methods
        # that are plotted, and counted on the float32 bit patterns (see _entry_bins).
        self._raw_first, raw_count = _raw_range(self.entry_rms)
        self._entry_raw = torch.zeros(raw_count, dtype=torch.int64, device=device) if entry_histogram else None

    @torch.no_grad()
    def update(self, y: torch.Tensor, dy: torch.Tensor, y_sq: torch.Tensor | None = None) -> None:
        """Add a batch: y (T, out) the target outputs, dy (T, out) the errors.

        Entry-wise work runs in float32 (it dominates the cost): row sums over one token's ≤ out entries are
        float32, everything summed across tokens is float64, so the rounding does not grow with the number of
        tokens. The cosine is formed from ‖y‖², <y, Δy> and ‖Δy‖² per token, so ŷ = y + Δy is never
        materialised and 1 − cos stays accurate when Δy is tiny. Callers pass a few hundred tokens at a time:
        the temporaries then stay in cache, and freed blocks of one size are reused instead of fragmenting the
        heap (whole 4k-token batches grew compare-quant's resident memory on SmolLM2 from 3.6 to 12.6 GB).
        """
        if dy.shape[0] == 0:
            return
        self.tokens += dy.shape[0]
        dy32 = dy.to(torch.float32)
        y32 = y.to(torch.float32)
        y_sq = y32.square().sum(dim=1).double() if y_sq is None else y_sq  # (T,)
        e2 = dy32.square()
        err_sq = e2.sum(dim=1).double()  # (T,)
        cross = torch.linalg.vecdot(y32, dy32, dim=1).double()  # (T,)
        self.power_sums += torch.stack([
            torch.tensor(float(dy.numel()), dtype=torch.float64, device=dy.device),
            dy32.sum(dim=1).double().sum(), err_sq.sum(), torch.linalg.vecdot(e2, dy32, dim=1).double().sum(),
            torch.linalg.vecdot(e2, e2, dim=1).double().sum()])
        low, high = torch.aminmax(dy32)
        self.max_abs = torch.maximum(self.max_abs, torch.maximum(-low, high).to(torch.float64))
        tiny = torch.finfo(torch.float64).tiny
        y_hat_sq = (y_sq + 2 * cross + err_sq).clamp_min(0)
        denominator = (y_sq * y_hat_sq).sqrt()
        # A token whose approximated output vanishes (ŷ ≈ 0, e.g. at rank 1) has cosine 0, not ±rounding/tiny.
        cos = torch.where(denominator > 1e-12 * y_sq, (y_sq + cross) / denominator.clamp_min(tiny),
                          torch.zeros_like(y_sq)).clamp(-1.0, 1.0)
        self.min_cos = torch.minimum(self.min_cos, cos.min())
        token_err = (err_sq / y_sq.clamp_min(tiny)).sqrt()
        self.token_max = torch.maximum(self.token_max, token_err.max())
        self.token_hist += _log_hist(token_err, TOKEN_BINS, TOKEN_LOG_RANGE)
        if self._entry_raw is not None:
            self._entry_raw += _entry_bins(dy32, self._raw_first, self._entry_raw.numel())

    @property
    def entry_hist(self) -> torch.Tensor | None:
        """Counts of |ΔY entry| / rms(Y entry) in the ENTRY_BINS log-spaced bins of entry_histogram_edges()."""
        if self._entry_raw is None:
            return None
        return _rebin_raw(self._entry_raw.cpu(), self._raw_first, self.entry_rms)

    def percentile(self, q: float) -> float:
        """The q-quantile (0..1) of the per-token relative error, from the histogram (log-interpolated)."""
        return _hist_quantile(self.token_hist, q, TOKEN_LOG_RANGE, float(self.token_max))

    def kurtosis(self) -> float:
        """Excess kurtosis of the entries of ΔY (0 for Gaussian, -1.2 for uniform, large for spiky errors)."""
        n, s1, s2, s3, s4 = (float(v) for v in self.power_sums)
        if n == 0:
            return math.nan
        mean = s1 / n
        m2 = s2 / n - mean ** 2
        m4 = s4 / n - 4 * mean * s3 / n + 6 * mean ** 2 * s2 / n - 3 * mean ** 4
        if m2 <= 0:
            return math.nan
        return m4 / m2 ** 2 - 3.0

    def summary(self) -> dict[str, float]:
        if self.tokens == 0:
            nan = math.nan
            return {"worst_token_cosine": nan, "max_abs_error": nan, "token_error_p50": nan,
                    "token_error_p99": nan, "token_error_max": nan, "kurtosis": nan}
        return {
            "worst_token_cosine": float(self.min_cos),
            "max_abs_error": float(self.max_abs),
            "token_error_p50": self.percentile(0.50),
            "token_error_p99": self.percentile(0.99),
            "token_error_max": float(self.token_max),
            "kurtosis": self.kurtosis(),
        }


def _log_hist(values: torch.Tensor, bins: int, log_range: tuple[float, float]) -> torch.Tensor:
    """Counts of log10(values) in ``bins`` equal bins over ``log_range`` (out-of-range values go to the ends)."""
    low, high = log_range
    # One float32 pass per step, in place on a fresh tensor (this runs over every entry of every approximation's
    # ΔY on held-out batches: an int64 index array and bincount cost twice as much); histc puts the clamped
    # ends in the first and last bins.
    logs = values.to(torch.float32).clamp(min=10.0 ** low).log10_().clamp_(low, high)
    return torch.histc(logs, bins=bins, min=low, max=high).to(torch.float64)


def _pattern_bin(value: float) -> int:
    """The raw bin (bit pattern >> RAW_SHIFT) of a positive float32 value, capped at the largest finite one."""
    value = min(max(value, 0.0), float(torch.finfo(torch.float32).max))
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32)) >> RAW_SHIFT


def _raw_range(unit: float) -> tuple[int, int]:
    """(first raw bin, number of raw bins) covering ENTRY_LOG_RANGE of value/unit, with one more bin at each
    end that lies wholly outside it: entries clamped into those land in the first / last coarse bin."""
    low, high = ENTRY_LOG_RANGE
    first = max(_pattern_bin(10.0 ** low * unit) - 1, 0)
    last = _pattern_bin(10.0 ** high * unit) + 1
    return first, last - first + 1


def _entry_bins(dy: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Counts of |dy| (float32) by their bit patterns: sign dropped, exponent and the leading 6 mantissa bits
    kept, so raw bin i holds [v_i, v_(i+1)) with v_i the float whose bits are i << RAW_SHIFT (64 bins per
    octave, 0.0047 decades), shifted by ``first`` and clamped to ``count`` bins. Integer ops and one bincount:
    4-5x faster than log10 + histc over every entry, which was most of compare-quant's held-out pass."""
    bits = dy.contiguous().view(torch.int32).bitwise_and(0x7FFFFFFF).bitwise_right_shift_(RAW_SHIFT)
    return torch.bincount(bits.sub_(first).clamp_(0, count - 1).flatten(), minlength=count)


def _rebin_raw(raw: torch.Tensor, first: int, unit: float) -> torch.Tensor:
    """Raw bit-pattern counts -> ENTRY_BINS log10 bins of value/unit over ENTRY_LOG_RANGE (ends clamped). A raw
    bin that straddles a coarse edge is split in proportion to its log-width on each side."""
    patterns = (torch.arange(first, first + raw.numel() + 1, dtype=torch.int64) << RAW_SHIFT)
    finite = 0x7F800000  # the first non-finite pattern: the top bin's upper edge is taken as float32's max
    values = patterns.clamp_max(finite - 1).to(torch.int32).view(torch.float32).to(torch.float64)
    edges = values.clamp_min(1e-300).log10() - math.log10(unit)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(raw.to(torch.float64), 0)])
    low, high = ENTRY_LOG_RANGE
    wanted = torch.linspace(low, high, ENTRY_BINS + 1, dtype=torch.float64)
    at = _interp(wanted, edges, cdf)
    counts = at.diff()
    counts[0] += at[0]  # below the range: first bin
    counts[-1] += cdf[-1] - at[-1]  # above: last bin
    return counts


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x; xp non-decreasing (flat runs allowed), ends clamped."""
    import numpy as np

    keep = torch.cat([xp[1:] > xp[:-1], torch.tensor([True])])  # a flat run keeps its last (largest) cdf
    return torch.from_numpy(np.interp(x.numpy(), xp[keep].numpy(), fp[keep].numpy()))


def _hist_quantile(hist: torch.Tensor, q: float, log_range: tuple[float, float], maximum: float) -> float:
    total = float(hist.sum())
    if total == 0:
        return math.nan
    cumulative = torch.cumsum(hist, 0).cpu()
    wanted = q * total
    index = int(torch.searchsorted(cumulative, torch.tensor(wanted, dtype=torch.float64)))
    index = min(index, hist.numel() - 1)
    before = float(cumulative[index - 1]) if index > 0 else 0.0
    inside = float(hist[index])
    fraction = (wanted - before) / inside if inside > 0 else 0.0
    low, high = log_range
    width = (high - low) / hist.numel()
    return min(10.0 ** (low + (index + fraction) * width), maximum)


def entry_histogram_edges() -> list[float]:
    """Bin edges (in units of rms(Y)) of ``OutputErrorStats.entry_hist``."""
    low, high = ENTRY_LOG_RANGE
    return [10.0 ** (low + i * (high - low) / ENTRY_BINS) for i in range(ENTRY_BINS + 1)]
