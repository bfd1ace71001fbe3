"""kohya-ss/sd-scripts LoRA files: one safetensors with ``<flat_name>.lora_down.weight``, ``.lora_up.weight``,
an optional scalar ``.alpha`` (missing alpha means alpha = rank, i.e. scale 1), optional ``.dora_scale``, and
``ss_*`` training metadata. Module names are flattened (dots became underscores) and kept as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import AdapterFormatError
from lora_tools.formats.common import make_module, pair_factors, refuse_non_lora, scalar_value
from lora_tools.formats.peft import natural_key
from lora_tools.tensorfile import TensorInfo, open_tensor_file

NAME = "kohya"
# "<name>.lora_down.weight" (sd-scripts) and the "<name>_lora_down.weight" spelling of some hand conversions.
_KEY = re.compile(r"^(?P<module>.+?)[._](?P<role>lora_down|lora_up)\.weight$")
_SIDE = re.compile(r"^(?P<module>.+?)\.(?P<role>alpha|dora_scale)$")
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lora_")


def sniff_keys(keys: list[str]) -> bool:
    return any(_KEY.match(k) and k.startswith(_PREFIXES) and ".lora.down" not in k for k in keys)


def read(path: Path) -> Adapter:
    if path.is_dir():
        raise AdapterFormatError(f"{path}: a kohya LoRA is a single .safetensors file, not a folder")
    source = open_tensor_file(path)
    infos = source.infos()
    refuse_non_lora(path, infos)
    downs: dict[str, TensorInfo] = {}
    ups: dict[str, TensorInfo] = {}
    alphas: dict[str, TensorInfo] = {}
    doras: dict[str, TensorInfo] = {}
    extras: list[TensorInfo] = []
    for key, info in infos.items():
        match = _KEY.match(key)
        side = _SIDE.match(key)
        if match:
            target = downs if match["role"] == "lora_down" else ups
            if match["module"] in target:
                raise AdapterFormatError(f"{path}: module {match['module']} appears twice ({key!r} and "
                                         f"{target[match['module']].key!r})")
            target[match["module"]] = info
        elif side:
            (alphas if side["role"] == "alpha" else doras)[side["module"]] = info
        else:
            extras.append(info)
    if not downs and not ups:
        raise AdapterFormatError(f"{path}: no kohya LoRA tensors (*.lora_down.weight / *.lora_up.weight)")
    orphans = sorted(set(alphas) - set(downs) - set(ups))
    if orphans:
        raise AdapterFormatError(f"{path}: module {orphans[0]} has an alpha but no lora_down/lora_up factors")
    warnings: list[str] = []
    modules: dict[str, LoraModule] = {}
    missing_alpha = 0
    for name in sorted(pair_factors(path, downs, ups, "down", "up"), key=natural_key):
        rank = downs[name].shape[0] if downs[name].shape else 0
        if name in alphas:
            alpha = scalar_value(path, alphas[name].key, source.get(alphas[name].key))
        else:
            alpha, missing_alpha = float(rank), missing_alpha + 1
        module = make_module(path, name, downs[name], ups[name], alpha=alpha,
                             scale=alpha / rank if rank else 0.0,
                             alpha_key=alphas[name].key if name in alphas else None,
                             magnitude_key=doras[name].key if name in doras else None)
        if module.magnitude_key:
            module.flags.append("dora")
        modules[name] = module
    if missing_alpha:
        warnings.append(f"{missing_alpha} module(s) have no .alpha; kohya then uses alpha = rank (scale 1)")
    metadata = source.metadata
    base = metadata.get("ss_sd_model_name") or metadata.get("ss_base_model_version")
    return Adapter(path=path, format=NAME, modules=modules, source=source, metadata=metadata,
                   extra_tensors=extras, warnings=warnings, base_model=base, scale_rule="alpha/rank (kohya)",
                   weights_path=path)
