"""Strict JSON for reports and result lines: NaN and Inf (a metric with nothing to measure) become null."""

from __future__ import annotations

import math
from typing import Any


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
