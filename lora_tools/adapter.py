"""The neutral in-memory model every format reads into and (later) writes from.

An ``Adapter`` is a set of ``LoraModule``s plus everything else the file held (extra tensors such as
``modules_to_save`` copies, metadata, the config) so that nothing is lost on a later write. Tensors stay in the
file until asked for: a module knows its keys and shapes, ``Adapter.factors`` loads one module at a time.

Convention, whatever the format: ``B`` is (out, r), ``A`` is (r, in) — conv factors are flattened to that, and the
update as a linear map is ``delta = scale * B @ A``. ``LoraModule.kind`` says how that map sits in the base weight:
``linear`` (weight is (out, in)), ``conv`` (weight (out, in, *kernel)), ``conv1d`` (GPT-2's transposed Conv1D,
weight (in, out)) and ``embedding`` (weight (num_embeddings, dim), i.e. also transposed).

``LoraModule.update_kind`` says what the file stores: ``lora`` (B and A themselves) or a structured update
(LyCORIS LoHa/LoKr/LoCon-Tucker/full diff, AdaLoRA) whose exact (B, A) ``lora_tools.updates`` computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tools.errors import ModuleMismatchError
from lora_tools.tensorfile import TensorInfo, TensorSource

if TYPE_CHECKING:
    from lora_tools.updates import Update

LAYER_KINDS = ("linear", "conv", "conv1d", "embedding")


@dataclass
class LoraModule:
    """One adapted layer: where its factors live in the file and how they are scaled."""

    name: str
    kind: str
    rank: int
    alpha: float
    scale: float
    a_info: TensorInfo
    b_info: TensorInfo
    bias_key: str | None = None  # lora_B.bias (PEFT lora_bias=True)
    magnitude_key: str | None = None  # DoRA magnitude (PEFT lora_magnitude_vector, kohya dora_scale)
    alpha_key: str | None = None  # kohya/diffusers scalar alpha tensor
    flags: list[str] = field(default_factory=list)
    # A LyCORIS/AdaLoRA update (lora_tools/updates.py): then a_info/b_info describe its exact LoRA factors under
    # virtual keys, computed on demand, and ``alpha`` is the LoRA-equivalent scale·rank. None for plain LoRA.
    update: Update | None = None

    @property
    def update_kind(self) -> str:
        """lora, loha, lokr, locon-tucker, adalora or full."""
        return self.update.kind if self.update is not None else "lora"

    @property
    def out_features(self) -> int:
        return self.b_info.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.a_info.shape[1:])

    @property
    def dtype(self) -> str:
        if self.update is not None:
            return self.update.stored_dtype
        return self.a_info.dtype if self.a_info.dtype == self.b_info.dtype else \
            f"{self.a_info.dtype}/{self.b_info.dtype}"

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.a_info.shape[2:]) if self.kind == "conv" else ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update is added to."""
        if self.kind == "conv":
            return (self.out_features, self.a_info.shape[1], *self.kernel_size)
        if self.kind in ("conv1d", "embedding"):
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def num_params(self) -> int:
        if self.update is not None:
            return self.update.num_params
        return self.a_info.numel + self.b_info.numel

    @property
    def tensor_keys(self) -> list[str]:
        keys = [self.a_info.key, self.b_info.key]
        if self.update is not None:
            keys = self.update.tensor_keys + keys  # stored tensors, then the virtual exact factors
        keys += [k for k in (self.bias_key, self.magnitude_key, self.alpha_key) if k]
        return keys


@dataclass
class Adapter:
    """A whole adapter file or folder, read lazily."""

    path: Path
    format: str
    modules: dict[str, LoraModule]
    source: TensorSource
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extra_tensors: list[TensorInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    base_model: str | None = None
    scale_rule: str = "alpha/r"
    weights_path: Path | None = None
    # The config as read when ``config`` holds a LoRA translation of it (PEFT LoHa/LoKr/AdaLoRA folders).
    source_config: dict[str, Any] = field(default_factory=dict)

    @property
    def file_size(self) -> int:
        target = self.weights_path or self.path
        return target.stat().st_size if target.is_file() else 0

    @property
    def total_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    def factors(self, name: str, dtype: Any = None) -> tuple[Any, Any]:
        """Return (B, A) of one module as 2-D tensors, B: (out, r), A: (r, in), in ``dtype`` (default float32)."""
        import torch

        module = self.modules[name]
        dtype = dtype or torch.float32
        if module.update is not None:
            from lora_tools.updates import update_factors

            return update_factors(module, self.source, dtype)
        a = self.source.get(module.a_info.key)
        b = self.source.get(module.b_info.key)
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ModuleMismatchError(
                f"{self.source.path}: module {name}: LoRA factors must be floating point, found "
                f"{a.dtype} and {b.dtype}"
            )
        return b.reshape(b.shape[0], -1).to(dtype), a.reshape(a.shape[0], -1).to(dtype)

    def delta_weight(self, name: str, dtype: Any = None) -> Any:
        """The dense update in the base weight's layout (materialises out x in: for tests and small layers)."""
        module = self.modules[name]
        b, a = self.factors(name, dtype)
        delta = module.scale * (b @ a)  # (out, in)
        if module.kind == "conv":
            return delta.reshape(module.weight_shape)
        if module.kind in ("conv1d", "embedding"):
            return delta.T
        return delta
