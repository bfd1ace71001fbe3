"""kohya-ss/sd-scripts LoRA files: one safetensors with ``<flat_name>.lora_down.weight``, ``.lora_up.weight``,
an optional scalar ``.alpha`` (missing alpha means alpha = rank, i.e. scale 1), optional ``.dora_scale``, and
``ss_*`` training metadata. Module names are flattened (dots became underscores) and kept as they are.

Writing another format's adapter names each module ``lora_<component>_<flattened path>`` exactly as ``convert``
does (``convert.run.foreign_names`` for PEFT/diffusers/GGUF input: image-model renames included, e.g. SDXL's
diffusers ``down_blocks.*`` become sgm ``input_blocks_*``; ``names.kohya_names`` otherwise): ``lora_unet_`` for
the UNet whatever the input's naming, since kohya's loaders (sd-scripts, ComfyUI, A1111) apply nothing else, and
records the original names in the metadata so that ``convert`` reads the file back without a base model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.convert.names import kohya_names, provenance_metadata
from lora_tools.errors import AdapterFormatError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats.common import (
    format_number,
    make_module,
    pair_factors,
    refuse_mixed_schemes,
    refuse_non_lora,
    scalar_value,
    write_safetensors,
)
from lora_tools.formats.peft import natural_key
from lora_tools.tensorfile import TensorInfo, open_tensor_file

NAME = "kohya"
# "<name>.lora_down.weight" (sd-scripts) and the "<name>_lora_down.weight" spelling of some hand conversions.
_KEY = re.compile(r"^(?P<module>.+?)[._](?P<role>lora_down|lora_up)\.weight$")
_SIDE = re.compile(r"^(?P<module>.+?)\.(?P<role>alpha|dora_scale)$")
# "diffusion_model.": ComfyUI's LoRA extract, kohya tensors under the denoiser's dotted layer names (Flux, Wan)
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lora_",
             "diffusion_model.")


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
    refuse_mixed_schemes(path, extras, "kohya")
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


# --- writing -------------------------------------------------------------------------------------------------

# Content hashes of the *input* file that sd-scripts stores in metadata; stale after any change, so dropped.
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash")


def flat_name(name: str, source_format: str) -> str:
    """kohya's module name for one module: kept for kohya input, ``lora_<component>_`` + the flattened path
    otherwise (one module alone cannot tell SDXL's te1 from SD's te: ``write`` maps the whole adapter)."""
    return kohya_names([name], source_format)[name]


def write(adapter: Adapter, path: Path, *, force: bool = False) -> Path:
    """Write ``adapter`` as one kohya safetensors file with a float32 ``.alpha`` per module, atomically.

    alpha = scale · rank (kohya's scale is alpha / rank, sd-scripts networks/lora.py); ``ss_network_dim`` and
    ``ss_network_alpha`` become the common rank/alpha, or "Dynamic" when modules differ (as resize_lora.py
    writes for dynamic resizes). Other metadata is kept except the now stale content hashes.
    """
    import torch

    from lora_tools.atomic import atomic_path

    tensors: dict[str, Any] = {}
    ranks: set[int] = set()
    alphas: set[float] = set()
    if adapter.format in ("peft", "diffusers", "gguf"):
        from lora_tools.convert.run import foreign_names  # convert.run imports the format registry

        # convert's names, image-model renames included (SDXL diffusers down_blocks.* -> sgm input_blocks_*), so
        # that truncate/merge --to kohya write what convert --to kohya writes
        flat_names = foreign_names(adapter, NAME)
    else:
        try:
            flat_names = kohya_names(adapter.modules, adapter.format)
        except (ModuleMismatchError, UnsupportedAdapterError) as exc:
            raise type(exc)(f"{adapter.path}: {exc}") from exc
    for name, module in adapter.modules.items():
        if module.kind not in ("linear", "conv"):
            raise ModuleMismatchError(
                f"{adapter.path}: module {name} is a {module.kind} layer; kohya files cannot mark a transposed "
                "(GPT-2 Conv1D or embedding) update, write --to peft instead")
        if module.bias_key or (module.magnitude_key and adapter.format != NAME):
            raise ModuleMismatchError(
                f"{adapter.path}: module {name} has a LoRA bias or a {adapter.format} DoRA magnitude that kohya "
                "files cannot hold in the same layout; write --to peft instead")
        flat = flat_names[name]
        alpha = module.scale * module.rank
        tensors[f"{flat}.lora_down.weight"] = adapter.source.get(module.a_info.key)  # (r, in[, kh, kw])
        tensors[f"{flat}.lora_up.weight"] = adapter.source.get(module.b_info.key)  # (out, r[, 1, 1])
        stored = adapter.source.get(module.alpha_key) if module.alpha_key else None
        if stored is not None and stored.numel() == 1 and abs(float(stored) - alpha) <= 1e-9 * abs(alpha):
            # The input's own alpha tensor already holds this value: keep it, dtype included (round trips).
            tensors[f"{flat}.alpha"] = stored
        else:
            tensors[f"{flat}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if module.magnitude_key:
            tensors[f"{flat}.dora_scale"] = adapter.source.get(module.magnitude_key)
        ranks.add(module.rank)
        alphas.add(alpha)
    for info in adapter.extra_tensors:
        tensors[info.key] = adapter.source.get(info.key)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in _STALE_METADATA}
    if adapter.format != NAME:
        metadata.update(provenance_metadata(flat_names, adapter.format,
                                            adapter.config if adapter.format == "peft" else None))
    metadata["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    metadata["ss_network_alpha"] = str(format_number(alphas.pop())) if len(alphas) == 1 else "Dynamic"
    with atomic_path(path, force) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return path
