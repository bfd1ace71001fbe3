"""Updates that are not a plain B·A pair — LyCORIS LoHa, LoKr, LoCon with a Tucker core, full weight
differences, and PEFT's AdaLoRA — as exact LoRA factors.

A module read from such a file is a ``LoraModule`` like any other, with an ``update`` that knows its stored
tensors and computes the exact (B, A) of its ΔW on demand (``Adapter.factors`` dispatches here), so inspect,
truncate, merge, similarity and the writers work on it unchanged; ``delta = scale · B @ A`` as for LoRA. Its
``a_info``/``b_info`` describe those computed factors under keys that exist in no file (``<module>.exact_lora_down``
/ ``.exact_lora_up``); the reader wraps its tensor source in an ``ExactFactorSource`` that serves them, so a writer
that copies ``source.get(a_info.key)`` writes exact LoRA factors and never a LyCORIS tensor under a LoRA name.

The algebra is in ``linalg/structured.py``; the forms and scale rules follow the loaders people use (cited where
each reader applies them: ``formats/lycoris_keys.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lora_tools.linalg import singular_values
from lora_tools.linalg.lowrank import lowrank_svd
from lora_tools.linalg.structured import (
    cap_rank,
    face_split,
    khatri_rao,
    kron_factors,
    kron_singular_values,
    thin_full,
    tucker_flat,
)
from lora_tools.tensorfile import TensorInfo, TensorSource

if TYPE_CHECKING:
    from lora_tools.adapter import Adapter, LoraModule

UPDATE_KINDS = ("lora", "loha", "lokr", "locon-tucker", "adalora", "full")
VIRTUAL_DOWN, VIRTUAL_UP = ".exact_lora_down", ".exact_lora_up"


def _load(source: TensorSource, info: TensorInfo) -> torch.Tensor:
    return source.get(info.key).to(torch.float64)


@dataclass(frozen=True)
class Update:
    """Shape and stored tensors of one structured update; subclasses compute its exact LoRA factors."""

    kind: ClassVar[str] = "lora"
    out_features: int
    in_features: int  # flattened: in_channels · prod(kernel)
    kernel: tuple[int, ...]  # () for a linear layer or a conv stored flattened (the file does not say)
    rank: int  # inner size of the factors returned, <= min(out, in)
    file_alpha: float | None = field(default=None, kw_only=True)  # the alpha the file stores (for reports)

    @property
    def infos(self) -> list[TensorInfo]:
        return [v for v in vars(self).values() if isinstance(v, TensorInfo)]

    @property
    def tensor_keys(self) -> list[str]:
        return [info.key for info in self.infos]

    @property
    def num_params(self) -> int:
        return sum(info.numel for info in self.infos)

    @property
    def stored_dtype(self) -> str:
        dtypes = sorted({info.dtype for info in self.infos})
        return "/".join(dtypes)

    @property
    def factor_dtype(self) -> torch.dtype:
        """What exact factors are stored in: float64 for float64 input, else float32 (products of fp16/bf16
        values are exact in float32; a write in the input's half precision would round them)."""
        return torch.float64 if any(i.dtype == "F64" for i in self.infos) else torch.float32

    def describe(self) -> dict[str, Any]:
        return {}

    def detail(self) -> dict[str, Any]:
        """What inspect shows of the stored form (ranks of the parts, the file's alpha)."""
        return {**self.describe(), "file_alpha": self.file_alpha}

    def check(self, source: TensorSource) -> tuple[bool, bool]:
        """(all stored tensors finite, ΔW is zero): every kind is a product of its tensors, so one all-zero
        tensor makes the update zero."""
        finite, zero = True, False
        for info in self.infos:
            tensor = source.get(info.key)
            finite = finite and bool(torch.isfinite(tensor).all())
            zero = zero or not bool(tensor.any())
        return finite, zero

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (B: (out, rank), A: (rank, in)) of the unscaled update, float64."""
        raise NotImplementedError

    def singular_values(self, source: TensorSource, scale: float) -> torch.Tensor:
        """The ``rank`` singular values of scale·B·A, descending (float64)."""
        B, A = self.factors(source)
        return singular_values(B, A, scale)


def _shape_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Capped factors of the declared rank; non-finite input (cap_rank leaves it alone) becomes NaN factors of
    that rank, so shapes always match what the module announced."""
    B, A = cap_rank(B, A)
    if B.shape[1] != rank:
        B = torch.full((B.shape[0], rank), float("nan"), dtype=B.dtype)
        A = torch.full((rank, A.shape[1]), float("nan"), dtype=A.dtype)
    return B, A


@dataclass(frozen=True)
class LoHa(Update):
    """ΔW = (W1a·W1b) ⊙ (W2a·W2b), or with Tucker cores t1/t2 (then w*_a: (r, out), w*_b: (r, in))."""

    kind: ClassVar[str] = "loha"
    w1a: TensorInfo
    w1b: TensorInfo
    w2a: TensorInfo
    w2b: TensorInfo
    t1: TensorInfo | None = None
    t2: TensorInfo | None = None

    def _pair(self, source: TensorSource, wa: TensorInfo, wb: TensorInfo,
              t: TensorInfo | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = _load(source, wa), _load(source, wb)
        if t is None:
            return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # (out, r), (r, in)
        return a.T, tucker_flat(_load(source, t), b)  # (out, r), (r, in·k)

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        B1, A1 = self._pair(source, self.w1a, self.w1b, self.t1)
        B2, A2 = self._pair(source, self.w2a, self.w2b, self.t2)
        return _shape_rank(face_split(B1, B2), khatri_rao(A1, A2), self.rank)

    def describe(self) -> dict[str, Any]:
        r1 = self.w1b.shape[0]
        r2 = self.w2b.shape[0]
        return {"r1": r1, "r2": r2, "tucker": self.t1 is not None}


@dataclass(frozen=True)
class KronSide:
    """One side of a Kronecker product: a full matrix ``w`` or factors ``a`` @ ``b`` (with a Tucker core ``t``)."""

    w: TensorInfo | None = None
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    t: TensorInfo | None = None

    @property
    def infos(self) -> list[TensorInfo]:
        return [i for i in (self.w, self.a, self.b, self.t) if i is not None]

    @property
    def rows(self) -> int:
        if self.w is not None:
            return self.w.shape[0]
        return self.a.shape[1] if self.t is not None else self.a.shape[0]  # type: ignore[union-attr]

    @property
    def cols(self) -> int:
        """Flattened columns (kernel positions included)."""
        import math

        if self.w is not None:
            return math.prod(self.w.shape[1:])
        if self.t is not None:
            return self.b.shape[1] * math.prod(self.t.shape[2:])  # type: ignore[union-attr]
        return math.prod(self.b.shape[1:])  # type: ignore[union-attr]

    @property
    def inner(self) -> int | None:
        """The LoRA dim of a factored side (None for a full one)."""
        return None if self.b is None else self.b.shape[0]

    @property
    def rank(self) -> int:
        bound = min(self.rows, self.cols)
        return bound if self.inner is None else min(self.inner, bound)

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w is not None:
            w = _load(source, self.w)
            return thin_full(w.reshape(w.shape[0], -1))
        a, b = _load(source, self.a), _load(source, self.b)  # type: ignore[arg-type]
        if self.t is not None:
            return cap_rank(a.T, tucker_flat(_load(source, self.t), b))
        return cap_rank(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))

    def singular_values(self, source: TensorSource) -> torch.Tensor:
        """Its ``rank`` singular values (zeros pad a factored side whose product is rank deficient)."""
        if self.w is not None:
            w = _load(source, self.w)
            return torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        P, Q = self.factors(source)
        S = lowrank_svd(P, Q, compute_uv=False).S.abs()
        return torch.cat([S, S.new_zeros(self.rank - S.numel())]) if S.numel() < self.rank else S[: self.rank]


@dataclass(frozen=True)
class LoKr(Update):
    """ΔW = kron(W1, W2), each side full or factored; rank = rank(W1)·rank(W2)."""

    kind: ClassVar[str] = "lokr"
    side1: KronSide
    side2: KronSide

    @property
    def infos(self) -> list[TensorInfo]:
        return self.side1.infos + self.side2.infos

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        B, A = kron_factors(self.side1.factors(source), self.side2.factors(source))
        return _shape_rank(B, A, self.rank)

    def singular_values(self, source: TensorSource, scale: float) -> torch.Tensor:
        # σ(kron(W1, W2)) = {σi(W1)·σj(W2)}: two tiny SVDs instead of one of the whole layer.
        S = kron_singular_values(self.side1.singular_values(source), self.side2.singular_values(source))
        return S * abs(scale)

    def describe(self) -> dict[str, Any]:
        def side(s: KronSide) -> dict[str, Any]:
            return {"shape": [s.rows, s.cols], "form": "full" if s.w is not None else
                    ("tucker" if s.t is not None else "factored"), "rank": s.rank}
        return {"w1": side(self.side1), "w2": side(self.side2)}


@dataclass(frozen=True)
class LoConTucker(Update):
    """ΔW[o, c, k] = Σ_ij up[o, i] mid[i, j, k] down[j, c]: an exact rank-r LoRA on the flattened conv weight."""

    kind: ClassVar[str] = "locon-tucker"
    up: TensorInfo
    down: TensorInfo
    mid: TensorInfo

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        up, down, mid = _load(source, self.up), _load(source, self.down), _load(source, self.mid)
        B = up.reshape(up.shape[0], -1)  # (out, r)
        A = tucker_flat(mid, down.reshape(down.shape[0], -1))  # (r, in·k)
        return _shape_rank(B, A, self.rank)

    def describe(self) -> dict[str, Any]:
        return {"r": self.down.shape[0]}


@dataclass(frozen=True)
class AdaLoRA(Update):
    """PEFT AdaLoRA: ΔW = B · diag(E) · A; directions whose E is exactly zero (pruned) are dropped."""

    kind: ClassVar[str] = "adalora"
    a: TensorInfo
    b: TensorInfo
    e: TensorInfo
    keep: tuple[int, ...] = ()  # indices of the non-zero entries of E (one zero kept if all are zero)

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, e = _load(source, self.a), _load(source, self.b), _load(source, self.e).reshape(-1)
        keep = torch.tensor(self.keep, dtype=torch.long)
        return _shape_rank(b[:, keep], (a * e[:, None])[keep], self.rank)

    def describe(self) -> dict[str, Any]:
        return {"stored_rank": self.a.shape[0], "pruned": self.a.shape[0] - len(self.keep)}


@dataclass(frozen=True)
class Full(Update):
    """A full weight difference (LyCORIS ``.diff``): not low-rank; exact factors via an identity on the short
    side, its spectrum by a dense SVD."""

    kind: ClassVar[str] = "full"
    diff: TensorInfo

    def factors(self, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
        d = _load(source, self.diff)
        return thin_full(d.reshape(d.shape[0], -1))

    def singular_values(self, source: TensorSource, scale: float) -> torch.Tensor:
        d = _load(source, self.diff)
        return torch.linalg.svdvals(d.reshape(d.shape[0], -1)) * abs(scale)


# --- the source that serves exact factors under virtual keys ----------------------------------------------------


class ExactFactorSource:
    """A tensor source plus the exact LoRA factors of its structured modules under virtual keys.

    ``infos()`` lists the stored tensors only (sizes on disk stay honest); ``get`` of a virtual key computes that
    module's factors (both, cached for the next call) in the update's factor dtype, shaped like a LoRA factor
    of that layer: A (rank, in, *kernel), B (out, rank, 1, ...).
    """

    def __init__(self, inner: TensorSource):
        self.inner = inner
        self.path: Path = inner.path
        self.metadata = inner.metadata
        self._virtual: dict[str, tuple[str, Update, bool]] = {}  # key -> (module, update, is_down)
        self._cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def register(self, name: str, update: Update) -> tuple[TensorInfo, TensorInfo]:
        """Virtual (A info, B info) of module ``name``."""
        down_key, up_key = name + VIRTUAL_DOWN, name + VIRTUAL_UP
        self._virtual[down_key] = (name, update, True)
        self._virtual[up_key] = (name, update, False)
        dtype = "F64" if update.factor_dtype == torch.float64 else "F32"
        in_channels = update.in_features // max(1, _prod(update.kernel))
        a_info = TensorInfo(down_key, dtype, (update.rank, in_channels, *update.kernel))
        b_info = TensorInfo(up_key, dtype, (update.out_features, update.rank, *([1] * len(update.kernel))))
        return a_info, b_info

    def infos(self) -> dict[str, TensorInfo]:
        return self.inner.infos()

    def get(self, key: str) -> Any:
        entry = self._virtual.get(key)
        if entry is None:
            return self.inner.get(key)
        name, update, is_down = entry
        cache = self._cache  # one read: another thread may replace it meanwhile (merge runs modules in threads)
        if cache is None or cache[0] != name:
            with torch.no_grad():
                B, A = update.factors(self.inner)
            dtype = update.factor_dtype
            in_channels = update.in_features // max(1, _prod(update.kernel))
            A = A.to(dtype).reshape(update.rank, in_channels, *update.kernel).contiguous()
            B = B.to(dtype).reshape(update.out_features, update.rank, *([1] * len(update.kernel))).contiguous()
            cache = self._cache = (name, B, A)
        return cache[2] if is_down else cache[1]


def _prod(values: tuple[int, ...]) -> int:
    import math

    return math.prod(values)


# --- hooks used by the neutral model and inspect -------------------------------------------------------------------


def update_factors(module: LoraModule, source: TensorSource, dtype: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a structured module in ``dtype`` (called by ``Adapter.factors``)."""
    with torch.no_grad():
        B, A = module.update.factors(source)
    return B.to(dtype), A.to(dtype)


def exact_singular_values(adapter: Adapter, module: LoraModule, B: torch.Tensor | None = None,
                          A: torch.Tensor | None = None) -> torch.Tensor:
    """The module's singular values, from its own structure where that is cheaper (LoKr: products of the two
    sides' values; full diffs: a dense SVD), else from its factors (B, A; computed when not given)."""
    update = module.update
    if update is not None and type(update).singular_values is not Update.singular_values:
        return update.singular_values(adapter.source, module.scale)
    if B is None or A is None:
        B, A = adapter.factors(module.name, torch.float64)
    return singular_values(B, A, module.scale)
