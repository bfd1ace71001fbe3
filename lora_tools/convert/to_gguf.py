"""``convert --to gguf``: any adapter -> a llama.cpp GGUF LoRA for its base, verified before it is moved into place.

Module names become the base's GGUF tensor names through gguf's own name map (kohya names are first resolved to
module paths as for any conversion); q/k B rows are permuted for Llama-family bases; scales llama.cpp cannot hold
are baked into B (formats/gguf_write.py). The file is written to a staging path and verified before it is moved into place:
its header is parsed back (names, alpha, the tensor table and every data offset, the file's size), and every
tensor that changed on the way (rows reordered, a scale baked in, a cast, Q8_0) is decoded from the very bytes
that are written and compared with the input (verify_gguf); the others are the input's stored bytes, copied
unchanged (formats/gguf_data.py). gguf's own reader and llama.cpp read these files in the tests.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.convert.run import canonical_names
from lora_tools.convert.verify import VerificationError
from lora_tools.formats import gguf_names, gguf_write
from lora_tools.formats.gguf_data import same_bytes
from lora_tools.linalg.products import relative_difference

# Bound on the relative ΔW difference per stored type: exact float32 still moves by the rounding of a baked scale.
TOLERANCE = {"F32": 1e-6, "F16": 2e-3, "BF16": 1.6e-2, "Q8_0": 1.6e-2}


def check_header(path: Path, written: gguf_write.GGUFWritten) -> None:
    """The written file's header, parsed back from the file (model/gguf_file.py, a reader written apart from the
    writer), says what was meant: an adapter for the base, our alpha and names, and the tensor table and data
    offsets the data was written at; the file ends where the last tensor does."""
    from lora_tools.formats.gguf_layout import TYPE_IDS, padded
    from lora_tools.model.gguf_file import read_gguf_info

    info = read_gguf_info(path)
    meta = info.metadata
    expected = {"general.type": "adapter", "general.architecture": written.base.arch, "adapter.type": "lora",
                gguf_names.KEY_MODULE_NAMES: json.dumps({t: n for n, t in written.names.items()})}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise VerificationError(f"verification failed: the written header has {key} = "
                                    f"{str(meta.get(key))[:80]!r}, expected {value[:80]!r}; nothing written")
    if meta.get("adapter.lora.alpha") != written.alpha:
        raise VerificationError(f"verification failed: the written adapter.lora.alpha is "
                                f"{meta.get('adapter.lora.alpha')!r}, expected {written.alpha!r}; nothing written")
    table = [(t.name, t.shape, t.type_id, t.offset) for t in info.tensors]
    planned = [(j.entry.name, j.entry.gguf_shape, TYPE_IDS[j.entry.ggml_type], j.entry.offset) for j in written.jobs]
    if table != planned or info.data_offset != written.data_offset:
        wrong = next((f"{p[0]}: {list(t)} in the file, {list(p)} planned" for t, p in zip(table, planned,
                                                                                          strict=False) if t != p),
                     f"{len(table)} tensors in the file, {len(planned)} planned; data at {info.data_offset}, "
                     f"planned {written.data_offset}")
        raise VerificationError(f"verification failed: the written tensor table differs ({wrong}); nothing written")
    last = written.jobs[-1].entry if written.jobs else None
    end = written.data_offset + (last.offset + padded(last.nbytes) if last else 0)
    if path.stat().st_size != end or written.size != end:
        raise VerificationError(f"verification failed: the written file has {path.stat().st_size} bytes, the "
                                f"layout {end}; nothing written")


def decode(raw: Any, entry: Any) -> torch.Tensor:
    """A tensor's bytes (a uint8 array) as values in its row-major shape (Q8_0 dequantized with gguf's own
    kernel); plain types share ``raw``'s memory."""
    if entry.ggml_type == "Q8_0":
        import gguf

        return torch.from_numpy(gguf.quants.dequantize(raw.reshape(entry.shape[0], -1),
                                                       gguf.GGMLQuantizationType.Q8_0)).reshape(entry.shape)
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[entry.ggml_type]
    return torch.from_numpy(raw).view(dtype).reshape(entry.shape)  # shares raw's memory


class TensorChecks:
    """Each tensor that is not a stored copy, checked as it goes to the file (gguf_write's ``check``): the bytes
    written are decoded and put back in the adapter's layout (q/k rows in transformers' order, token_embd's lora_a
    transposed back). Equal to the input's factor: exact. Otherwise (a scale baked in, a cast, Q8_0) the decoded
    factor is kept for the module's ΔW comparison."""

    def __init__(self) -> None:
        self.exact: set[tuple[str, str]] = set()
        self.decoded: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, job: Any, factor: torch.Tensor, data: Any) -> None:
        value = decode(data, job.entry)
        if job.heads:
            value = gguf_names.permute_rows(value, job.heads, inverse=True)
        elif job.transposed:
            value = value.T
        if value.shape != factor.shape:
            raise VerificationError(f"verification failed: {job.entry.name} decodes as {list(value.shape)}, "
                                    f"the factor is {list(factor.shape)}; nothing written")
        if value.dtype == factor.dtype:
            exact = same_bytes(value.contiguous().view(torch.uint8).numpy().reshape(-1),
                               factor.contiguous().view(torch.uint8).numpy().reshape(-1))
        else:  # cast on writing (e.g. fp16 stored as F32): exact when the values are the same
            exact = torch.equal(value.to(torch.float64), factor.to(torch.float64))
        if exact:
            self.exact.add((job.module, job.role))
        else:  # a copy of its own: a view would keep the encoded bytes alive
            self.decoded[(job.module, job.role)] = value.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def verify_gguf(original: Adapter, path: Path, written: gguf_write.GGUFWritten,
                tensors: TensorChecks) -> dict[str, Any]:
    """Check the written file against ``original``; raise VerificationError on any loss.

    The changed tensors were decoded from the bytes written (formats/gguf_data.py, TensorChecks), the copied ones
    are the input's stored bytes, and the header is parsed back here (check_header: every tensor's offset and
    size, the file's end). A module is bit-exact when both factors are stored copies or decoded equal to the
    input's, and the scale llama.cpp applies (alpha / r, r = lora_b's first GGUF dimension) equals ours; otherwise
    the relative difference of scale·B·A against the input's must stay under a bound set by the storage type (the
    rounding of one element of that type, with room for accumulation).
    """
    check_header(path, written)
    jobs: dict[str, dict[str, Any]] = {}
    for job in written.jobs:
        jobs.setdefault(job.module, {})[job.role] = job
    bit_exact = 0
    worst, worst_module = 0.0, None
    for name, target in written.names.items():
        module, pair = original.modules[name], jobs[name]
        rank = pair["lora_b"].entry.shape[1]
        scale = written.alpha / rank if written.alpha else 1.0  # llama.cpp's rule, as our reader applies it
        same = {role: job.copy is not None or (name, role) in tensors.exact for role, job in pair.items()}
        if scale == module.scale and all(same.values()):
            bit_exact += 1
            continue
        B, A = original.factors(name, torch.float64)
        B2, A2 = (tensors.decoded.pop((name, role), None) for role in ("lora_b", "lora_a"))
        B2 = B if B2 is None else B2.to(torch.float64)  # a factor that is not decoded was written exactly
        A2 = A if A2 is None else A2.to(torch.float64)
        diff = relative_difference(scale * B2, A2, module.scale * B, A)
        stored = {pair[role].entry.ggml_type for role in pair}
        bound = max(TOLERANCE.get(t, TOLERANCE["Q8_0"]) for t in stored)
        if not diff <= bound:
            raise VerificationError(f"verification failed: module {name} ({target}): the rebuilt ΔW differs "
                                    f"from the input by {diff:.3g} (relative, bound {bound:g} for "
                                    f"{'/'.join(sorted(stored))}); nothing written")
        if diff > worst:
            worst, worst_module = diff, name
    return {"bit_exact_modules": bit_exact, "max_rel_difference": worst, "worst_module": worst_module}


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
        tensors = TensorChecks()
        written = gguf_write.write_gguf(adapter, staged, base=gguf_base, dtype=dtype, names=names, kinds=kinds,
                                       allow_nonfinite=allow_nonfinite, check=tensors)
        checks = verify_gguf(adapter, staged, written, tensors)
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
        "warnings": warnings,
    }
