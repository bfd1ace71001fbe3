"""Build a new in-memory ``Adapter`` module by module (merge, convert, extract), ready for any writer.

The tensors live in a ``MemorySource`` under the key names of the chosen format, so that the format's writer
finds them where its own reader would have put them; ``truncate`` reuses the input's keys instead and does not
need this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.formats.peft import PREFIX as PEFT_PREFIX
from lora_tools.tensorfile import MemorySource, TensorInfo, safetensors_dtype

# Bytes per element, to pick the widest of several stored dtypes.
_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
ST_TO_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def factor_keys(format: str, name: str, kind: str) -> tuple[str, str, str | None]:
    """(A key, B key, alpha key or None) under which ``format``'s reader finds a module called ``name``."""
    if format == "peft":
        if kind == "embedding":
            return f"{PEFT_PREFIX}{name}.lora_embedding_A", f"{PEFT_PREFIX}{name}.lora_embedding_B", None
        return f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight", None
    if format == "kohya":
        return f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"
    return f"{name}.lora.down.weight", f"{name}.lora.up.weight", f"{name}.alpha"


def widest_dtype(dtypes: list[str]) -> torch.dtype:
    """The dtype that holds every one of ``dtypes`` (safetensors spelling) without loss: F16 + BF16 -> F32."""
    known = [d for d in dtypes if d in _WIDTH]
    if not known:
        return torch.float32
    if len(set(known)) > 1 and all(_WIDTH[d] == 2 for d in known):
        return torch.float32
    return ST_TO_TORCH[max(known, key=lambda d: _WIDTH[d])]


class AdapterBuilder:
    """Collects modules (2-D factors plus their layout) and extra tensors, then ``build()``s an Adapter."""

    def __init__(self, format: str, path: Path, *, config: dict[str, Any] | None = None,
                 metadata: dict[str, str] | None = None, base_model: str | None = None,
                 scale_rule: str = "alpha/r") -> None:
        self.format = format
        self.path = path
        self.config = dict(config or {})
        self.metadata = dict(metadata or {})
        self.base_model = base_model
        self.scale_rule = scale_rule
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, LoraModule] = {}
        self.extras: list[TensorInfo] = []
        self.warnings: list[str] = []

    def add_module(self, name: str, kind: str, B: torch.Tensor, A: torch.Tensor, *, scale: float, alpha: float,
                   dtype: torch.dtype | None = None, like: LoraModule | None = None,
                   keys: tuple[str, str, str | None] | None = None, alpha_tensor: torch.Tensor | None = None,
                   flags: list[str] | None = None) -> LoraModule:
        """Add one module from B: (out, r) and A: (r, in_flat), stored in the layout of ``like`` (conv factors get
        their kernel dimensions back: A (r, in, kh, kw), B (out, r, 1, 1)).

        ``alpha_tensor``, when given, is stored under the alpha key as it is (formats with scalar alphas).
        """
        rank = A.shape[0]
        if like is not None:
            a_tensor = A.reshape(rank, *like.a_info.shape[1:])
            b_tensor = B.reshape(B.shape[0], rank, *like.b_info.shape[2:])
        else:
            a_tensor, b_tensor = A, B
        if dtype is not None:
            a_tensor, b_tensor = a_tensor.to(dtype), b_tensor.to(dtype)
        a_key, b_key, alpha_key = keys or factor_keys(self.format, name, kind)
        self.tensors[a_key] = a_tensor.contiguous()
        self.tensors[b_key] = b_tensor.contiguous()
        if alpha_tensor is None or alpha_key is None:
            alpha_key = None
        else:
            self.tensors[alpha_key] = alpha_tensor
        module = LoraModule(
            name=name, kind=kind, rank=rank, alpha=float(alpha), scale=float(scale),
            a_info=TensorInfo(a_key, safetensors_dtype(a_tensor), tuple(a_tensor.shape)),
            b_info=TensorInfo(b_key, safetensors_dtype(b_tensor), tuple(b_tensor.shape)),
            alpha_key=alpha_key, flags=list(flags or []),
        )
        self.modules[name] = module
        return module

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        """A tensor that is not a LoRA factor (carried through under its key)."""
        self.tensors[key] = tensor
        self.extras.append(TensorInfo(key, safetensors_dtype(tensor), tuple(tensor.shape)))

    def build(self) -> Adapter:
        return Adapter(path=self.path, format=self.format, modules=dict(self.modules),
                       source=MemorySource(dict(self.tensors), self.path, self.metadata), config=self.config,
                       metadata=dict(self.metadata), extra_tensors=list(self.extras),
                       warnings=list(self.warnings), base_model=self.base_model, scale_rule=self.scale_rule)
