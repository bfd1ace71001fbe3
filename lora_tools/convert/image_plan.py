"""Which input layers become which output layers when an image adapter changes naming (convert/image_models.py).

``plan_layers`` sorts every module of an SDXL, Flux or Wan adapter into one of:

* a rename (same rows; Flux's final_layer / norm_out with its row halves swapped),
* a split: one fused input layer -> its parts (Flux BFL/XLabs qkv and linear1 to diffusers' projections),
* a fuse: several input layers -> one fused output layer (diffusers' projections to BFL names for kohya).

Modules of other components (text encoders) and adapters of no known image model are left to the 1:1 path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_tools.adapter import Adapter
from lora_tools.convert.image_models import Family, Layer, families, find_layer
from lora_tools.convert.names import Canonical
from lora_tools.errors import ModuleMismatchError

# cross_attention_dim of the SDXL UNet (its attn2.to_k/to_v read 2048-wide text embeddings; SD 1.x 768, SD 2 1024)
SDXL_CROSS_ATTENTION_DIM = 2048


@dataclass
class LayerGroup:
    """Input modules -> output layers; ``sizes`` are the rows of each part of the fused side, in order."""

    kind: str  # rename | swap | split | fuse
    inputs: list[str | None]  # fuse: one entry per output part, None where the part is absent
    outputs: list[Canonical]  # split: one per part
    sizes: list[int] = field(default_factory=list)
    out_names: list[str] = field(default_factory=list)  # the outputs spelled in the target format (convert.run)


@dataclass
class LayerPlan:
    family: Family
    renames: dict[str, Canonical]  # plain renames, for the 1:1 path
    groups: list[LayerGroup]
    warnings: list[str]


def _sdxl_evidence(adapter: Adapter, canonical: dict[str, Canonical]) -> bool:
    """diffusers-named UNet paths are SD 1.x, 2.x or SDXL alike; SDXL shows itself by a second text encoder, the
    added-conditioning embedding, or 2048-wide cross-attention keys."""
    for name, found in canonical.items():
        if found.component == "te2" or found.path.startswith("add_embedding."):
            return True
        if found.path.endswith(("attn2.to_k", "attn2.to_v")) and \
                adapter.modules[name].in_features == SDXL_CROSS_ATTENTION_DIM:
            return True
    return False


def _locate(adapter: Adapter, canonical: dict[str, Canonical]) -> dict[str, tuple[Family, str]]:
    """Module name -> (family, naming) for the modules of a known image model's denoiser."""
    located: dict[str, tuple[Family, str]] = {}
    sdxl_ok: bool | None = None
    for name, found in canonical.items():
        if found.component not in (None, "unet", "transformer"):
            continue
        hit = find_layer(found.path)
        if hit is None:
            for family in families():
                if found.path in family.diffusers_paths:
                    if family.name == "sdxl":
                        sdxl_ok = _sdxl_evidence(adapter, canonical) if sdxl_ok is None else sdxl_ok
                        if not sdxl_ok:
                            continue
                    hit = (family, "diffusers")
                    break
        if hit is not None:
            located[name] = hit
    return located


def plan_layers(adapter: Adapter, canonical: dict[str, Canonical], to: str,
                allow_partial: bool) -> LayerPlan | None:
    """The layer plan for converting to ``to``'s naming, or None when no image-model translation applies."""
    located = _locate(adapter, canonical)
    if not located:
        return None
    found_families = {family.name: family for family, _ in located.values()}
    if len(found_families) > 1:
        raise ModuleMismatchError(f"{adapter.path}: holds layers of several models ({', '.join(sorted(found_families))}); "
                                  "convert one model's adapter at a time")
    family = next(iter(found_families.values()))
    target = family.kohya_naming if to == "kohya" else "diffusers"
    if to == adapter.format and (to != "diffusers" or all(naming == target for _, naming in located.values())):
        # names stay as they are within a format, except a diffusers-format file in the model's own names
        # (ComfyUI's diffusion_model.*, XLabs), which --to diffusers brings to diffusers' layers
        return None
    component = "unet" if target != "diffusers" else family.split_component
    owner = family.atom_owner

    def target_layer(atom: str) -> Layer:
        return owner[atom] if target != "diffusers" else Layer(atom, (atom,))

    renames: dict[str, Canonical] = {}
    groups: list[LayerGroup] = []
    fuse_inputs: dict[str, list[tuple[str, Layer]]] = {}
    fuse_layers: dict[str, Layer] = {}
    for name, (_, naming) in located.items():
        layer = family.layer(naming, canonical[name].path)
        outputs: list[Layer] = []
        for atom in layer.atoms:
            out = target_layer(atom)
            if out not in outputs:
                outputs.append(out)
        if len(outputs) == 1 and outputs[0].atoms == layer.atoms:
            out_name = Canonical(component, outputs[0].path)
            if layer.swap_halves != outputs[0].swap_halves:
                groups.append(LayerGroup("swap", [name], [out_name]))
            else:
                renames[name] = out_name
        elif len(outputs) > 1:
            if any(not set(o.atoms) <= set(layer.atoms) for o in outputs):
                raise ModuleMismatchError(f"{adapter.path}: module {name} overlaps layers of the {target} naming "
                                          "only in part; it cannot be converted exactly")
            in_features = adapter.modules[name].in_features
            sizes = [_rows(layer, o.atoms, in_features) for o in outputs]
            groups.append(LayerGroup("split", [name], [Canonical(component, o.path) for o in outputs], sizes))
        else:
            fuse_inputs.setdefault(outputs[0].path, []).append((name, layer))
            fuse_layers[outputs[0].path] = outputs[0]
    warnings: list[str] = []
    for path, members in fuse_inputs.items():
        groups.append(_fuse_group(adapter, fuse_layers[path], members, component, allow_partial, warnings))
    return LayerPlan(family, renames, groups, warnings)


def _rows(fused: Layer, atoms: tuple[str, ...], in_features: int) -> int:
    """Rows of ``atoms`` inside the fused layer whose input is ``in_features`` wide."""
    return sum(width * in_features for atom, width in zip(fused.atoms, fused.widths, strict=True) if atom in atoms)


def _fuse_group(adapter: Adapter, fused: Layer, members: list[tuple[str, Layer]], component: str | None,
                allow_partial: bool, warnings: list[str]) -> LayerGroup:
    """Inputs of one fused output layer, one slot per stretch of its atoms that an input covers."""
    by_first_atom = {layer.atoms[0]: (name, layer) for name, layer in members}
    in_features = {adapter.modules[name].in_features for name, _ in members}
    if len(in_features) > 1:
        names = ", ".join(name for name, _ in members)
        raise ModuleMismatchError(f"{adapter.path}: the parts of {fused.path} ({names}) read inputs of different "
                                  f"widths {sorted(in_features)}; they are not one layer")
    width = in_features.pop()
    inputs: list[str | None] = []
    sizes: list[int] = []
    missing: list[str] = []
    position = 0
    while position < len(fused.atoms):
        atom = fused.atoms[position]
        if atom in by_first_atom:
            name, layer = by_first_atom.pop(atom)
            if fused.atoms[position:position + len(layer.atoms)] != layer.atoms:
                raise ModuleMismatchError(f"{adapter.path}: module {name} does not line up with the parts of "
                                          f"{fused.path}")
            inputs.append(name)
            sizes.append(_rows(fused, layer.atoms, width))
            position += len(layer.atoms)
        else:
            inputs.append(None)
            sizes.append(_rows(fused, (atom,), width))
            missing.append(atom)
            position += 1
    if by_first_atom:
        stray = ", ".join(name for name, _ in by_first_atom.values())
        raise ModuleMismatchError(f"{adapter.path}: module(s) {stray} do not line up with the parts of {fused.path}")
    for name, size in zip(inputs, sizes, strict=True):
        if name is not None and adapter.modules[name].out_features != size:
            module = adapter.modules[name]
            raise ModuleMismatchError(
                f"{adapter.path}: module {name} has {module.out_features} output rows but as a part of {fused.path} "
                f"(input width {width}) it must have {size}; fused sizes do not add up")
    if missing:
        shown = ", ".join(missing)
        if not allow_partial:
            raise ModuleMismatchError(
                f"{adapter.path}: {fused.path} fuses {len(fused.atoms)} layers but the file has no LoRA for {shown}; "
                "pass --allow-partial to write those rows as zero (no update), which is exact")
        warnings.append(f"{fused.path}: no LoRA for {shown}; written as zero rows (--allow-partial)")
    return LayerGroup("fuse", inputs, [Canonical(component, fused.path)], sizes)
