"""Quantization schemes: granularity as frozen dataclasses, a registry by name, honest byte counts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora_tools.errors import InvalidOptionError

SCALE_BYTES = 2  # float16 scales


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole matrix."""


@dataclass(frozen=True)
class PerRow:
    """One scale per output row ("per channel")."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of ``group_size`` consecutive inputs of a row."""

    group_size: int


Granularity = PerTensor | PerRow | PerGroup


@dataclass(frozen=True)
class QuantScheme:
    """A named weight-only scheme, e.g. ``int4-g128`` = QuantScheme("int4-g128", 4, PerGroup(128))."""

    name: str
    bits: int
    granularity: Granularity

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


_SCHEME = re.compile(r"^int(?P<bits>4|8)-(?:(?P<tensor>tensor)|(?P<channel>channel)|g(?P<group>[0-9]+))$")
SCHEME_PATTERNS = ("int8-tensor", "int8-channel", "int8-gN", "int4-tensor", "int4-channel", "int4-gN")
DEFAULT_SCHEMES = ("int8-tensor", "int8-channel", "int8-g128", "int4-g128", "int4-channel")


def get_scheme(name: str) -> QuantScheme:
    """The scheme registered under ``name`` (``int8-tensor``, ``int8-channel``, ``int8-gN``, ``int4-gN``, ...)."""
    match = _SCHEME.match(name.strip().lower())
    if match is None or (match["group"] is not None and int(match["group"]) <= 0):
        raise InvalidOptionError(f"unknown quantization scheme {name!r}; valid schemes: "
                                 f"{', '.join(SCHEME_PATTERNS)} (N a positive group size, e.g. int4-g128)")
    bits = int(match["bits"])
    if match["tensor"]:
        granularity: Granularity = PerTensor()
    elif match["channel"]:
        granularity = PerRow()
    else:
        granularity = PerGroup(int(match["group"]))
    return QuantScheme(match.group(0), bits, granularity)


def num_scales(shape: tuple[int, int], granularity: Granularity) -> int:
    out, inp = shape
    if isinstance(granularity, PerTensor):
        return 1
    if isinstance(granularity, PerRow):
        return out
    return out * math.ceil(inp / granularity.group_size)


def quantized_bytes(shape: tuple[int, int], scheme: QuantScheme) -> int:
    """Storage of a quantized (out, in) matrix: packed codes plus float16 scales."""
    numel = shape[0] * shape[1]
    return math.ceil(numel * scheme.bits / 8) + SCALE_BYTES * num_scales(shape, scheme.granularity)
