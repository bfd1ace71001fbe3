"""Fold an adapter into its base model's weights: W = W0 + s·B·A (DoRA: m·(W0 + s·B·A)/‖W0 + s·B·A‖ per output).

The output has the base's own layout — the same safetensors shards under the same names, the same keys and
dtypes, the other files of a model folder (config, tokenizer, shard index) copied — with only the adapted weights
changed; every other tensor is copied through bit for bit. Shards are processed one at a time, so peak memory is
one shard. The update is added in the layer's own layout: GPT-2's Conv1D stores (in, out) and gets ΔWᵀ,
embeddings likewise, conv kernels get ΔW reshaped to (out, in, kh, kw) — the same arithmetic as PEFT's
``merge_and_unload`` (float32, cast back to the stored dtype).

Tensors an adapter carries whole (PEFT's ``modules_to_save`` copies such as a classification ``score`` /
``classifier`` head, saved embedding layers) *replace* the base's tensor of the same name, cast to its dtype:
that is what ``merge_and_unload`` keeps (the trained copy, not the base's untrained head). PEFT saves them as
``base_model.model.<module>.<param>`` (``get_peft_model_state_dict`` in peft/utils/save_and_load.py drops the
``modules_to_save.<adapter>.`` part of the in-memory name); files holding the in-memory naming
``<module>.modules_to_save.<adapter>.<param>`` are read the same way.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import BaseModelError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats.peft import PREFIX as PEFT_PREFIX
from lora_tools.tensorfile import TensorInfo, read_safetensors_header

logger = logging.getLogger(__name__)


def weight_files(base: Path) -> list[Path]:
    """The safetensors files of a model: the file itself, or every ``*.safetensors`` in a model folder."""
    if not base.exists():
        raise BaseModelError(f"{base}: base model not found")
    if base.is_file():
        return [base]
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{base}: no *.safetensors weights in this folder (save the model with "
                             "save_pretrained(safe_serialization=True))")
    return files


def base_keys(files: list[Path]) -> dict[str, Path]:
    """Tensor key -> the shard that holds it."""
    keys: dict[str, Path] = {}
    for path in files:
        infos, _ = read_safetensors_header(path)
        for key in infos:
            keys[key] = path
    return keys


def match_weight_key(name: str, keys: dict[str, Path]) -> str | None:
    """The base key of module ``name``'s weight, tolerating a prefix on either side (a task-head model saved as
    ``transformer.h.0...`` vs an adapter trained on ``h.0...``, and the reverse); only a unique match counts."""
    return match_base_key(f"{name}.weight", keys)


def match_base_key(tensor_name: str, keys: dict[str, Path]) -> str | None:
    """The base key of tensor ``tensor_name`` (``<module path>.<param>``): exact, else the unique key that ends
    with it or that it ends with, at a dot boundary."""
    if tensor_name in keys:
        return tensor_name
    param = tensor_name.rsplit(".", 1)[-1]
    candidates = [k for k in keys if k.rsplit(".", 1)[-1] == param and (k.endswith("." + tensor_name) or
                                                                           tensor_name.endswith("." + k))]
    return candidates[0] if len(candidates) == 1 else None


# PEFT's in-memory name of a modules_to_save copy: <module>.modules_to_save.<adapter>.<param>; the base's own copy
# beside it is <module>.original_module.<param>.
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")
_ORIGINAL_COPY = ".original_module."


def head_tensor_name(key: str) -> str | None:
    """The base tensor an adapter's whole-tensor copy (a ``modules_to_save`` head) replaces; None for PEFT's
    ``original_module`` copies, which hold the base's own tensor and are not applied by ``merge_and_unload``."""
    if _ORIGINAL_COPY in key:
        return None
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return _SAVED_COPY.sub("", name)


def head_targets(adapter: Adapter, keys: dict[str, Path], base: Path,
                 module_keys: dict[str, LoraModule]) -> dict[str, TensorInfo]:
    """Base key -> the adapter tensor that replaces it; refuses copies with no (unique) base tensor."""
    targets: dict[str, TensorInfo] = {}
    for info in adapter.extra_tensors:
        name = head_tensor_name(info.key)
        if name is None:
            continue
        key = match_base_key(name, keys)
        if key is None:
            raise ModuleMismatchError(
                f"{adapter.path}: tensor {info.key} (a modules_to_save copy or other non-LoRA tensor) has no "
                f"(unique) tensor {name} in the base model {base}; merge_and_unload would apply it, so folding "
                "without it would differ: is this the right base model?")
        if key in targets or key in module_keys:
            other = targets[key].key if key in targets else f"the LoRA module {module_keys[key].name}"
            raise ModuleMismatchError(f"{adapter.path}: tensors {info.key} and {other} both replace base tensor "
                                      f"{key}; an adapter file holding several adapters is not supported")
        targets[key] = info
    return targets


@torch.no_grad()
def head_weight(adapter: Adapter, info: TensorInfo, weight: torch.Tensor) -> torch.Tensor:
    """The adapter's copy of a base tensor, shape-checked, in the base tensor's dtype."""
    if tuple(weight.shape) != tuple(info.shape):
        raise ModuleMismatchError(
            f"{adapter.path}: tensor {info.key} has shape {list(info.shape)} but the base tensor it replaces has "
            f"shape {list(weight.shape)}; was the head trained for another number of labels, or on another base?")
    copy = adapter.source.get(info.key)
    if copy.is_floating_point() and not bool(torch.isfinite(copy).all()):
        raise ModuleMismatchError(f"{adapter.path}: tensor {info.key} contains NaN or Inf; refusing to fold it "
                                  "into the base weights")
    return copy.to(weight.dtype).clone()


def _lycoris_weight_decompose(merged: torch.Tensor, scale: torch.Tensor, on_out: bool) -> torch.Tensor:
    """LyCORIS' DoRA (``dora_scale``, its weight decomposition): W' = m · W / (‖W‖ + eps), the norm per output row
    (``wd_on_out``, scale (out, 1, ...)) or per input column over outputs and kernel (scale (1, in, ...)); as its
    ``weight_decompose`` computes it, eps = float32's machine epsilon. A (1, in) scale read as PEFT's per-output
    magnitude would rescale the wrong axis (silently, on a square layer)."""
    eps = torch.finfo(torch.float32).eps
    if on_out:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.ndim - 1))
    else:
        columns = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)  # (in,)
        norm = columns.reshape(1, merged.shape[1], *[1] * (merged.ndim - 2))
    return merged * (scale.reshape(norm.shape) / (norm + eps))


@torch.no_grad()
def folded_weight(adapter: Adapter, module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW in the base weight's layout and dtype (DoRA applied as DoRA)."""
    if tuple(weight.shape) != tuple(module.weight_shape):
        raise ModuleMismatchError(
            f"{adapter.path}: module {module.name}: the adapter's update has shape {list(module.weight_shape)} but the base "
            f"weight has shape {list(weight.shape)}; is this the base model the adapter was trained on?")
    delta = adapter.delta_weight(module.name, torch.float32)  # base layout
    if not bool(torch.isfinite(delta).all()):
        # folding would turn a working base weight into NaN/Inf: refuse, there is no sensible partial fold
        raise ModuleMismatchError(f"{adapter.path}: module {module.name}: the update s·B·A contains NaN or Inf; "
                                  "refusing to fold it into the base weights")
    merged = weight.to(torch.float32) + delta
    if module.magnitude_key and ("dora_in" in module.flags or "dora_out" in module.flags):
        merged = _lycoris_weight_decompose(merged, adapter.source.get(module.magnitude_key).to(torch.float32),
                                           on_out="dora_out" in module.flags)
    elif module.magnitude_key:
        magnitude = adapter.source.get(module.magnitude_key).to(torch.float32).flatten()  # (out,)
        # DoRA (Liu et al. 2024): rescale each output's row of W0 + ΔW to the learned magnitude; in PEFT's layout
        # the output axis is 0 for Linear/conv and 1 for Conv1D/embeddings.
        as_rows = merged.T if module.kind in ("conv1d", "embedding") else merged.reshape(merged.shape[0], -1)
        norms = as_rows.norm(p=2, dim=1)
        factor = magnitude / norms
        if module.kind in ("conv1d", "embedding"):
            merged = merged * factor[None, :]
        else:
            merged = merged * factor.reshape(-1, *([1] * (merged.ndim - 1)))
    return merged.to(weight.dtype)


def fold(adapter: Adapter, base: Path, output: Path, *, force: bool = False) -> dict[str, Any]:
    """Write ``base`` with ``adapter`` folded in to ``output`` (a file for a file base, a folder for a folder)."""
    from safetensors import safe_open

    from lora_tools.atomic import atomic_dir, atomic_path, check_not_input, check_output
    from lora_tools.formats.common import write_safetensors

    files = weight_files(base)
    check_not_input(output, (base,))
    check_output(output, force, (base,))
    keys = base_keys(files)
    targets: dict[str, LoraModule] = {}
    unmatched: list[str] = []
    for name, module in adapter.modules.items():
        if module.bias_key:
            raise UnsupportedAdapterError(f"{adapter.path}: module {name} has a LoRA bias (lora_B.bias); folding "
                                          "it is not supported")
        key = match_weight_key(name, keys)
        if key is None:
            unmatched.append(name)
        else:
            targets[key] = module
    if unmatched:
        raise ModuleMismatchError(f"{base}: {len(unmatched)} adapter module(s) have no (unique) weight in the base "
                                  f"model, e.g. {unmatched[0]}; is this the right base model?")
    heads = head_targets(adapter, keys, base, targets)
    copied = total = 0

    def write_shard(source: Path, destination: Path) -> None:
        nonlocal copied, total
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key in targets:
                    tensor = folded_weight(adapter, targets[key], tensor)
                elif key in heads:
                    tensor = head_weight(adapter, heads[key], tensor)
                else:
                    copied += 1
                tensors[key] = tensor
                total += 1
        write_safetensors(tensors, destination, metadata)

    if base.is_file():
        with atomic_path(output, force) as tmp:
            write_shard(base, tmp)
    else:
        with atomic_dir(output, force) as tmp:
            for entry in sorted(base.iterdir()):
                if entry.suffix == ".safetensors":
                    write_shard(entry, tmp / entry.name)
                elif entry.is_file():
                    shutil.copy2(entry, tmp / entry.name)  # config, tokenizer, shard index: the layout stays
    return {"adapter": str(adapter.path), "base": str(base), "output": str(output), "num_modules": len(targets),
            "num_tensors": total, "num_copied": copied,
            "heads": {key: info.key for key, info in sorted(heads.items())}, "warnings": []}
