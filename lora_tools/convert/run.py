"""Convert an adapter between PEFT, kohya and diffusers without changing a single factor, and prove it.

A conversion renames tensors and re-expresses each module's scale in the target's terms (PEFT: r/lora_alpha with
exact rank/alpha patterns; kohya: one ``.alpha`` per module, scale·rank; diffusers: an ``.alpha`` where the scale
is not 1). Factors are copied as stored, dtype included. Before anything reaches OUT, the output is written to a
staging path beside it, read back with the target format's own reader and compared module by module with the
input: factors bit for bit, scales exactly or to a reported relative difference (a float32 ``.alpha`` cannot hold
every rsLoRA scale). Only a verified output is moved into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.builder import AdapterBuilder, factor_keys
from lora_tools.convert.align import aligned_keys, alignment_keys  # noqa: F401 (callers import them from here)
from lora_tools.convert.group_factors import build_group, group_mapping
from lora_tools.convert.image_plan import LayerGroup, LayerPlan, plan_layers
from lora_tools.convert.names import (
    COMFY_PREFIX,
    META_PEFT_CONFIG,
    Canonical,
    NameIndex,
    base_index,
    builtin_index,
    from_diffusers,
    from_peft,
    natural_sort,
    parse_prefix,
    provenance_metadata,
    recorded_names,
    split_kohya,
    to_diffusers,
    to_kohya,
)
from lora_tools.convert.verify import MAX_REL_DIFFERENCE, VerificationError, check_finite, verify  # noqa: F401 (callers import them from here)
from lora_tools.errors import InvalidOptionError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats import FORMATS, peft

TARGETS = ("peft", "kohya", "diffusers")


class UnresolvedNamesError(ModuleMismatchError):
    """kohya module names that match no real module of the base model."""


@dataclass
class ConvertPlan:
    adapter: Adapter  # the output, in memory
    mapping: dict[str, str]  # input module name -> output module name
    name_source: str
    warnings: list[str] = field(default_factory=list)
    # image models: fused <-> split layers and row swaps (convert/image_plan.py), beside the 1:1 ``mapping``
    groups: list[LayerGroup] = field(default_factory=list)


_CONVERT_HINT = ("pass --base MODEL (the base model's folder or a safetensors file of its weights), or "
                 "--allow-partial to drop them")


def canonical_names(adapter: Adapter, *, base: Path | None, prefix: str | None, allow_partial: bool,
                    hint: str = _CONVERT_HINT) -> tuple[dict[str, Canonical], str, list[str]]:
    """Canonical (component, path) of every module; kohya names are resolved (unresolvable ones dropped only with
    ``allow_partial``, else refused with the list and ``hint``)."""
    warnings: list[str] = []
    if adapter.format == "peft":
        return {n: from_peft(n, prefix) for n in adapter.modules}, "PEFT module paths", warnings
    if adapter.format == "diffusers":
        return {n: from_diffusers(n) for n in adapter.modules}, "diffusers module paths", warnings
    if adapter.format == "gguf":  # module names already mapped back from GGUF tensor names by the reader
        return {n: from_peft(n, prefix) for n in adapter.modules}, "GGUF tensor names (gguf name map)", warnings
    if adapter.format != "kohya":
        first = next(iter(adapter.modules), "?")
        raise UnsupportedAdapterError(
            f"{adapter.path}: {adapter.format} modules are identified by their order in the model only (e.g. "
            f"{first}), not by layer name, so they cannot be converted to named formats")
    recorded, source_format = recorded_names(adapter.metadata)
    index: NameIndex | None = None
    result: dict[str, Canonical] = {}
    unresolved: list[str] = []
    sources: set[str] = set()
    for name in adapter.modules:
        component, flat = split_kohya(name)
        if name.startswith(COMFY_PREFIX):  # ComfyUI keeps the layer's dots: nothing to resolve
            result[name] = Canonical("unet", name[len(COMFY_PREFIX):])
            sources.add("ComfyUI layer names")
            continue
        if name in recorded:
            original = recorded[name]
            result[name] = from_diffusers(original) if source_format == "diffusers" else \
                Canonical(component, original)
            sources.add("names recorded by loratools in the file's metadata")
            continue
        if index is None:
            index = base_index(base) if base is not None else builtin_index()
        path, why = index.resolve(component, flat)
        if path is None:
            unresolved.append(f"{name} ({why})")
            continue
        result[name] = Canonical(component, path)
        sources.add(index.source)
    if unresolved:
        shown = "; ".join(unresolved[:5]) + (f"; ... (+{len(unresolved) - 5} more)" if len(unresolved) > 5 else "")
        where = f"--base {base}" if base is not None else "the built-in SD UNet / CLIP key lists"
        if not allow_partial:
            raise UnresolvedNamesError(
                f"{adapter.path}: {len(unresolved)} of {len(adapter.modules)} kohya module name(s) match no module "
                f"of {where}: {shown}; {hint}")
        warnings.append(f"{len(unresolved)} module(s) dropped (--allow-partial), names not resolved: {shown}")
    return result, " + ".join(sorted(sources)) or "none", warnings


def output_names(canonical: dict[str, Canonical], to: str, prefix: str | None,
                 adapter: Adapter, keep_names: bool = True) -> dict[str, str]:
    """Input module name -> output module name (PEFT output holds one model: one component); within one format
    names stay as they are unless ``keep_names`` is off (an image adapter changing naming)."""
    if keep_names and to == adapter.format:
        return {n: n for n in canonical}
    if to == "kohya":
        has_te2 = any(c.component in ("te2", "te3") for c in canonical.values())
        mapping = {n: to_kohya(c, has_te2) for n, c in canonical.items()}
    elif to == "diffusers":
        mapping = {n: to_diffusers(c) for n, c in canonical.items()}
    else:
        components = {c.component for c in canonical.values()}
        if adapter.format != "peft" and len(components) > 1:
            if prefix is None:
                raise InvalidOptionError(
                    f"{adapter.path}: holds modules of several models ({', '.join(sorted(map(str, components)))}) "
                    "but a PEFT adapter holds one; pass --prefix unet|te|te1|te2 to convert one of them")
            wanted = {prefix, "te1" if prefix == "te" else "te" if prefix == "te1" else prefix}
            canonical = {n: c for n, c in canonical.items() if c.component in wanted}
            if not canonical:
                raise InvalidOptionError(f"{adapter.path}: no module of component {prefix!r}")
        mapping = {n: c.path for n, c in canonical.items()}
    seen: dict[str, str] = {}
    for source, target in mapping.items():
        if target in seen:
            raise ModuleMismatchError(f"{adapter.path}: modules {seen[target]} and {source} both become {target} "
                                      f"in {to} naming")
        seen[target] = source
    return mapping


def _recorded_config(adapter: Adapter) -> dict[str, Any] | None:
    raw = adapter.metadata.get(META_PEFT_CONFIG)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return config if isinstance(config, dict) else None


def _exact_scale(module: LoraModule, rule: peft.ScaleRule | None, out_name: str) -> float:
    """The recorded PEFT scale when the stored float32 alpha agrees with it (undoes the float32 rounding)."""
    if rule is None:
        return module.scale
    rank, alpha, _ = rule.rank_and_alpha(out_name)
    if rank != module.rank:
        return module.scale
    exact = rule.scale(rank, alpha)
    return exact if abs(exact - module.scale) <= 1e-6 * max(abs(exact), 1e-30) else module.scale


@torch.no_grad()
def plan_conversion(adapter: Adapter, to: str, *, base: Path | None = None, prefix: str | None = None,
                    allow_partial: bool = False) -> ConvertPlan:
    """The converted adapter in memory (no file written), with the module name mapping."""
    if to not in TARGETS:
        raise InvalidOptionError(f"unknown --to {to!r}; choose one of {', '.join(TARGETS)}")
    prefix = parse_prefix(prefix)
    canonical, name_source, warnings = canonical_names(adapter, base=base, prefix=prefix,
                                                       allow_partial=allow_partial)
    layer_plan = plan_layers(adapter, canonical, to, allow_partial)
    if layer_plan is not None:
        canonical = _with_layer_plan(canonical, layer_plan)
        warnings += layer_plan.warnings
        name_source += f" ({layer_plan.family.name} layer tables)"
    mapping = output_names(canonical, to, prefix, adapter, keep_names=layer_plan is None)
    groups = _take_group_names(mapping, layer_plan)
    dropped = len(adapter.modules) - len(mapping) - sum(n is not None for g in groups for n in g.inputs)
    if dropped and not warnings:
        warnings.append(f"{dropped} module(s) of other components not converted (--prefix {prefix})")
    # diffusers' loader gives a module without .alpha the file's most common alpha, not scale 1
    # (loaders/peft get_peft_kwargs): once one module needs an alpha, every module gets one.
    # Flux/Wan in diffusers naming: PEFT-named factors, scales in lora_adapter_metadata (formats/diffusers.py);
    # diffusers' loaders of transformer models ignore .alpha tensors.
    peft_named = to == "diffusers" and layer_plan is not None and layer_plan.family.split_component == "transformer"
    every_alpha = to == "diffusers" and (adapter.format != to or layer_plan is not None) and \
        any(abs(m.scale - 1.0) > 1e-12 for m in adapter.modules.values())
    recorded_config = _recorded_config(adapter) if to == "peft" else None
    rule = peft.ScaleRule(recorded_config, adapter.path, []) if recorded_config else None
    metadata = _output_metadata(adapter, to, mapping)
    config = adapter.config if adapter.format == "peft" else recorded_config
    builder = AdapterBuilder(to, adapter.path, config=config, metadata=metadata, base_model=adapter.base_model)
    for name in natural_sort(mapping):
        module = adapter.modules[name]
        out_name = mapping[name]
        _check_convertible(adapter, module, to)
        a = adapter.source.get(module.a_info.key)  # as stored: (r, in[, kh, kw])
        b = adapter.source.get(module.b_info.key)  # (out, r[, 1, 1])
        scale = _exact_scale(module, rule, out_name)
        keys = _factor_keys(to, out_name, module.kind, peft_named)
        alpha_tensor = None if peft_named else _alpha_tensor(adapter, module, to, scale, every_alpha)
        new = builder.add_module(out_name, module.kind, b, a, scale=scale, alpha=scale * module.rank, keys=keys,
                                 alpha_tensor=alpha_tensor, flags=list(module.flags))
        if module.bias_key:
            key = f"{peft.PREFIX}{out_name}.lora_B.bias"
            builder.tensors[key] = adapter.source.get(module.bias_key)
            new.bias_key = key
        if module.magnitude_key:
            key = module.magnitude_key if to == adapter.format else f"{peft.PREFIX}{out_name}.lora_magnitude_vector"
            builder.tensors[key] = adapter.source.get(module.magnitude_key)
            new.magnitude_key = key
    for group in groups:
        for name in group.inputs:
            if name is not None:
                _check_convertible(adapter, adapter.modules[name], to)
        for out in build_group(adapter, group):
            rank = out.A.shape[0]
            alpha_tensor = None if to == "peft" or peft_named or (to == "diffusers" and out.scale == 1.0 and
                                                                  not every_alpha) else \
                torch.tensor(out.scale * rank, dtype=torch.float32)
            builder.add_module(out.name, out.kind, out.B, out.A, scale=out.scale, alpha=out.scale * rank,
                               keys=_factor_keys(to, out.name, out.kind, peft_named), alpha_tensor=alpha_tensor)
    for info in adapter.extra_tensors:
        builder.add_tensor(info.key, adapter.source.get(info.key))
    converted = builder.build()
    return ConvertPlan(converted, mapping, name_source, warnings, groups)


def _factor_keys(to: str, name: str, kind: str, peft_named: bool) -> tuple[str, str, str | None]:
    if peft_named:
        return f"{name}.lora_A.weight", f"{name}.lora_B.weight", None
    return factor_keys(to, name, kind)


_GROUP_KEY = "\0group"  # stands for a group's output while output_names spells it (no module is named so)


def _with_layer_plan(canonical: dict[str, Canonical], layer_plan: LayerPlan) -> dict[str, Canonical]:
    """The canonical names with renames applied and each group's inputs replaced by its outputs."""
    grouped = {name for group in layer_plan.groups for name in group.inputs}
    result = {n: c for n, c in canonical.items() if n not in grouped}
    result.update(layer_plan.renames)
    for i, group in enumerate(layer_plan.groups):
        for j, out in enumerate(group.outputs):
            result[f"{_GROUP_KEY}{i}.{j}"] = out
    return result


def _take_group_names(mapping: dict[str, str], layer_plan: LayerPlan | None) -> list[LayerGroup]:
    """Move the groups' spelled output names out of ``mapping``; groups --prefix left out are dropped."""
    if layer_plan is None:
        return []
    kept = []
    for i, group in enumerate(layer_plan.groups):
        keys = [f"{_GROUP_KEY}{i}.{j}" for j in range(len(group.outputs))]
        names = [mapping.pop(key) for key in keys if key in mapping]
        if names:
            group.out_names = names
            kept.append(group)
    return kept


def _check_convertible(adapter: Adapter, module: LoraModule, to: str) -> None:
    if to == adapter.format:
        return
    if module.magnitude_key:
        raise UnsupportedAdapterError(
            f"{adapter.path}: module {module.name} is DoRA; the magnitude layouts of {adapter.format} and {to} "
            "differ, so DoRA adapters convert only within their format")
    if module.bias_key and to != "peft":
        raise UnsupportedAdapterError(f"{adapter.path}: module {module.name} has a LoRA bias (lora_B.bias), which "
                                      f"{to} files cannot hold; convert --to peft")
    if to in ("kohya", "diffusers") and module.kind not in ("linear", "conv"):
        raise UnsupportedAdapterError(
            f"{adapter.path}: module {module.name} is a {module.kind} layer (transposed update); {to} files cannot "
            "mark that, convert --to peft")


def _alpha_tensor(adapter: Adapter, module: LoraModule, to: str, scale: float,
                  every_alpha: bool = False) -> torch.Tensor | None:
    if to == "peft":
        return None
    if module.alpha_key:
        return adapter.source.get(module.alpha_key)  # as stored (dtype included): round trips stay bit-exact
    if to == "diffusers" and scale == 1.0 and not every_alpha:
        return None  # diffusers' default scale is 1: no .alpha, like diffusers' own files
    # float32 like sd-scripts; kohya.write rewrites it anyway unless it already holds scale·rank
    return torch.tensor(scale * module.rank, dtype=torch.float32)


def _output_metadata(adapter: Adapter, to: str, mapping: dict[str, str]) -> dict[str, str]:
    metadata = {k: v for k, v in adapter.metadata.items() if k != "lora_adapter_metadata"}
    if to == "peft":
        return {"format": "pt"}
    if to == "kohya" and adapter.format != "kohya":
        # kohya names are lossy; record the originals (and PEFT's config) so the file converts back exactly.
        metadata.update(provenance_metadata(mapping, adapter.format,
                                            adapter.config if adapter.format == "peft" else None))
    return metadata


def open_conversion(source: Path, output: Path, force: bool, input_format: str | None,
                    base: Path | str | None) -> tuple[Adapter, tuple[Path, ...]]:
    """(the adapter, its input paths) once OUT is known not to overwrite an input or an existing file without
    --force, and a GGUF input's architecture matches ``base``: what every conversion checks before its work."""
    from lora_tools.atomic import check_not_input, check_output
    from lora_tools.formats import load_adapter

    adapter = load_adapter(source, input_format)
    inputs = tuple(p for p in (source, adapter.weights_path) if p is not None)
    check_not_input(output, inputs)
    check_output(output, force, inputs)
    if adapter.format == "gguf" and base is not None:
        from lora_tools.formats.gguf_names import check_same_arch

        check_same_arch(adapter, base)
    return adapter, inputs


def convert(source: Path, output: Path, to: str, *, base: Path | None = None, prefix: str | None = None,
            allow_partial: bool = False, force: bool = False, input_format: str | None = None,
            allow_nonfinite: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """Convert the adapter at ``source`` to ``to`` at ``output`` (verified before it is moved into place)."""
    from lora_tools.atomic import move_into_place

    if to == "gguf":  # llama.cpp LoRA: names, layout and scales for a base model (convert/to_gguf.py)
        from lora_tools.convert.to_gguf import convert_to_gguf

        return convert_to_gguf(source, output, base=base, dtype=dtype, prefix=prefix, allow_partial=allow_partial,
                               force=force, input_format=input_format, allow_nonfinite=allow_nonfinite)
    if to not in TARGETS:
        raise InvalidOptionError(f"unknown --to {to!r}; choose one of {', '.join(TARGETS)}")
    adapter, inputs = open_conversion(source, output, force, input_format, base)
    plan = plan_conversion(adapter, to, base=base, prefix=prefix, allow_partial=allow_partial)
    if not allow_nonfinite:
        check_finite(adapter, [*plan.mapping, *(n for g in plan.groups for n in g.inputs if n is not None)])
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".convert", dir=output.parent))
    try:
        staged = staging / output.name
        FORMATS[to].write(plan.adapter, staged)
        written = FORMATS[to].read(staged)
        checks = verify(adapter, written, plan.mapping, plan.groups)
        move_into_place(staged, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "input": str(source), "input_format": adapter.format, "output": str(output), "output_format": to,
        "num_modules": len(written.modules), "name_source": plan.name_source, **checks,
        "layer_groups": {kind: sum(g.kind == kind for g in plan.groups) for kind in ("split", "fuse", "swap")},
        "mapping": {**plan.mapping, **group_mapping(plan.groups)}, "warnings": plan.warnings + list(written.warnings),
    }


def foreign_names(adapter: Adapter, to: str) -> dict[str, str]:
    """Module name -> name in ``to``'s naming, for a writer handed another format's adapter (truncate or merge
    ``--to``): the canonical path of ``convert``, kohya names resolved against recorded names or the built-in
    lists (no --base here, so unresolvable ones are refused with a pointer to ``convert``)."""
    canonical, _, _ = canonical_names(
        adapter, base=None, prefix=None, allow_partial=False,
        hint=f"write the {adapter.format} format instead, or run `loratools convert --base MODEL` on that output")
    layer_plan = plan_layers(adapter, canonical, to, allow_partial=False)
    if layer_plan is not None and layer_plan.groups:
        # a writer renames tensors only; splitting or fusing layers (and proving it) is convert's job
        first = next(n for n in layer_plan.groups[0].inputs if n is not None)
        raise UnsupportedAdapterError(
            f"{adapter.path}: {layer_plan.family.name} layer {first} is {layer_plan.groups[0].kind} between the "
            f"{adapter.format} and {to} namings; write the {adapter.format} format, then run `loratools convert "
            f"--to {to}` on that output")
    if layer_plan is not None:
        canonical = {**canonical, **layer_plan.renames}
    return output_names(canonical, to, None, adapter, keep_names=layer_plan is None)
