"""LyCORIS files (kohya naming, ``lycoris.kohya`` / ``lycoris.wrapper`` saves): ``<module>.hada_w1_a`` ... (LoHa),
``<module>.lokr_w1`` / ``lokr_w1_a`` ... (LoKr), ``<module>.lora_down/up/mid.weight`` (LoCon, with or without a
Tucker core), ``<module>.diff`` (full), each with an optional scalar ``.alpha`` and ``.dora_scale``; ``.diff_b``
(bias differences), ``.w_norm``/``.b_norm`` (norm layers) are kept as extra tensors.

Every module becomes exact LoRA factors (``lora_tools/updates.py``). Scales follow the forward passes that apply
these files: LyCORIS' modules (lycoris/modules/{loha,lokr,locon}.py, ``get_weight``/``make_weight`` times
``self.scale`` once) and ComfyUI's loaders (comfy/weight_adapter/{loha,lokr,lora}.py):

- LoHa, LoCon: alpha / r; LoKr: alpha / dim with dim the LoRA dim of the factored side, and 1 when both sides
  are full (LyCORIS then forces alpha = dim; ComfyUI ignores alpha); full diffs: 1; no ``.alpha``: 1.
- LyCORIS' own merge path (``get_diff_weight``) multiplies LoHa/LoKr weights by the scale a second time, so a
  LyCORIS merge and its forward pass disagree whenever alpha != r; the forward pass is what a trained adapter
  was optimised through and what ComfyUI applies, so it is the rule here.

The adapter reads as format ``kohya`` (its names are kohya names), so ``truncate``/``convert``/``merge`` write
plain kohya/PEFT/diffusers LoRA from the exact factors. Writing LyCORIS tensors is not supported.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import AdapterFormatError, UnsupportedAdapterError
from lora_tools.formats.common import (
    make_module,
    refuse_mixed_schemes,
    refuse_non_lora,
    scalar_value,
)
from lora_tools.formats.lycoris_keys import (
    FAMILY_NAMES,
    build_full,
    build_locon_tucker,
    build_loha,
    build_lokr,
    check_alpha,
    dora_layout,
    family,
)
from lora_tools.formats.peft import natural_key
from lora_tools.tensorfile import TensorInfo, open_tensor_file
from lora_tools.updates import ExactFactorSource, Update

NAME = "lycoris"
ADAPTER_FORMAT = "kohya"  # the naming scheme downstream code (convert, writers) sees
_ROLE = (r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t[12]|lora_(?:down|up|mid)\.weight|alpha|"
         r"dora_scale|diff|diff_b|w_norm|b_norm")
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{_ROLE})$")
# Keys only LyCORIS writes: their presence makes a file a LyCORIS file (plain LoRA ones stay with kohya).
_MARKER = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t[12]|lora_mid\.weight|diff|diff_b|"
                     r"w_norm|b_norm)$")
_EXTRA_ROLES = ("diff_b", "w_norm", "b_norm")
SCALE_RULE = ("LyCORIS forward pass: LoHa/LoCon alpha/r, LoKr alpha/dim (1 with both sides full), full diff 1, "
              "no alpha 1")


def sniff_keys(keys: list[str]) -> bool:
    return any(_MARKER.search(k) for k in keys)


def build_structured(source: ExactFactorSource, name: str, update: Update, *, scale: float,
                     kind: str | None = None, magnitude_key: str | None = None, flags: list[str] | None = None,
                     file_alpha: float | None = None) -> LoraModule:
    """A module whose a_info/b_info are the update's exact factors, served by ``source``; its ``alpha`` is the
    LoRA-equivalent scale·rank (what LoRA writers store), the file's own alpha stays in the update."""
    update = dataclasses.replace(update, file_alpha=file_alpha)
    a_info, b_info = source.register(name, update)
    rank = update.rank
    return LoraModule(name=name, kind=kind or ("conv" if update.kernel else "linear"), rank=rank,
                      alpha=scale * rank, scale=scale, a_info=a_info, b_info=b_info, magnitude_key=magnitude_key,
                      flags=list(flags or []), update=update)


def _group(path: Path, infos: dict[str, TensorInfo]) -> tuple[dict[str, dict[str, TensorInfo]], list[TensorInfo]]:
    groups: dict[str, dict[str, TensorInfo]] = {}
    extras: list[TensorInfo] = []
    for key, info in infos.items():
        match = _KEY.match(key)
        if not match or match["role"] in _EXTRA_ROLES:
            extras.append(info)
            continue
        role = match["role"].removesuffix(".weight")
        groups.setdefault(match["module"], {})[role] = info
    return groups, extras


def read(path: Path) -> Adapter:
    if path.is_dir():
        raise AdapterFormatError(f"{path}: a LyCORIS adapter is a single .safetensors file, not a folder")
    inner = open_tensor_file(path)
    infos = inner.infos()
    refuse_non_lora(path, infos, allow=("lycoris",))
    groups, extras = _group(path, infos)
    refuse_mixed_schemes(path, extras, "LyCORIS")
    source = ExactFactorSource(inner)
    modules: dict[str, LoraModule] = {}
    warnings: list[str] = []
    counts: dict[str, Any] = {"no_alpha": 0, "full_alpha": [], "flattened": 0}
    for name in sorted(groups, key=natural_key):
        modules[name] = _module(path, name, groups[name], source, counts)
    if not modules:
        raise AdapterFormatError(f"{path}: no LyCORIS update tensors (hada_*, lokr_*, lora_down/up, diff)")
    _warn(counts, extras, warnings)
    metadata = inner.metadata
    base = metadata.get("ss_sd_model_name") or metadata.get("ss_base_model_version")
    return Adapter(path=path, format=ADAPTER_FORMAT, modules=modules, source=source, metadata=metadata,
                   extra_tensors=extras, warnings=warnings, base_model=base, scale_rule=SCALE_RULE,
                   weights_path=path)


def _alpha(path: Path, source: ExactFactorSource, roles: dict[str, TensorInfo]) -> float | None:
    info = roles.get("alpha")
    return None if info is None else scalar_value(path, info.key, source.inner.get(info.key))


def _module(path: Path, name: str, roles: dict[str, TensorInfo], source: ExactFactorSource,
            counts: dict[str, Any]) -> LoraModule:
    kind = family(path, name, roles)
    alpha = _alpha(path, source, roles)
    dora = roles.get("dora_scale")
    if kind == "lora" and "lora_mid" not in roles:
        # Plain LoCon/LoRA: kohya's layout and rule (alpha / r; no alpha: scale 1).
        down, up = roles.get("lora_down"), roles.get("lora_up")
        if down is None or up is None:
            missing = "lora_up" if up is None else "lora_down"
            raise AdapterFormatError(f"{path}: module {name} has a LoRA {'down' if up is None else 'up'} factor "
                                     f"but no {missing} factor (half a pair)")
        rank = down.shape[0] if down.shape else 0
        if alpha is not None:
            check_alpha(path, name, alpha, "LoRA")
        counts["no_alpha"] += alpha is None
        module = make_module(path, name, down, up, alpha=alpha if alpha is not None else float(rank),
                             scale=alpha / rank if alpha is not None and rank else 1.0,
                             alpha_key=roles["alpha"].key if "alpha" in roles else None)
        if dora is not None:
            module.magnitude_key = dora.key
            module.flags += ["dora", dora_layout(path, name, dora, module.out_features, module.in_features,
                                                 module.kernel_size)]
        return module
    update: Update
    divisor: int | None
    if kind == "loha":
        update, divisor = build_loha(path, name, roles)
    elif kind == "lokr":
        update, divisor = build_lokr(path, name, roles)
        if divisor is None and alpha is not None:
            counts["full_alpha"].append((name, alpha))
    elif kind == "full":
        update, divisor = build_full(path, name, roles), None
        alpha = None  # a full diff is ΔW itself; LyCORIS stores no alpha for it
    else:
        update, divisor = build_locon_tucker(path, name, roles)
    scale = 1.0
    if divisor is not None and alpha is not None:
        check_alpha(path, name, alpha, FAMILY_NAMES.get(kind, kind))
        scale = alpha / divisor
    counts["no_alpha"] += alpha is None and divisor is not None
    counts["flattened"] += kind in ("loha", "lokr") and not update.kernel and _looks_conv(name)
    flags = []
    if dora is not None:
        flags = ["dora", dora_layout(path, name, dora, update.out_features, update.in_features, update.kernel)]
    return build_structured(source, name, update, scale=scale, magnitude_key=dora.key if dora else None,
                            flags=flags, file_alpha=alpha)


def _looks_conv(name: str) -> bool:
    return any(part in name for part in ("conv", "downsamplers", "upsamplers", "resnets"))


def _warn(counts: dict[str, Any], extras: list[TensorInfo], warnings: list[str]) -> None:
    if counts["no_alpha"]:
        warnings.append(f"{counts['no_alpha']} module(s) have no .alpha; LyCORIS and ComfyUI then use scale 1")
    if counts["full_alpha"]:
        name, alpha = counts["full_alpha"][0]
        warnings.append(f"{len(counts['full_alpha'])} LoKr module(s) have both Kronecker factors full: their .alpha "
                        f"(e.g. {alpha:g} in {name}) is a placeholder that LyCORIS and ComfyUI ignore; scale 1")
    if counts["flattened"]:
        warnings.append(f"{counts['flattened']} conv module(s) store their update flattened (out, in·k·k): the "
                        "kernel size is not in the file, so they read, and convert, as (out, in·k·k) matrices")
    norm = [i.key for i in extras if i.key.endswith((".diff_b", ".w_norm", ".b_norm"))]
    if norm:
        warnings.append(f"{len(norm)} bias/norm difference tensor(s) (e.g. {norm[0]}) are kept as extra tensors; "
                        "they are not low-rank and not part of any spectrum")


def write(adapter: Adapter, path: Path, *, force: bool = False) -> Path:
    raise UnsupportedAdapterError(
        f"{path}: writing LyCORIS (LoHa/LoKr) tensors is not supported; convert --to kohya or --to peft writes "
        "the exact LoRA of every module")
