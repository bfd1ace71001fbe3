"""One key per layer for matching the modules of adapters in different formats (merge, similarity).

PEFT, kohya and diffusers names of a layer meet at ``component:path`` (kohya names resolved as ``convert`` does:
recorded names, the built-in lists). Image models whose kohya/ComfyUI naming is the model's own (Flux BFL
``double_blocks.*``, Wan, XLabs) are brought to diffusers' layers by ``convert``'s layer plan, so a kohya Flux file
and a diffusers Flux file of the same model match layer by layer. Layers that are not one-to-one between the
namings (Flux's fused ``img_attn.qkv`` / ``linear1`` against diffusers' separate q, k, v; the final layer whose
halves are swapped) get a key of their own; when another input holds the same layer split (or unswapped),
matching them is refused with the command that makes the namings agree, never summed row-misaligned.
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_tools.adapter import Adapter
from lora_tools.errors import UnsupportedAdapterError

GROUP_MARK = "group:"


def alignment_keys(adapter: Adapter) -> dict[str, str]:
    """A format-independent key per module (component:path) to match modules of adapters in different formats;
    kohya names are resolved like ``convert`` does (recorded names, built-in lists), unresolved ones keep their
    name; modules named by order only (lora_diffusion) match nothing in another format."""
    from lora_tools.convert.image_plan import plan_layers
    from lora_tools.convert.run import canonical_names
    from lora_tools.errors import LoraToolsError

    if adapter.format not in ("peft", "kohya", "diffusers"):
        return {n: f"{adapter.format}:{n}" for n in adapter.modules}
    canonical, _, _ = canonical_names(adapter, base=None, prefix=None, allow_partial=True)
    try:  # image models: diffusers' layers (renames), fused/split/swapped layers keyed by their parts
        layer_plan = plan_layers(adapter, canonical, "diffusers", allow_partial=True) if canonical else None
    except LoraToolsError:  # a file the layer tables do not cover: its names as they resolve
        layer_plan = None
    keys = {}
    for name in adapter.modules:
        found = canonical.get(name)
        if found is None:
            keys[name] = f"?:{name}"
        else:
            found = layer_plan.renames.get(name, found) if layer_plan is not None else found
            component = "te" if found.component == "te1" else found.component
            keys[name] = f"{component}:{found.path}"
    for group in layer_plan.groups if layer_plan is not None else []:
        parts = "+".join(f"{o.component}:{o.path}" for o in group.outputs)
        for name in group.inputs:
            if name is not None:
                keys[name] = f"{GROUP_MARK}{group.kind}({parts})"
    return keys


def aligned_keys(adapters: Sequence[Adapter]) -> list[dict[str, str]]:
    """Each adapter's merge key per module: names within one format, ``alignment_keys`` across formats; a layer
    fused (or half-swapped) in one input and held as plain layers by another is refused."""
    if len({a.format for a in adapters}) == 1:
        return [{n: n for n in a.modules} for a in adapters]
    keys = [alignment_keys(a) for a in adapters]
    plain = {key: (adapter, name) for adapter, table in zip(adapters, keys, strict=True)
             for name, key in table.items() if not key.startswith(GROUP_MARK)}
    for adapter, table in zip(adapters, keys, strict=True):
        for name, key in table.items():
            if not key.startswith(GROUP_MARK):
                continue
            kind, parts = key[len(GROUP_MARK):].split("(", 1)
            clash = next((plain[p] for p in parts.rstrip(")").split("+") if p in plain), None)
            if clash is not None:
                what = "one fused layer" if kind == "split" else "a layer with swapped halves" if kind == "swap" \
                    else f"a {kind} layer"
                raise UnsupportedAdapterError(
                    f"{adapter.path}: module {name} is {what} where {clash[0].path} has {clash[1]} "
                    f"({parts.rstrip(')').replace('+', ', ')}); their rows do not line up, so they are not "
                    f"matched: first run `loratools convert {adapter.path} --to {clash[0].format}` and use that "
                    "output")
    return keys
