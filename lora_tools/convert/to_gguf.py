"""``convert --to gguf``: any adapter -> a llama.cpp GGUF LoRA for its base, verified before it is moved into place.

Module names become the base's GGUF tensor names through gguf's own name map (kohya names are first resolved to
module paths as for any conversion); q/k B rows are permuted for Llama-family bases; scales llama.cpp cannot hold
are baked into B (formats/gguf_write.py). The file is written to a staging path, read back with our GGUF reader
(which undoes the permutation and dequantizes) and compared module by module with the input: factors bit for bit
where nothing was baked or cast, else the relative difference of the dense update scale·B·A against a bound set
by the storage type (the rounding of one element of that type, with room for accumulation).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.convert.run import canonical_names
from lora_tools.convert.verify import VerificationError
from lora_tools.formats import gguf_lora, gguf_write
from lora_tools.linalg.products import relative_difference

# Bound on the relative ΔW difference per stored type: exact float32 still moves by the rounding of a baked scale.
TOLERANCE = {"F32": 1e-6, "F16": 2e-3, "BF16": 1.6e-2, "Q8_0": 1.6e-2}


@torch.no_grad()
def verify_gguf(original: Adapter, written: Adapter, names: dict[str, str],
                kept: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Compare every module of ``written`` (read back) with ``original``; raise VerificationError on any loss."""
    bit_exact = 0
    worst, worst_module = 0.0, None
    if len(written.modules) != len(names):
        raise VerificationError(f"verification failed: {len(written.modules)} module(s) read back, "
                                f"{len(names)} written")
    for name in names:
        if name not in written.modules:
            raise VerificationError(f"verification failed: module {name} is missing from the output")
        module, out = original.modules[name], written.modules[name]
        if out.kind != module.kind:
            raise VerificationError(f"verification failed: module {name} is {module.kind} in the input but "
                                    f"{out.kind} in the output")
        if out.scale == module.scale and _same_factors(original, written, name, (kept or {}).get(name)):
            bit_exact += 1
            continue
        B, A = original.factors(name, torch.float64)
        B2, A2 = written.factors(name, torch.float64)
        diff = relative_difference(out.scale * B2, A2, module.scale * B, A)
        stored = {written.source.stored_type(out.a_info.key), written.source.stored_type(out.b_info.key)}
        bound = max(TOLERANCE.get(t, TOLERANCE["Q8_0"]) for t in stored)
        if not diff <= bound:
            raise VerificationError(f"verification failed: module {name} ({names[name]}): the rebuilt ΔW differs "
                                    f"from the input by {diff:.3g} (relative, bound {bound:g} for "
                                    f"{'/'.join(sorted(stored))}); nothing written")
        if diff > worst:
            worst, worst_module = diff, name
    return {"bit_exact_modules": bit_exact, "max_rel_difference": worst, "worst_module": worst_module}


def _same_factors(original: Adapter, written: Adapter, name: str, kept: tuple[Any, Any] | None) -> bool:
    """Factors read back equal to the input's as stored (``kept``: (B, A) already read from it)."""
    module, out = original.modules[name], written.modules[name]
    if module.update is not None:
        return False
    if kept is None:
        kept = tuple(original.source.get(info.key) for info in (module.b_info, module.a_info))  # type: ignore[assignment]
    for stored, info in zip(kept, (out.b_info, out.a_info), strict=True):  # type: ignore[arg-type]
        if not _same_bytes(stored.reshape(stored.shape[0], -1), written.source.get(info.key)):
            return False
    return True


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same values: a byte compare for the same dtype (several times faster than torch.equal on fp16)."""
    if x.shape != y.shape:
        return False
    if x.dtype != y.dtype:  # cast on writing (e.g. fp16 stored as F32): exact when the values are the same
        return torch.equal(x.to(torch.float64), y.to(torch.float64))
    return x.contiguous().view(torch.uint8).numpy().tobytes() == y.contiguous().view(torch.uint8).numpy().tobytes()


def convert_to_gguf(source: Path, output: Path, *, base: Path | str | None = None, dtype: str | None = None,
                    prefix: str | None = None, allow_partial: bool = False, force: bool = False,
                    input_format: str | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Convert the adapter at ``source`` to a GGUF LoRA at ``output`` for ``base`` (default: the adapter's)."""
    from lora_tools.atomic import move_into_place
    from lora_tools.convert.run import open_conversion

    gguf_write.parse_dtype(dtype)  # a bad --dtype fails before anything is read
    adapter, inputs = open_conversion(source, output, force, input_format, base)
    gguf_base = gguf_write.base_of(adapter, base)
    if adapter.format == "gguf":
        paths, name_source, warnings = {n: n for n in adapter.modules}, "GGUF file", []
    else:
        canonical, name_source, warnings = canonical_names(adapter, base=None, prefix=prefix,
                                                           allow_partial=allow_partial)
        paths = {n: c.path for n, c in canonical.items()}
    names, kinds, more = gguf_write.map_names(adapter, gguf_base, paths, allow_partial=allow_partial)
    warnings += more
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".convert", dir=output.parent))
    try:
        staged = staging / output.name
        written = gguf_write.write_gguf(adapter, staged, base=gguf_base, dtype=dtype, names=names, kinds=kinds,
                                       allow_nonfinite=allow_nonfinite, keep_factors=True)
        readback = gguf_lora.read(staged)
        checks = verify_gguf(adapter, readback, names, written.factors)
        written.factors.clear()
        move_into_place(staged, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if written.fallbacks:
        example = written.fallbacks[0]
        warnings.append(f"{len(written.fallbacks)} tensor(s) written as F16, not Q8_0: their rows are not a "
                        f"multiple of 32 values (e.g. {example})")
    if written.baked:
        warnings.append(f"{len(written.baked)} module(s) have a scale llama.cpp's single alpha/r cannot express "
                        f"(rank/alpha patterns, rsLoRA): the factor was multiplied into B (e.g. "
                        f"{next(iter(written.baked))} x{next(iter(written.baked.values())):.6g})")
    return {
        "input": str(source), "input_format": adapter.format, "output": str(output), "output_format": "gguf",
        "num_modules": len(names), "name_source": f"{name_source} -> gguf {gguf_base.arch} tensor names "
        f"(base: {gguf_base.source})", **checks, "mapping": names,
        "gguf": {"architecture": gguf_base.arch, "alpha": written.alpha, "types": dict(written.types),
                 "baked_modules": len(written.baked), "permuted_modules": len(written.permuted),
                 "q8_0_fallbacks": written.fallbacks},
        "warnings": warnings + list(readback.warnings),
    }
