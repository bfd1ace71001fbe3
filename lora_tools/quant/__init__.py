"""Weight-only symmetric integer quantization: pure ``choose_qparams / quantize / dequantize`` functions.

Conventions (the same for every scheme):

* symmetric, no zero point: ``x ≈ q · scale`` with ``q`` an integer in ``[-qmax, qmax]``, ``qmax = 2^(bits-1) - 1``,
  i.e. int8 in [-127, 127] and int4 in [-7, 7]. The most negative code (-128 / -8) is left unused so that the grid
  is symmetric: ``quantize(-x) == -quantize(x)`` and the largest magnitude of a group lands exactly on ±qmax
  (scale = amax / qmax), never clipped. This costs 1/256 (int8) or 1/16 (int4) of the code space.
* rounding is round-half-to-even (``torch.round``), the IEEE default, which has no bias on ties.
* scales are stored as float16 (2 bytes each) and used *after* rounding to float16, so the dequantized values
  (and hence every measured error) are those a float16-scale storage would really give; values that the rounded
  scale pushes past ±qmax are clamped.
* granularity (`PerTensor`, `PerRow`, `PerGroup`) is a small frozen dataclass; a 2-D weight is (out, in) and
  groups run along the input dimension (the last group of a row may be shorter when in % group_size != 0).

Bytes are counted honestly: ``ceil(numel · bits / 8)`` for the packed codes (two int4 codes per byte) plus
2 bytes per scale.
"""

from lora_tools.quant.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    step_sizes,
)
from lora_tools.quant.schemes import (
    DEFAULT_SCHEMES,
    SCHEME_PATTERNS,
    PerGroup,
    PerRow,
    PerTensor,
    QuantScheme,
    get_scheme,
    num_scales,
    quantized_bytes,
)

__all__ = [
    "DEFAULT_SCHEMES", "SCHEME_PATTERNS", "PerGroup", "PerRow", "PerTensor", "QuantScheme", "choose_qparams",
    "dequantize", "fake_quantize", "get_scheme", "num_scales", "quantize", "quantized_bytes", "step_sizes",
]
