"""Multi-adapter merging: methods registered by name (``registry``), pure tensor methods (``methods``), and the
module-by-module driver with its report (``run``)."""

from __future__ import annotations

from typing import Any

from lora_tools.merge.registry import METHODS, MergeMethod, get_method, register

__all__ = ["METHODS", "MergeMethod", "get_method", "register", "merge_adapters"]


def merge_adapters(*args: Any, **kwargs: Any) -> Any:
    """``lora_tools.merge.run.merge_adapters``, imported on first use (it needs torch; the registry does not)."""
    from lora_tools.merge.run import merge_adapters as run

    return run(*args, **kwargs)
