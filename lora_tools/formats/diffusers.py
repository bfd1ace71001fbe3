"""diffusers LoRA files (``pytorch_lora_weights.safetensors``), in the namings diffusers has used:

* ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` (and ``text_encoder.<module>.lora_linear_layer.*``);
* the older attention-processor naming ``<block>.processor.to_q_lora.down.weight`` (``to_out_lora`` is
  ``to_out.0``), usually without a component prefix, and its text-encoder counterpart
  ``text_encoder.<...>.self_attn.to_q_lora.down.weight`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``: the
  mapping diffusers' own loader applied to these files);
* the PEFT-backed naming ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` without an adapter_config.json,
  also ComfyUI's ``diffusion_model.<layer>`` (Flux/Wan in their own layer names) and XLabs' Flux
  ``double_blocks.N.processor.qkv_lora1.down.weight``.

Module names are canonical whatever the naming: the module path behind its component prefix, ``unet.`` for the
processor naming and UNet block paths that have none (``names.canonical_diffusers_name``), so an old and a new file
of one base name a layer alike and merge, compare and convert as such. Writing a diffusers input back keeps the
file's own keys.

Scale: ``network_alpha / rank`` where an ``.alpha`` tensor is stored, else 1 (diffusers' default).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.convert.names import Canonical, canonical_diffusers_name, from_diffusers
from lora_tools.errors import AdapterFormatError
from lora_tools.formats import peft
from lora_tools.formats.common import (
    make_module,
    pair_factors,
    refuse_mixed_schemes,
    refuse_non_lora,
    scalar_value,
    write_safetensors,
)
from lora_tools.formats.diffusers_metadata import component_configs, packed_metadata
from lora_tools.tensorfile import TensorInfo, open_tensor_file

NAME = "diffusers"
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_NEW = re.compile(r"^(?P<module>.+?)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<block>.+?)\.processor\.(?P<proj>[A-Za-z0-9_]+?)_lora\.(?P<role>down|up)\.weight$")
# diffusers <= 0.16 text-encoder keys: LoRA layers patched beside CLIP's projections, named after the UNet's.
_OLD_TEXT = re.compile(r"^(?P<block>.+?\.self_attn)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_OLD_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# XLabs-AI x-flux Flux LoRA: <double|single>_blocks.N.processor.<qkv|proj>_lora[12].<down|up>.weight (optionally
# behind ComfyUI's diffusion_model.); the module keeps its XLabs name (convert/image_models.py maps it).
_XLABS = re.compile(r"^(?:diffusion_model\.)?(?P<module>(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)"
                    r"\.(?P<role>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+?)(?:\.lora|\.lora_linear_layer)?\.alpha$")


def sniff_keys(keys: list[str]) -> bool:
    if any(_NEW.match(k) or _PROCESSOR.match(k) or _OLD_TEXT.match(k) or _XLABS.match(k) for k in keys):
        return True
    # PEFT-named factors without PEFT's base_model.model. prefix (diffusers >= 0.26, ComfyUI/ai-toolkit exports)
    return any(".lora_A." in k or ".lora_B." in k or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def module_name_of(key: str) -> tuple[str, str] | None:
    """(canonical module name, 'down'|'up') for a diffusers factor key: processor names mapped to module paths,
    the component prefix added where the key has none."""
    if match := _XLABS.match(key):
        return match["module"], match["role"]
    if match := _PROCESSOR.match(key):
        proj = match["proj"]
        proj = "to_out.0" if proj == "to_out" else proj
        return canonical_diffusers_name(f"{match['block']}.{proj}", "unet"), match["role"]
    if match := _OLD_TEXT.match(key):
        return canonical_diffusers_name(f"{match['block']}.{_OLD_TEXT_PROJ[match['proj']]}", "te"), match["role"]
    if match := _NEW.match(key):
        return canonical_diffusers_name(match["module"]), match["role"]
    return None


def read(path: Path) -> Adapter:
    if path.is_dir():
        candidates = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
        if not candidates:
            raise AdapterFormatError(f"{path}: no {' or '.join(WEIGHT_NAMES)} in this folder")
        path = candidates[0]
    source = open_tensor_file(path)
    infos = source.infos()
    refuse_non_lora(path, infos)
    warnings: list[str] = []
    if any(".lora_A." in k or ".lora_B." in k for k in infos):
        return _read_peft_style(path, source, warnings)
    downs: dict[str, TensorInfo] = {}
    ups: dict[str, TensorInfo] = {}
    alphas: dict[str, TensorInfo] = {}
    extras: list[TensorInfo] = []
    # (role, layer) -> key: one layer under two namings (processor and module path, with or without a component
    # prefix) is caught even where the names differ (an unprefixed path that is no known UNet block).
    claimed: dict[tuple[str, Canonical], str] = {}
    for key, info in infos.items():
        found = module_name_of(key)
        if found:
            module, role = found
            layer = (role, from_diffusers(module))
            if layer in claimed:
                raise AdapterFormatError(f"{path}: module {module} appears twice ({claimed[layer]!r} and "
                                         f"{key!r}): two naming schemes in one file")
            claimed[layer] = key
            (downs if role == "down" else ups)[module] = info
        elif (match := _ALPHA.match(key)) and info.numel == 1:
            alphas[canonical_diffusers_name(match["module"])] = info
        else:
            extras.append(info)
    if not downs and not ups:
        raise AdapterFormatError(f"{path}: no diffusers LoRA tensors (*.lora.down.weight / *.lora.up.weight)")
    refuse_mixed_schemes(path, extras, "diffusers")
    modules: dict[str, LoraModule] = {}
    for name in sorted(pair_factors(path, downs, ups, "down", "up"), key=peft.natural_key):
        rank = downs[name].shape[0] if downs[name].shape else 0
        alpha_info = alphas.get(name)
        alpha = scalar_value(path, alpha_info.key, source.get(alpha_info.key)) if alpha_info else float(rank)
        modules[name] = make_module(path, name, downs[name], ups[name], alpha=alpha,
                                    scale=alpha / rank if rank else 0.0,
                                    alpha_key=alpha_info.key if alpha_info else None)
    rule = "network_alpha/rank" if alphas else "1 (diffusers, no network_alpha stored)"
    return Adapter(path=path, format=NAME, modules=modules, source=source, metadata=source.metadata,
                   extra_tensors=extras, warnings=warnings, scale_rule=rule, weights_path=path)


def _read_peft_style(path: Path, source: object, warnings: list[str]) -> Adapter:
    """PEFT-named factors with a component prefix; alphas from diffusers' ``lora_adapter_metadata`` if saved."""
    groups, extras = peft.parse_lora_keys(path, source.infos(), prefix="")  # type: ignore[attr-defined]
    config: dict = {}
    raw = source.metadata.get("lora_adapter_metadata")  # type: ignore[attr-defined]
    if raw:
        try:
            parsed = json.loads(raw)
            config = parsed if isinstance(parsed, dict) else {}
        except json.JSONDecodeError:
            warnings.append(f"{path}: lora_adapter_metadata is not valid JSON; ignored")
    rule = peft.ScaleRule(config, path, []) if config.get("r") else None
    # Some exporters store kohya-style scalar alphas beside PEFT-named factors: "<module>.alpha".
    alphas = {info.key[: -len(".alpha")]: info for info in extras
              if info.key.endswith(".alpha") and info.numel == 1 and info.key[: -len(".alpha")] in groups}
    extras = [info for info in extras if info.key[: -len(".alpha")] not in alphas]
    per_component = component_configs(config)
    if per_component:  # a pipeline's save_lora_weights: one config per component, keys prefixed
        modules = {}
        for component, sub in per_component.items():
            part = {n: g for n, g in groups.items() if n.startswith(component + ".")}
            sub_rule = peft.ScaleRule(sub, f"{path} ({component})", []) if sub.get("r") else None
            rule = rule or sub_rule
            modules.update(peft.build_modules(path, part, sub_rule, bool(sub.get("fan_in_fan_out")), warnings))
        rest = {n: g for n, g in groups.items() if n not in modules}
        modules.update(peft.build_modules(path, rest, None, None, warnings) if rest else {})
    else:
        modules = peft.build_modules(path, groups, rule, bool(config.get("fan_in_fan_out")), warnings)
    for name, info in alphas.items():
        module = modules[name]
        module.alpha = scalar_value(path, info.key, source.get(info.key))  # type: ignore[attr-defined]
        module.scale = module.alpha / module.rank
        module.alpha_key = info.key
    if alphas:
        rule_text = "alpha/rank (stored .alpha)"
    else:
        rule_text = rule.description if rule else "1 (no lora_alpha stored)"
    return Adapter(path=path, format=NAME, modules=modules, source=source,  # type: ignore[arg-type]
                   config=config, metadata=source.metadata, extra_tensors=extras,  # type: ignore[attr-defined]
                   warnings=warnings, scale_rule=rule_text, weights_path=path)


# --- writing -------------------------------------------------------------------------------------------------


def write(adapter: Adapter, path: Path, *, force: bool = False) -> Path:
    """Write ``adapter`` as one diffusers LoRA safetensors file, atomically.

    A diffusers input keeps its own key naming (factors, ``.alpha`` tensors and everything else under their
    keys); for the PEFT-backed naming the ranks/alphas in ``lora_adapter_metadata`` are rewritten with exact
    per-module patterns (per component, prefixed, unless the file held a model's unprefixed config). Other inputs
    are written in the ``<module>.lora.down.weight`` naming, under each module's canonical diffusers name
    (``unet.<path>``, kohya names resolved as ``convert`` does), with an ``<module>.alpha`` on every module once
    one scale is not 1 (diffusers' network_alpha / rank; its loader gives a module without one the file's most
    common alpha).
    """
    import torch

    from lora_tools.atomic import atomic_path

    metadata = dict(adapter.metadata)
    if adapter.format == NAME:
        tensors = {key: adapter.source.get(key) for key in adapter.source.infos()}
        raw = metadata.get("lora_adapter_metadata")
        if any(".lora_A." in m.a_info.key for m in adapter.modules.values()):
            # the form the file had: a model's unprefixed config, else a pipeline's prefixed one (what
            # load_lora_weights reads; transformer models such as Flux and Wan take their scales from it only)
            packed = None if raw and not component_configs(adapter.config) else packed_metadata(adapter)
            if packed is not None:
                metadata["lora_adapter_metadata"] = json.dumps(packed)
                raw = metadata["lora_adapter_metadata"]
            elif raw:
                metadata["lora_adapter_metadata"] = json.dumps(peft.config_for(adapter, adapter.config))
        missing = [m.name for m in adapter.modules.values()
                   if abs(m.scale - 1.0) > 1e-12 and not m.alpha_key and not raw]
        if missing:
            scale = adapter.modules[missing[0]].scale
            raise AdapterFormatError(f"{adapter.path}: module {missing[0]} has scale {scale:g} but the file has no "
                                     "alpha tensor or config to hold it; write --to peft instead")
    else:
        from lora_tools.convert.run import foreign_names  # convert.run imports the format registry

        # The canonical diffusers name of each module (unet.<path>, text_encoder.<path>), kohya names resolved.
        out_names = foreign_names(adapter, NAME)
        # diffusers' loader gives a module without .alpha the file's most common alpha, not scale 1
        # (loaders/peft get_peft_kwargs): once one module needs an alpha, every module gets one.
        every_alpha = any(abs(m.scale - 1.0) > 1e-12 for m in adapter.modules.values())
        # transformer models (Flux, Wan, ...): PEFT-named factors, scales in the prefixed lora_adapter_metadata,
        # since diffusers' loaders for them ignore .alpha tensors
        peft_named = any(out.startswith("transformer.") for out in out_names.values())
        tensors = {}
        for name, module in adapter.modules.items():
            if module.kind not in ("linear", "conv") or module.bias_key or module.magnitude_key:
                raise AdapterFormatError(
                    f"{adapter.path}: module {name} ({module.kind}{', bias' if module.bias_key else ''}"
                    f"{', DoRA' if module.magnitude_key else ''}) cannot be written in diffusers' LoRA naming; "
                    "write --to peft instead")
            out = out_names[name]
            down, up = ("lora_A", "lora_B") if peft_named else ("lora.down", "lora.up")
            tensors[f"{out}.{down}.weight"] = adapter.source.get(module.a_info.key)
            tensors[f"{out}.{up}.weight"] = adapter.source.get(module.b_info.key)
            if every_alpha and not peft_named:
                tensors[f"{out}.alpha"] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
        for info in adapter.extra_tensors:
            tensors[info.key] = adapter.source.get(info.key)
        if peft_named:
            renamed = {out_names[n]: dataclasses.replace(m, name=out_names[n]) for n, m in adapter.modules.items()}
            packed = packed_metadata(dataclasses.replace(adapter, modules=renamed))
            if packed is None:
                raise AdapterFormatError(f"{adapter.path}: modules without a diffusers component prefix cannot be "
                                         "written beside transformer modules; write --to peft instead")
            metadata["lora_adapter_metadata"] = json.dumps(packed)
    with atomic_path(path, force) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return path
