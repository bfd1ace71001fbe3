"""Merge methods by name, each with its paper reference (shown in ``--help`` and written into reports).

The registry is torch-free so that listing the methods costs nothing; the methods themselves live in
``lora_tools.merge.methods`` and register on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_tools.errors import InvalidOptionError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    func: Callable[..., Any]
    reference: str  # the paper (or "exact algebra") the method follows
    exact: bool  # True: no approximation beyond the rank the user asks for
    dense: bool  # True: needs the dense out x in ΔW of each module (streamed one module at a time)
    uses_density: bool
    summary: str


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, reference: str, exact: bool, dense: bool, summary: str,
             uses_density: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func`` as merge method ``name``; a second registration under the same name is a bug."""

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered (by {METHODS[name].func.__qualname__})")
        METHODS[name] = MergeMethod(name, func, reference, exact, dense, uses_density, summary)
        return func

    return decorator


def get_method(name: str) -> MergeMethod:
    import lora_tools.merge.methods  # noqa: F401  (registers the methods)

    if name not in METHODS:
        raise InvalidOptionError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
