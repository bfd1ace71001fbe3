"""diffusers' ``lora_adapter_metadata``: the LoraConfig of each component, packed with its prefix.

A pipeline's ``save_lora_weights`` stores one JSON object whose keys carry the component
(``{"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {...}}``, diffusers
loaders/lora_base.py ``_pack_dict_with_prefix``); ``load_lora_weights`` keeps the keys of the component it loads,
strips the prefix and builds ``LoraConfig(**metadata)`` from them (loaders/peft.py). A model's own
``save_lora_adapter`` stores the config without prefixes. Transformer models (Flux, Wan, ...) read their scales
from this metadata only: their loaders ignore ``.alpha`` tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_tools.adapter import Adapter

# Components a diffusers pipeline saves LoRA layers for (the module-name prefixes of its files).
COMPONENTS = ("transformer", "unet", "text_encoder", "text_encoder_2", "prior")


def component_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{component: its LoraConfig dict} of prefixed metadata; {} for an unprefixed config."""
    if "r" in config:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        component, _, field = key.partition(".")
        if field and component in COMPONENTS:
            found.setdefault(component, {})[field] = value
    return found


def packed_metadata(adapter: Adapter) -> dict[str, Any] | None:
    """Prefixed metadata giving every module its exact rank and scale, or None when a module name has no
    component prefix (the unprefixed form is then the only one that fits)."""
    from lora_tools.formats.peft import config_for

    by_component: dict[str, dict[str, Any]] = {}
    for name, module in adapter.modules.items():
        component, _, path = name.partition(".")
        if not path or component not in COMPONENTS:
            return None
        by_component.setdefault(component, {})[path] = dataclasses.replace(module, name=path)
    packed: dict[str, Any] = {}
    for component, modules in sorted(by_component.items()):
        view = dataclasses.replace(adapter, modules=modules)
        config = config_for(view, {"target_modules": sorted(modules), "use_rslora": False, "use_dora": False,
                                   "lora_dropout": 0.0, "lora_bias": False, "init_lora_weights": True})
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return packed
