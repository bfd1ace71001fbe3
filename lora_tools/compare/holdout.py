"""Enough tokens to fit, and enough to measure: compare-quant refuses to report what it cannot back with data.

Every compared layer sees every token, so one pair of counts (calibration, held-out) decides for all layers, and
the widest layer sets the bar: a covariance C = Σ x xᵀ (in x in) from fewer than ``in`` tokens is rank-deficient.
On the calibration side that makes the activation-aware fit exact on the very tokens it was fitted to (its
in-sample error collapses towards 0 at a rank no larger than the token count); on the held-out side it leaves
most input directions unmeasured. Either way the numbers would say more than the data does, so the run stops
with the counts and a way out. ``--holdout 0`` is the one explicit exception: no held-out split at all, and the
report says "in-sample" wherever it shows an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_tools.errors import InvalidOptionError

HELD_OUT = "held-out"
IN_SAMPLE = "in-sample"


@dataclass(frozen=True)
class TokenCounts:
    """What a run will see: tokens on each side of the split, and where they come from."""

    calibration: int
    held_out: int
    holdout_fraction: float
    source: str  # "random inputs" or the calibration text's path, for the message
    available: int  # tokens the source gave before the split (≤ max_tokens)
    max_tokens: int
    sequences: int | None = None  # None for random inputs (no sequences)

    @property
    def evaluation(self) -> str:
        return IN_SAMPLE if self.holdout_fraction == 0 else HELD_OUT


def check_token_counts(counts: TokenCounts, width: int, widest_layer: str) -> None:
    """Raise ``InvalidOptionError`` (one line, with the numbers and a fix) when either side is below ``width``.

    The held-out side is only checked when a split was asked for (``--holdout`` > 0).
    """
    fraction = counts.holdout_fraction
    short_calib = counts.calibration < width
    short_hold = fraction > 0 and counts.held_out < width
    if not (short_calib or short_hold):
        return
    if fraction > 0:
        found = f"{counts.calibration} calibration tokens and {counts.held_out} held-out tokens"
        needed = f"at least {width} of each"
        # The smaller side of the split decides how many tokens are needed in all.
        total_needed = math.ceil(width / min(fraction, 1.0 - fraction))
    else:
        found = f"{counts.calibration} calibration tokens (--holdout 0: nothing held out)"
        needed = f"at least {width} calibration tokens"
        total_needed = width
    where = [f"--max-tokens {counts.max_tokens}", f"--holdout {fraction:g}"]
    if counts.sequences is not None:
        where.insert(0, f"{counts.sequences} sequence{'s' if counts.sequences != 1 else ''}")
    fixes = _fixes(counts, width, total_needed, short_calib, short_hold)
    raise InvalidOptionError(
        f"{counts.source}: {found} ({', '.join(where)}), but compare-quant needs {needed}: layer {widest_layer} "
        f"takes {width} inputs, and from fewer tokens its input covariance is rank-deficient (the "
        f"activation-aware fit would be exact in-sample, held-out errors would leave input directions unmeasured); "
        f"{' or '.join(fixes)}")


def _fixes(counts: TokenCounts, width: int, total_needed: int, short_calib: bool, short_hold: bool) -> list[str]:
    fraction = counts.holdout_fraction
    fixes = []
    capped = counts.sequences is None or counts.available >= counts.max_tokens
    if counts.available < total_needed or short_calib:
        if capped:
            fixes.append(f"raise --max-tokens to at least {total_needed}")
        else:
            fixes.append(f"pass a longer --calib text (at least {total_needed} tokens; this one has "
                         f"{counts.available})")
    if short_hold and not short_calib and counts.available >= 2 * width:
        # Enough tokens in all: a larger share held out fixes it while keeping the calibration side large enough.
        suggested = min(0.5, math.ceil(20.0 * width / counts.available) / 20.0)
        if suggested > fraction:
            fixes.append(f"a larger --holdout fraction (e.g. --holdout {suggested:g})")
    if short_calib and not short_hold and fraction > 0.5 and counts.available >= 2 * width:
        fixes.append("a smaller --holdout fraction (e.g. --holdout 0.25)")
    if not fixes:
        # Sequence-level split of a few long sequences: a larger share or more text both help.
        fixes.append("a larger --holdout fraction or a longer --calib text")
    if short_hold and not short_calib:
        fixes.append("--holdout 0 for a report labelled in-sample")
    return fixes
