"""Write an adapter as a llama.cpp GGUF LoRA (the layout gguf_lora.py describes), for one base model.

llama.cpp applies one ``adapter.lora.alpha`` to every tensor, scale = alpha / r. loratools keeps a scale per module
(rank/alpha patterns, rsLoRA's alpha/sqrt(r)); here alpha is the float32 value most modules' scale·r rounds to,
and a module whose scale·r differs gets the ratio baked into B (in float64, then cast), so that the scale llama.cpp
loads times B is the module's update. DoRA (a magnitude vector llama.cpp has no slot for), LoRA biases and layers
other than linear / token embedding are refused.

Storage: ``dtype`` None keeps each factor's float type (F64 as F32); fp32 / fp16 / bf16 cast; q8_0 quantizes
with gguf's own Q8_0 kernel where a row (GGUF's first dimension: ``in`` for lora_a, ``r`` for lora_b) is a
multiple of 32, and writes the other tensors as F16 (listed in ``GGUFWritten.fallbacks``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.errors import BaseModelError, InvalidOptionError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats import gguf_names
from lora_tools.formats.gguf_names import GGUFBase

# --dtype spellings -> ggml type names (our usual ones plus llama.cpp's).
DTYPES = {"fp32": "F32", "float32": "F32", "f32": "F32", "fp16": "F16", "float16": "F16", "f16": "F16",
          "bf16": "BF16", "bfloat16": "BF16", "q8_0": "Q8_0"}
_STORED = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F32"}
Q8_BLOCK = 32


@dataclass
class GGUFWritten:
    """What was written, for the report and the verification."""

    path: Path
    base: GGUFBase
    alpha: float
    names: dict[str, str]  # module name -> GGUF base tensor name (with .weight)
    baked: dict[str, float] = field(default_factory=dict)  # module -> factor multiplied into B
    permuted: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # q8_0 tensors written as F16
    types: Counter[str] = field(default_factory=Counter)
    # module -> (B, A) as the input stores them (2-D), kept for the verification when asked (keep_factors)
    factors: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def parse_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    found = DTYPES.get(dtype.lower())
    if found is None:
        raise InvalidOptionError(f"unknown --dtype {dtype!r} for GGUF; choose fp32, fp16, bf16 or q8_0")
    return found


def base_of(adapter: Adapter, base: Path | str | None) -> GGUFBase:
    """The base a GGUF LoRA is written for: --base, else (a GGUF input) the file's own header, else the adapter's
    base_model_name_or_path through the offline resolver."""
    if base is None and adapter.format == "gguf":
        arch = adapter.metadata.get("general.architecture", "")
        def number(key: str) -> int | None:
            text = adapter.metadata.get(key, "")
            return int(text) if text.isdigit() and int(text) > 0 else None
        heads = number(f"{arch}.attention.head_count")
        blocks = number(f"{arch}.block_count") or 1 + max(
            (int(n.split(".")[2]) for n in adapter.modules if n.startswith("model.layers.")
             and n.split(".")[2].isdigit()), default=0)
        gguf_names.model_arch(arch, str(adapter.path))
        return GGUFBase(arch, blocks, heads, number(f"{arch}.attention.head_count_kv") or heads, str(adapter.path),
                        name=adapter.base_model)
    return gguf_names.resolve_base(base, adapter.base_model, str(adapter.path))


def map_names(adapter: Adapter, base: GGUFBase, module_paths: dict[str, str], *,
              allow_partial: bool = False) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(module -> GGUF tensor name, module -> tensor kind, warnings); unmapped modules refused unless
    ``allow_partial`` (then dropped and listed)."""
    tensor_map = gguf_names.name_map(base)
    names: dict[str, str] = {}
    kinds: dict[str, str] = {}
    unmapped: list[str] = []
    for name, path in module_paths.items():
        found = gguf_names.gguf_tensor_name(tensor_map, path)
        if found is None:
            unmapped.append(name)
            continue
        names[name], kinds[name] = found
    if base.tensor_shapes is not None:
        for name in list(names):
            if names[name] not in base.tensor_shapes:
                unmapped.append(f"{name} (-> {names.pop(name)}, which {base.source} does not have)")
    warnings: list[str] = []
    if unmapped:
        shown = "; ".join(unmapped[:4]) + (f"; ... (+{len(unmapped) - 4} more)" if len(unmapped) > 4 else "")
        if not allow_partial or not names:
            raise ModuleMismatchError(f"{adapter.path}: {len(unmapped)} module(s) have no tensor in a {base.arch} "
                                      f"GGUF model ({shown}); pass the right --base, or --allow-partial to drop "
                                      "them")
        warnings.append(f"{len(unmapped)} module(s) dropped (--allow-partial), no GGUF tensor: {shown}")
    seen: dict[str, str] = {}
    for name, target in names.items():
        if target in seen:
            raise ModuleMismatchError(f"{adapter.path}: modules {seen[target]} and {name} both map to {target}")
        seen[target] = name
    return names, {n: kinds[n] for n in names}, warnings


def choose_alpha(products: list[float]) -> float:
    """The float32 value most modules' scale·r equals (so that their B is written untouched); 1 if all are 0."""
    import numpy as np

    counts = Counter(float(np.float32(p)) for p in products if p != 0.0)
    return counts.most_common(1)[0][0] if counts else 1.0


def _check_module(adapter: Adapter, name: str) -> None:
    module = adapter.modules[name]
    if module.magnitude_key:
        raise UnsupportedAdapterError(
            f"{adapter.path}: module {name} is DoRA: llama.cpp's LoRA adds scale·B·A only and has no magnitude "
            "vector, so the GGUF would load as a different model; fold it (loratools fold) or keep PEFT")
    if module.bias_key:
        raise UnsupportedAdapterError(f"{adapter.path}: module {name} has a LoRA bias (lora_B.bias), which a GGUF "
                                      "LoRA cannot hold")
    if module.kind not in ("linear", "embedding"):
        raise UnsupportedAdapterError(f"{adapter.path}: module {name} is a {module.kind} layer; llama.cpp LoRA "
                                      "covers linear layers and the token embedding")


def _factors(adapter: Adapter, name: str) -> tuple[Any, Any, str]:
    """(B (out, r), A (r, in), stored ggml type) as the file holds them (exact factors for LyCORIS updates)."""
    module = adapter.modules[name]
    if module.update is not None:
        B, A = adapter.factors(name)
        return B, A, "F32"
    a = adapter.source.get(module.a_info.key)
    b = adapter.source.get(module.b_info.key)
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ModuleMismatchError(f"{adapter.path}: module {name}: LoRA factors must be floating point")
    stored = _STORED.get(module.a_info.dtype if module.a_info.dtype == module.b_info.dtype else "F32", "F32")
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), stored


def _encode(tensor: Any, ggml_type: str) -> tuple[Any, Any]:
    """(numpy array, raw ggml type or None) as GGUFWriter.add_tensor takes them; numpy shape = row-major shape."""
    import gguf
    import torch

    if ggml_type == "F32":
        return tensor.to(torch.float32).contiguous().numpy(), None
    if ggml_type == "F16":
        return tensor.to(torch.float16).contiguous().numpy(), None
    if ggml_type == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    quantized = gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return quantized, gguf.GGMLQuantizationType.Q8_0


def write_gguf(adapter: Adapter, path: Path, *, force: bool = False, base: GGUFBase | None = None,
               dtype: str | None = None, names: dict[str, str] | None = None,
               kinds: dict[str, str] | None = None, source_format: str | None = None,
               allow_nonfinite: bool = False, keep_factors: bool = False) -> GGUFWritten:
    """Write ``adapter`` (modules ``names`` maps, default all) as a GGUF LoRA at ``path``, atomically; NaN/Inf
    factors are refused unless ``allow_nonfinite`` (a GGUF copy would spread a broken adapter)."""
    import gguf
    import torch

    from lora_tools.atomic import atomic_path

    ggml_dtype = parse_dtype(dtype)
    base = base or base_of(adapter, None)
    if names is None:
        names, kinds, _ = map_names(adapter, base, {n: n for n in adapter.modules})
    kinds = kinds or {}
    for name in names:
        _check_module(adapter, name)
    products = {n: adapter.modules[n].scale * adapter.modules[n].rank for n in names}
    alpha = choose_alpha(list(products.values()))
    written = GGUFWritten(path, base, alpha, dict(names))
    with atomic_path(path, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        # Head counts let a reader undo the q/k permutation; llama.cpp ignores these keys in an adapter.
        writer.add_uint32(f"{base.arch}.block_count", base.n_blocks)
        if base.n_head:
            writer.add_uint32(f"{base.arch}.attention.head_count", base.n_head)
            writer.add_uint32(f"{base.arch}.attention.head_count_kv", base.n_head_kv or base.n_head)
        writer.add_string(gguf_names.KEY_MODULE_NAMES, json.dumps({t: n for n, t in names.items()}))
        if adapter.base_model or base.name:
            writer.add_string(gguf_names.KEY_BASE_MODEL, str(adapter.base_model or base.name))
        writer.add_string(gguf_names.KEY_SOURCE_FORMAT, source_format or adapter.format)
        for name, target in names.items():
            module = adapter.modules[name]
            B, A, stored = _factors(adapter, name)
            if keep_factors:
                written.factors[name] = (B, A)
            if not allow_nonfinite and not (all_finite(B) and all_finite(A)):
                raise ModuleMismatchError(f"{adapter.path}: module {name}: LoRA factors contain NaN or Inf; refusing "
                                          "to convert (pass --allow-nonfinite to copy them unchanged)")
            _check_shape(adapter, base, name, target, module.kind, B, A)
            wanted = products[name] / alpha
            if float(torch.tensor(products[name], dtype=torch.float32)) != alpha:
                B = (B.to(torch.float64) * wanted)
                written.baked[name] = wanted
            heads = gguf_names.heads_for(kinds.get(name, ""), base)
            if heads is None and base.permuted and kinds.get(name) in ("attn_q", "attn_k"):
                # A GGUF read without head counts kept llama.cpp's row order: its rows go back as they are.
                if adapter.format != "gguf":
                    raise BaseModelError(f"{base.source}: no attention head count, needed to lay out {name}'s rows "
                                         "in llama.cpp's rotary order; pass a --base that has it")
            elif heads:
                if B.shape[0] % (2 * heads):
                    raise BaseModelError(f"{base.source}: cannot lay out {name} for llama.cpp: {B.shape[0]} rows "
                                         f"do not split into {heads} heads of rotary pairs")
                B = gguf_names.permute_rows(B, heads)
                written.permuted.append(name)
            lora_a = A.T if module.kind == "embedding" else A  # token_embd: lora_a holds A transposed
            for tensor, suffix in ((lora_a, ".lora_a"), (B, ".lora_b")):
                ggml_type = ggml_dtype or stored
                if ggml_type == "Q8_0" and tensor.shape[-1] % Q8_BLOCK:
                    ggml_type = "F16"
                    written.fallbacks.append(f"{target}{suffix}")
                array, raw = _encode(tensor, ggml_type)
                writer.add_tensor(f"{target}{suffix}", array, raw_dtype=raw)
                written.types[ggml_type] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return written


def all_finite(tensor: Any) -> bool:
    """No NaN/Inf: their float64 sum is finite (one reduction, ~4x faster than isfinite on fp16; float64 cannot
    overflow on sums of float32/bf16 values)."""
    import torch

    return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))


def _check_shape(adapter: Adapter, base: GGUFBase, name: str, target: str, kind: str, B: Any, A: Any) -> None:
    """The base tensor's GGUF shape is [in, out] for a linear layer and [dim, vocab] for token_embd."""
    if base.tensor_shapes is None:
        return
    expected = tuple(base.tensor_shapes[target])
    got = (B.shape[0], A.shape[1]) if kind == "embedding" else (A.shape[1], B.shape[0])
    if expected != got:
        raise ModuleMismatchError(f"{adapter.path}: module {name}: update is {list(got)} in GGUF order but "
                                  f"{target} of {base.source} is {list(expected)}; wrong base model?")
