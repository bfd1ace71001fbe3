"""loratools: inspect, truncate, compare, merge and convert LoRA adapters — exactly, and without the base model
where none is needed.

Heavy imports (torch, safetensors) happen on first use, so ``loratools --help`` stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_adapter": ("lora_tools.formats", "load_adapter"),
    "save_adapter": ("lora_tools.formats", "save_adapter"),
    "truncate": ("lora_tools.truncate", "truncate"),
    "detect": ("lora_tools.formats", "detect"),
    "Adapter": ("lora_tools.adapter", "Adapter"),
    "LoraModule": ("lora_tools.adapter", "LoraModule"),
    "lowrank_svd": ("lora_tools.linalg", "lowrank_svd"),
    "singular_values": ("lora_tools.linalg", "singular_values"),
    "spectrum_metrics": ("lora_tools.linalg", "spectrum_metrics"),
    "inspect_adapter": ("lora_tools.analysis", "inspect_adapter"),
    "example_adapter_path": ("lora_tools.data", "example_adapter_path"),
    "merge_adapters": ("lora_tools.merge.run", "merge_adapters"),
    "similarity": ("lora_tools.similarity", "similarity"),
    "convert": ("lora_tools.convert.run", "convert"),
    "fold": ("lora_tools.fold", "fold"),
    "extract": ("lora_tools.extract", "extract"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
