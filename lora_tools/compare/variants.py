"""Whole-adapter variants: every module compressed the same way, as replacement factors for end-to-end runs.

A *variant* replaces each module's update s·B·A by s'·B'·A' (float32 factors) and says how many bytes it would
store and what error each module is *predicted* to have before any end-to-end data is seen. Families (``method``):

* ``identity``: the adapter itself (the reference; its KL against itself is 0 — a sanity row);
* ``svd``: every module truncated to rank k (exact SVD from the factors, ``linalg.lowrank_svd``; never dense);
* ``svd-act``: every module truncated to rank k minimising its output error on calibration inputs
  (``calibration.activation_aware_factors``), for the modules that have an input covariance C;
* ``quant``: the factors B and A rounded with one ``lora_tools.quant`` scheme (exactly as compare-quant does);
* ``svd+quant``: rank-k truncation, then its (balanced) factors rounded with an INT8 or INT4 scheme;
* ``avg-rank``: per-module ranks from the global budget solver (``linalg.truncate.allocate_ranks``, the same as
  ``truncate --avg-rank K``) within the bytes of uniform rank k: the most retained Σσ² for those bytes.

Bytes follow compare-quant's accounting (``compare.methods``): unquantized factors as float16,
(out + in)·k·2 per module; quantized factors as packed codes plus float16 scales (``quant.quantized_bytes``).

Predicted errors (per module, squared, absolute), in two spaces:

* weight space ‖ΔŴ − ΔW‖_F²: truncation, the spectrum tail Σ_{i≥k} σ_i² (Eckart–Young, exact); svd-act, its exact
  weight error ‖ΔW‖² − ‖U_kᵀΔW‖² (a projection); rounding, Widrow's uniform-noise model with C = I;
* output space ‖(ΔŴ − ΔW) X‖_F² on the calibration inputs (only with C): truncation, Σ_{i≥k} σ_i²·v_iᵀ C v_i;
  svd-act, the eigenvalue tail Σ_{i≥k} λ_i; rounding, the uniform-noise model with C (the formula of
  ``compare.metrics.uniform_noise_prediction``). A mixed variant predicts tail + noise: the rounding noise has
  zero mean, so its expected cross term with the truncation error vanishes.

This file holds the families *per module* (``decompose`` a module once, ``module_variant`` gives one family's
factors, bytes and prediction for it). What spans modules — the variant list, the avg-rank allocation, the notes —
is ``compare.variants_plan``, which builds the modules all at once or one decoder block at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lora_tools.adapter import Adapter
from lora_tools.calibration import activation_aware_factors
from lora_tools.compare.methods import lowrank_bytes
from lora_tools.compare.span import SpanCovariance
from lora_tools.errors import ModuleMismatchError
from lora_tools.linalg import lowrank_svd
from lora_tools.quant import QuantScheme, fake_quantize, quantized_bytes

METHODS = ("identity", "svd", "svd-act", "quant", "svd+quant", "avg-rank")
DEFAULT_RANKS = (1, 2, 4, 8)
DEFAULT_MIXED_SCHEMES = ("int8-channel", "int4-g128")
SPACES = ("weight", "output")


@dataclass(frozen=True)
class ModuleFactors:
    """One module's replacement update ``scale · B @ A``; B: (out, k), A: (k, in), float32."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.B.shape[1])


@dataclass(frozen=True)
class PredictedError:
    """Squared error predicted for one module: weight space, and output space on calibration inputs (or None)."""

    weight_sq: float
    output_sq: float | None = None


@dataclass
class Variant:
    """A whole-adapter variant: replacement factors for every module, its bytes and its predicted errors.

    ``factors`` may be empty once the variant has been run block by block (``compare.variants_plan``): the
    summaries (bytes, predicted, reference, ``ranks``) outlive the factors."""

    label: str
    method: str
    rank: int | None
    scheme: str | None
    bytes: int
    factors: dict[str, ModuleFactors]
    predicted: dict[str, PredictedError]
    # ‖ΔW‖_F² and ‖ΔW X‖_F² (calibration) of the unmodified modules: the denominators of the relative errors.
    reference: dict[str, PredictedError]
    notes: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)  # each module's rank, kept when the factors are dropped

    @property
    def mean_rank(self) -> float:
        ranks = self.ranks or {name: f.rank for name, f in self.factors.items()}
        return sum(ranks.values()) / max(len(ranks), 1)

    def predicted_rel_error(self, space: str = "weight") -> float | None:
        """sqrt(Σ predicted error² / Σ reference energy) over all modules (as compare-quant aggregates layers);
        None in output space when some module has no covariance, NaN when the adapter is all zero."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}")
        attr = f"{space}_sq"
        errors = [getattr(p, attr) for p in self.predicted.values()]
        totals = [getattr(self.reference[name], attr) for name in self.predicted]
        if any(v is None for v in errors + totals):
            return None
        total = sum(totals)
        return math.sqrt(max(sum(errors), 0.0) / total) if total > 0 else math.nan

    def module_rel_errors(self, space: str = "weight") -> dict[str, float | None]:
        """Per module: sqrt(predicted error² / reference energy), to set beside compare-quant's measured per-layer
        errors (None without a prediction in that space, NaN for an all-zero module)."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}")
        result: dict[str, float | None] = {}
        for name, predicted in self.predicted.items():
            error, total = getattr(predicted, f"{space}_sq"), getattr(self.reference[name], f"{space}_sq")
            result[name] = None if error is None or total is None else \
                (math.sqrt(max(error, 0.0) / total) if total > 0 else math.nan)
        return result

    def summary(self) -> dict[str, object]:
        """The plain-data fields a report row starts from (the pinned ``end_to_end.variants`` keys it can fill)."""
        return {"label": self.label, "method": self.method, "rank": self.rank, "scheme": self.scheme,
                "bytes": self.bytes, "mean_rank": self.mean_rank,
                "predicted_weight_rel_error": self.predicted_rel_error("weight"),
                "predicted_output_rel_error": self.predicted_rel_error("output"), "notes": list(self.notes)}


@dataclass
class ModuleBasis:
    """Everything about one module that several variants share, computed once (float64)."""

    name: str
    B: torch.Tensor  # (out, r) float32, as stored
    A: torch.Tensor  # (r, in) float32
    scale: float
    U: torch.Tensor  # (out, m) left singular vectors of s·B·A
    S: torch.Tensor  # (m,)
    Vh: torch.Tensor  # (m, in)
    C: SpanCovariance | None = None  # the calibration covariance where the variants read it
    quadratic: torch.Tensor | None = None  # (m,) v_iᵀ C v_i, for output-space truncation tails
    eigen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # activation_aware_factors(...)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def max_rank(self) -> int:
        return int(self.S.numel())

    @property
    def weight_energy(self) -> float:
        return float(self.S.square().sum())

    @property
    def output_energy(self) -> float | None:
        return None if self.quadratic is None else float((self.S.square() * self.quadratic).sum())

    @property
    def reference(self) -> PredictedError:
        """‖ΔW‖_F² and ‖ΔW X‖_F²: the denominators of this module's relative errors."""
        return PredictedError(self.weight_energy, self.output_energy)

    def tail(self, rank: int) -> PredictedError:
        """Truncation error of keeping the top ``rank`` singular triplets, in both spaces."""
        energy = self.S[rank:].square()
        output = None if self.quadratic is None else float((energy * self.quadratic[rank:]).sum())
        return PredictedError(float(energy.sum()), output)

    def truncated(self, rank: int) -> ModuleFactors:
        """Balanced factors B' = U_k·sqrt(S_k/s'), A' = sqrt(S_k/s')·Vh_k, s' the module's own scale (as
        ``truncate`` writes them), so a mixed variant rounds what would really be stored."""
        k = min(rank, self.max_rank)
        new_scale = self.scale if self.scale > 0 and math.isfinite(self.scale) else 1.0
        root = torch.sqrt(self.S[:k] / new_scale)  # (k,)
        return ModuleFactors((self.U[:, :k] * root).float(), (root[:, None] * self.Vh[:k]).float(), new_scale)


def checked_covariance(name: str, C: torch.Tensor | SpanCovariance | None, inputs: int) -> None:
    """Refuse a covariance whose shape is not (in, in) for the module."""
    if C is not None and tuple(C.shape) != (inputs, inputs):
        raise ModuleMismatchError(f"module {name}: input covariance has shape {tuple(C.shape)}, "
                                  f"expected {(inputs, inputs)}")


@torch.no_grad()
def decompose(adapter: Adapter, name: str, C: torch.Tensor | SpanCovariance | None = None, *,
              spectrum_only: bool = False) -> ModuleBasis:
    """The module's SVD (float64, from its factors) and, with C, its output-space quantities; checked: finite
    factors, a C of the module's width. ``spectrum_only`` skips the output-space work (what a global plan needs:
    S, shapes, scale)."""
    B, A = adapter.factors(name, torch.float32)  # B: (out, r), A: (r, in)
    if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
        raise ModuleMismatchError(f"{adapter.path}: module {name}: LoRA factors contain NaN or Inf")
    checked_covariance(name, C, int(A.shape[1]))
    scale = adapter.modules[name].scale
    svd = lowrank_svd(B, A, scale, dtype=torch.float64)
    module = ModuleBasis(name, B, A, scale, svd.U, svd.S, svd.Vh)
    if C is not None and not spectrum_only:
        module.C = C if isinstance(C, SpanCovariance) else SpanCovariance(C, A)
        module.quadratic = module.C.quadratic_rows(svd.Vh)  # (m,) v_iᵀ C v_i
        module.eigen = activation_aware_factors(B, A, scale, module.C)
    return module


def uniform_noise_sq(factors: ModuleFactors, step_B: torch.Tensor, step_A: torch.Tensor,
                     C: torch.Tensor | SpanCovariance | None = None) -> float:
    """Widrow's uniform-noise prediction E‖s·(N_B A + B N_A) X‖² for rounding steps (step_B: (out, k), step_A:
    (k, in)); C = None means weight space (C = I). Same first-order model as
    ``compare.metrics.uniform_noise_prediction``, written here without forming an (in, in) identity. A
    ``SpanCovariance`` serves when the factors' A lies in the row space it was built for."""
    B = factors.B.to(torch.float64)
    A = factors.A.to(torch.float64)
    if C is None:
        diag = torch.ones(A.shape[1], dtype=torch.float64)
        G_diag = A.square().sum(dim=1)  # (k,): (A Aᵀ)_ii
    elif isinstance(C, SpanCovariance):
        diag = C.diag
        G_diag = C.quadratic_rows(A)
    else:
        C = C.to(torch.float64)
        diag = torch.diagonal(C)
        G_diag = ((A @ C) * A).sum(dim=1)  # (k,): (A C Aᵀ)_ii
    from_B = float((step_B.to(torch.float64).square() @ G_diag).sum()) / 12.0
    from_A = float(((step_A.to(torch.float64).square() @ diag) * B.square().sum(dim=0)).sum()) / 12.0
    return factors.scale ** 2 * (from_B + from_A)


def _quantized(factors: ModuleFactors, scheme: QuantScheme,
               C: torch.Tensor | SpanCovariance | None) -> tuple[ModuleFactors, int, PredictedError]:
    """Round B and A with ``scheme``: dequantized factors, honest bytes, predicted noise in both spaces."""
    B_q, step_B = fake_quantize(factors.B.float(), scheme)  # (out, k)
    A_q, step_A = fake_quantize(factors.A.float(), scheme)  # (k, in)
    size = quantized_bytes(tuple(factors.B.shape), scheme) + quantized_bytes(tuple(factors.A.shape), scheme)
    noise = PredictedError(uniform_noise_sq(factors, step_B, step_A),
                           None if C is None else uniform_noise_sq(factors, step_B, step_A, C))
    return ModuleFactors(B_q, A_q, factors.scale), size, noise


def _add(a: PredictedError, b: PredictedError) -> PredictedError:
    output = None if a.output_sq is None or b.output_sq is None else a.output_sq + b.output_sq
    return PredictedError(a.weight_sq + b.weight_sq, output)


@torch.no_grad()
def module_variant(m: ModuleBasis, method: str, rank: int | None = None,
                   scheme: QuantScheme | None = None) -> tuple[ModuleFactors, int, PredictedError]:
    """One family applied to one module: (factors, bytes, predicted error). ``rank`` is the module's own rank for
    ``avg-rank`` (from the global allocation), the uniform k for the truncating families; ranks at or above the
    module's keep it whole. ``svd-act`` falls back to plain SVD on a module without C."""
    if method == "identity":
        zero = PredictedError(0.0, None if m.C is None else 0.0)
        return ModuleFactors(m.B, m.A, m.scale), lowrank_bytes(m.shape, int(m.B.shape[1])), zero
    if method == "quant":
        return _quantized(ModuleFactors(m.B, m.A, m.scale), scheme, m.C)
    if rank is None:
        raise ValueError(f"{method} variants need a rank")
    size = lowrank_bytes(m.shape, min(rank, m.max_rank))
    if method in ("svd", "avg-rank") or (method == "svd-act" and m.eigen is None):
        return m.truncated(rank), size, m.tail(rank)
    if method == "svd-act":
        U, values, T = m.eigen  # U: (out, q), T: (q, in), ΔŴ = U_k T_k
        k = min(rank, values.numel())
        weight = max(m.weight_energy - float(T[:k].square().sum()), 0.0)  # U has orthonormal columns
        return ModuleFactors(U[:, :k].float(), T[:k].float(), 1.0), size, \
            PredictedError(weight, float(values[k:].clamp_min(0).sum()))
    if method == "svd+quant":
        factors, nbytes, noise = _quantized(m.truncated(rank), scheme, m.C)
        return factors, nbytes, _add(m.tail(rank), noise)
    raise ValueError(f"unknown variant method {method!r}; choose one of {', '.join(METHODS)}")

