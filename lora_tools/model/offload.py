"""``--offload auto|never|always`` and ``--max-memory``: whether a base runs whole or block by block.

The decision needs only the checkpoint's headers (no tensor is read; for a ``.gguf`` base, its tensor table: the
elements of each tensor, whatever its quantized storage): the model's bytes in the forward dtype
against the memory budget (``--max-memory``, else what the device has free: MemAvailable on CPU, free memory on
CUDA). Streaming holds the embeddings, one decoder block and the carried hidden states; the plan says so in
numbers before anything is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import InvalidOptionError
from lora_tools.model.stream import STREAMABLE, StreamError, is_gguf_file, open_checkpoint

MODES = ("auto", "never", "always")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class OffloadPlan:
    mode: str
    stream: bool
    reason: str
    model_bytes: int | None = None  # all weights in the forward dtype
    blocks: int | None = None
    block_bytes: int | None = None  # the largest decoder block in the forward dtype
    resident_bytes: int | None = None  # what streaming keeps loaded throughout (embeddings)
    activation_bytes: int | None = None  # carried hidden states (estimate)
    budget_bytes: int | None = None
    shards: int | None = None

    @property
    def expected_peak(self) -> int | None:
        if self.model_bytes is None:
            return None
        weights = (self.resident_bytes + self.block_bytes) if self.stream else self.model_bytes
        return weights + (self.activation_bytes or 0)

    def describe(self) -> str:
        """One line for stderr."""
        if self.model_bytes is None:
            return f"offload: whole model in memory ({self.reason})"
        peak = f"expected peak ≈ {_size(self.expected_peak)} of weights and hidden states, plus statistics"
        if self.stream:
            return (f"offload: streaming {self.blocks} blocks of {_size(self.block_bytes)} from {self.shards} "
                    f"shard(s) (model {_size(self.model_bytes)}, budget {_size(self.budget_bytes)}; "
                    f"{self.reason}); {peak}")
        return (f"offload: whole model in memory ({_size(self.model_bytes)}, budget {_size(self.budget_bytes)}; "
                f"{self.reason}); {peak}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "expected_peak_bytes": self.expected_peak}


def parse_memory(text: str | None) -> int | None:
    """'4GB', '1.5GiB', '800MB', '123456' -> bytes."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InvalidOptionError(f"--max-memory: {text!r} is not a size (e.g. 4GB, 1.5GiB, 800MB)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidOptionError(f"--max-memory must be positive, got {text!r}")
    return value


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def plan_offload(base: Path, mode: str, max_memory: int | None, device: torch.device, dtype: torch.dtype,
                 tokens: int = 0) -> OffloadPlan:
    """Decide for the base at ``base`` (a folder or a .gguf file); ``tokens``: the sequences' tokens (padded)
    whose hidden states a streamed run carries."""
    if mode not in MODES:
        raise InvalidOptionError(f"--offload: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "never":
        return OffloadPlan(mode, False, "--offload never")
    gguf = is_gguf_file(base)
    if not base.is_dir() and not gguf:
        if mode == "always":
            raise StreamError(f"{base}: --offload always streams safetensors checkpoints or .gguf model files "
                              f"block by block; a {base.suffix or 'single-file'} base is loaded whole "
                              "(use --offload auto|never)")
        return OffloadPlan(mode, False, f"{base.suffix or 'file'} bases load whole")
    try:
        checkpoint = open_checkpoint(base)  # headers only; a GGUF's sizes come from its tensor shapes
    except StreamError:
        if mode == "always":
            raise
        return OffloadPlan(mode, False, f"no {'GGUF' if gguf else 'safetensors'} checkpoint to stream")
    streamable = checkpoint.model_type in STREAMABLE
    if mode == "always" and not streamable:
        raise StreamError(f"{base}: cannot stream a {checkpoint.model_type!r} model with --offload always "
                          f"(streaming supports decoder-only {', '.join(STREAMABLE)})")
    element = torch.empty((), dtype=dtype).element_size()
    blocks = checkpoint.blocks
    block_bytes = max((checkpoint.block_bytes(i, element) for i in range(blocks)), default=0)
    resident = sum(checkpoint._bytes(n, element) for n in checkpoint.files if n.startswith("model.embed_tokens."))
    hidden = int(checkpoint.config.get("hidden_size", 0))
    activations = 2 * tokens * hidden * element  # the carried hidden states and one block's output
    budget = max_memory if max_memory is not None else available_memory(device)
    plan = OffloadPlan(mode, False, "", checkpoint.total_bytes(element), blocks, block_bytes, resident,
                       activations, budget, len(set(checkpoint.files.values())))
    if max_memory is not None and resident + block_bytes + activations > max_memory:
        raise InvalidOptionError(
            f"--max-memory {_size(max_memory)} is smaller than one decoder block ({_size(block_bytes)}) plus the "
            f"embeddings ({_size(resident)}) and hidden states ({_size(activations)}) of {base}")
    if mode == "always":
        plan.stream, plan.reason = True, "--offload always"
    elif not streamable:
        plan.reason = f"{checkpoint.model_type} models are not streamed"
    elif plan.model_bytes + activations > budget:
        plan.stream, plan.reason = True, "the model does not fit the budget"
    else:
        plan.reason = "the model fits the budget"
    return plan


def load_planned(base: Path, mode: str, max_memory: int | None, device: torch.device, dtype: torch.dtype,
                 tokens: int, plan_sink: Callable[[str], None] | None = None) -> tuple[Any, Any, Any, OffloadPlan]:
    """(model, tokenizer, StreamedModel or None, plan): the base loaded whole, or its weightless skeleton and a
    streamed model when the plan streams (the plan line then goes to ``plan_sink``)."""
    from lora_tools.basemodel import load_base, load_tokenizer

    plan = plan_offload(base, mode, max_memory, device, dtype, tokens=tokens)
    if not plan.stream:
        return (*load_base(base, device, dtype), None, plan)
    if plan_sink is not None:  # a whole-model run says nothing new
        plan_sink(plan.describe())
    from lora_tools.model.stream import StreamedModel

    tokenizer = _gguf_tokenizer(base) if is_gguf_file(base) else load_tokenizer(base)  # fails fast
    stream = StreamedModel(base, device, dtype)
    return stream.model, tokenizer, stream, plan


def _gguf_tokenizer(base: Path) -> Any:
    from lora_tools.errors import BaseModelError

    tokenizer = open_checkpoint(base).tokenizer  # parsed with the plan's header read
    if tokenizer is None:
        raise BaseModelError(f"{base}: this GGUF holds no tokenizer (no tokenizer.ggml.tokens); pass a base "
                             "with a tokenizer, or use --calib random")
    return tokenizer


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"
