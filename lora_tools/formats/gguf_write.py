"""Write an adapter as a llama.cpp GGUF LoRA (the layout gguf_lora.py describes), for one base model.

llama.cpp applies one ``adapter.lora.alpha`` to every tensor, scale = alpha / r. loratools keeps a scale per module
(rank/alpha patterns, rsLoRA's alpha/sqrt(r)); here alpha is the float32 value most modules' scale·r rounds to,
and a module whose scale·r differs gets the ratio baked into B (in float64, then cast), so that the scale llama.cpp
loads times B is the module's update. DoRA (a magnitude vector llama.cpp has no slot for), LoRA biases and layers
other than linear / token embedding are refused.

Storage: ``dtype`` None keeps each factor's float type (F64 as F32); fp32 / fp16 / bf16 cast; q8_0 quantizes
with gguf's own Q8_0 kernel where a row (GGUF's first dimension: ``in`` for lora_a, ``r`` for lora_b) is a
multiple of 32, and writes the other tensors as F16 (listed in ``GGUFWritten.fallbacks``).

The file is laid out by formats/gguf_layout.py; factors that go in unchanged are copied from the input file in
large runs, the others encoded one tensor at a time (formats/gguf_data.py), in the input's own tensor order.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.errors import BaseModelError, InvalidOptionError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats import gguf_names
from lora_tools.formats.gguf_data import TensorJob, finite_values, write_tensors
from lora_tools.formats.gguf_layout import FLOAT32, STRING, UINT32, TensorEntry, header_bytes, lay_out
from lora_tools.formats.gguf_names import GGUFBase
from lora_tools.tensorfile import torch_dtype

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
    jobs: list[TensorJob] = field(default_factory=list)  # every tensor, in file order, with its entry
    data_offset: int = 0  # where the data section starts
    size: int = 0  # bytes in the file


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
    tensor_map = gguf_names.block_name_map(base)
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


def _stored_type(adapter: Adapter, name: str) -> str:
    """The ggml type a factor keeps when no --dtype is given: its own float type (F64 as F32; F32 for both when
    A and B differ)."""
    module = adapter.modules[name]
    if module.update is not None:
        return "F32"
    a, b = module.a_info.dtype, module.b_info.dtype
    return _STORED.get(a if a == b else "F32", "F32")


def _factor(adapter: Adapter, name: str, role: str, exact: dict[str, tuple[Any, Any]]) -> Any:
    """B (out, r) for lora_b, A (r, in) for lora_a, as the file stores it (exact factors for LyCORIS updates)."""
    if name in exact:
        return exact[name][0 if role == "lora_b" else 1]
    module = adapter.modules[name]
    tensor = adapter.source.get((module.b_info if role == "lora_b" else module.a_info).key)
    if not tensor.is_floating_point():
        raise ModuleMismatchError(f"{adapter.path}: module {name}: LoRA factors must be floating point")
    return tensor.reshape(tensor.shape[0], -1)


def _shape_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _encode(tensor: Any, ggml_type: str) -> Any:
    """The bytes (flat uint8 array) of ``tensor`` stored as ``ggml_type``."""
    import gguf
    import torch

    if ggml_type == "Q8_0":
        array = gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        return array.reshape(-1)
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml_type]
    return tensor.to(dtype).contiguous().view(torch.uint8).numpy().reshape(-1)


def write_gguf(adapter: Adapter, path: Path, *, force: bool = False, base: GGUFBase | None = None,
               dtype: str | None = None, names: dict[str, str] | None = None,
               kinds: dict[str, str] | None = None, source_format: str | None = None,
               allow_nonfinite: bool = False,
               check: Callable[[TensorJob, Any, Any], None] | None = None) -> GGUFWritten:
    """Write ``adapter`` (modules ``names`` maps, default all) as a GGUF LoRA at ``path``, atomically; NaN/Inf
    factors are refused unless ``allow_nonfinite`` (a GGUF copy would spread a broken adapter).
    ``check(job, factor, bytes)`` sees each tensor that is not a stored copy before it is written: the factor it
    was made from (B (out, r) or A (r, in) as the input stores it) and the bytes that go into the file
    (formats/gguf_data.py)."""
    import numpy as np
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
    exact = {n: adapter.factors(n) for n in names if adapter.modules[n].update is not None}
    byte_range = getattr(adapter.source, "byte_range", None)
    specs: list[tuple[float, int, TensorJob]] = []
    for index, (name, target) in enumerate(names.items()):
        module = adapter.modules[name]
        shape_b, shape_a = ((tuple(exact[name][0].shape), tuple(exact[name][1].shape)) if name in exact
                            else (_shape_2d(module.b_info.shape), _shape_2d(module.a_info.shape)))
        _check_shape(adapter, base, name, target, module.kind, shape_b, shape_a)
        if float(np.float32(products[name])) != alpha:  # the alpha llama.cpp reads is a float32
            written.baked[name] = products[name] / alpha
        heads = gguf_names.heads_for(kinds.get(name, ""), base)
        if heads is None and base.permuted and kinds.get(name) in ("attn_q", "attn_k"):
            # A GGUF read without head counts kept llama.cpp's row order: its rows go back as they are.
            if adapter.format != "gguf":
                raise BaseModelError(f"{base.source}: no attention head count, needed to lay out {name}'s rows "
                                     "in llama.cpp's rotary order; pass a --base that has it")
        elif heads:
            if shape_b[0] % (2 * heads):
                raise BaseModelError(f"{base.source}: cannot lay out {name} for llama.cpp: {shape_b[0]} rows "
                                     f"do not split into {heads} heads of rotary pairs")
            written.permuted.append(name)
        stored = _stored_type(adapter, name)
        embedding = module.kind == "embedding"
        for role, shape, info, changed in (
                ("lora_a", shape_a[::-1] if embedding else shape_a, module.a_info, embedding),  # token_embd: A.T
                ("lora_b", shape_b, module.b_info, name in written.baked or bool(heads))):
            ggml_type = ggml_dtype or stored
            if ggml_type == "Q8_0" and shape[-1] % Q8_BLOCK:
                ggml_type = "F16"
                written.fallbacks.append(f"{target}.{role}")
            written.types[ggml_type] += 1
            job = TensorJob(TensorEntry(f"{target}.{role}", tuple(shape), ggml_type, 0), name, role, None,
                            info.dtype, heads=(heads or 0) if role == "lora_b" else 0,
                            transposed=embedding and role == "lora_a")
            where = byte_range(info.key) if byte_range is not None and name not in exact else None
            if where is not None and not changed and info.dtype == ggml_type:
                job.copy = where
            elif where is not None and info.dtype in _STORED:
                job.stored = where
            specs.append((where[0] if where is not None else math.inf, index, job))
    if all(math.isfinite(spec[0]) for spec in specs):
        specs.sort()  # the input's own order, so that unchanged tensors are copied in long contiguous runs
    entries = lay_out([(j.entry.name, j.entry.shape, j.entry.ggml_type) for _, _, j in specs])
    jobs = []
    for entry, (_, _, job) in zip(entries, specs, strict=True):
        job.entry = entry
        jobs.append(job)
    header = header_bytes(_metadata(adapter, base, alpha, names, source_format), entries)

    def encode(job: TensorJob, raw: Any) -> tuple[Any, Any]:
        if raw is not None:  # the factor's stored bytes, read by the data writer
            info = adapter.modules[job.module].b_info if job.role == "lora_b" else adapter.modules[job.module].a_info
            stored = torch.from_numpy(raw).view(torch_dtype(info.dtype))
            factor = tensor = stored.reshape(info.shape[0], -1)
        else:
            factor = tensor = _factor(adapter, job.module, job.role, exact)
        if not allow_nonfinite and not all_finite(tensor):
            raise ModuleMismatchError(f"{adapter.path}: module {job.module}: LoRA factors contain NaN or Inf; "
                                      "refusing to convert (pass --allow-nonfinite to copy them unchanged)")
        if job.role == "lora_b":
            if job.module in written.baked:
                tensor = tensor.to(torch.float64) * written.baked[job.module]
            if job.heads:
                tensor = gguf_names.permute_rows(tensor, job.heads)
        elif job.transposed:
            tensor = tensor.T
        return _encode(tensor, job.entry.ggml_type), factor

    with atomic_path(path, force) as tmp:
        fd = os.open(tmp, os.O_RDWR)  # no O_TRUNC: ext4 would then flush the whole file on close
        try:
            view, done = memoryview(header), 0
            while done < len(header):
                done += os.write(fd, view[done:])
            written.size = write_tensors(fd, len(header), tmp, jobs, getattr(adapter.source, "path", None), encode,
                                         not allow_nonfinite, adapter.path, check)
        finally:
            os.close(fd)
    written.data_offset, written.jobs = len(header), jobs
    return written


def _metadata(adapter: Adapter, base: GGUFBase, alpha: float, names: dict[str, str],
              source_format: str | None) -> list[tuple[str, int, Any]]:
    """The header's key/value pairs, in the order gguf's GGUFWriter wrote them for loratools before."""
    metadata: list[tuple[str, int, Any]] = [
        ("general.architecture", STRING, base.arch), ("general.type", STRING, "adapter"),
        ("adapter.type", STRING, "lora"), ("adapter.lora.alpha", FLOAT32, alpha),
        # Head counts let a reader undo the q/k permutation; llama.cpp ignores these keys in an adapter.
        (f"{base.arch}.block_count", UINT32, base.n_blocks)]
    if base.n_head:
        metadata += [(f"{base.arch}.attention.head_count", UINT32, base.n_head),
                     (f"{base.arch}.attention.head_count_kv", UINT32, base.n_head_kv or base.n_head)]
    metadata.append((gguf_names.KEY_MODULE_NAMES, STRING, json.dumps({t: n for n, t in names.items()})))
    if adapter.base_model or base.name:
        metadata.append((gguf_names.KEY_BASE_MODEL, STRING, str(adapter.base_model or base.name)))
    metadata.append((gguf_names.KEY_SOURCE_FORMAT, STRING, source_format or adapter.format))
    return metadata


def all_finite(tensor: Any) -> bool:
    """No NaN/Inf (formats/gguf_data.finite_values)."""
    return finite_values(tensor)


def _check_shape(adapter: Adapter, base: GGUFBase, name: str, target: str, kind: str, shape_b: tuple[int, ...],
                 shape_a: tuple[int, ...]) -> None:
    """The base tensor's GGUF shape is [in, out] for a linear layer and [dim, vocab] for token_embd; shapes are
    B's (out, r) and A's (r, in)."""
    if base.tensor_shapes is None:
        return
    expected = tuple(base.tensor_shapes[target])
    got = (shape_b[0], shape_a[1]) if kind == "embedding" else (shape_a[1], shape_b[0])
    if expected != got:
        raise ModuleMismatchError(f"{adapter.path}: module {name}: update is {list(got)} in GGUF order but "
                                  f"{target} of {base.source} is {list(expected)}; wrong base model?")
