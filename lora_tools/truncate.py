"""Truncate an adapter: the best rank-k approximation of every module's update, from the factors alone.

For each module the exact SVD of the scaled update ``s·B·A = U·diag(S)·Vh`` comes from ``lowrank_svd`` (QR of B and
Aᵀ, an r x r core SVD; the out x in matrix is never formed). Keeping the k largest triplets is optimal in Frobenius
and spectral norm (Eckart–Young). The new factors are balanced, ``B' = U_k·sqrt(S_k/s')``,
``A' = sqrt(S_k/s')·Vh_k``, so that neither factor carries the whole magnitude, where ``s'`` is the scale the
output keeps: the module's old scale (so alpha/r stays what the user trained with), and 1 if that scale is not
positive. The writers then store whatever alpha makes their loader's scale equal ``s'``.

Everything that is not a LoRA factor (``modules_to_save`` copies, ``lora_B.bias``, DoRA magnitudes, metadata) is
carried over unchanged. For DoRA that is an approximation: the magnitude vector rescales the columns of
``W0 + s·B·A``, whose column norms change when B·A is truncated; the report warns.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.calibration import activation_aware_factors
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.linalg import lowrank_svd
from lora_tools.linalg.truncate import (
    DYNAMIC_METHODS,
    RankRule,
    allocate_ranks,
    relative_error,
    retained_energy,
)
from lora_tools.tensorfile import FLOAT_DTYPES, MemorySource, TensorInfo, torch_dtype

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class NonFiniteWeightsError(ModuleMismatchError):
    """A module's factors hold NaN or Inf."""


@dataclass
class TruncateResult:
    adapter: Adapter  # the truncated adapter, in memory (tensors already in the output dtype)
    report: dict[str, Any] = field(default_factory=dict)


def parse_positive_int(value: Any, option: str) -> int:
    """An integer >= 1 from an int or its text ("4"); "2.5", "0", "-1", True are refused."""
    if isinstance(value, bool):
        raise InvalidOptionError(f"{option} must be a positive integer, found {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            raise InvalidOptionError(f"{option} must be a positive integer, found {text!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{option} must be a positive integer, found {value!r}")
    return value


def parse_number(value: Any, option: str) -> float:
    if isinstance(value, bool):
        raise InvalidOptionError(f"{option} must be a number, found {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{option} must be a number, found {value!r}") from None
    if not math.isfinite(number):
        raise InvalidOptionError(f"{option} must be finite, found {value!r}")
    return number


def select_rule(*, rank: Any = None, energy: Any = None, method: str | None = None, threshold: Any = None,
                avg_rank: Any = None) -> RankRule | int:
    """Validate the selectors: exactly one of rank / energy / method+threshold / avg_rank.

    Returns a per-module ``RankRule``, or the average rank (int) of a global budget.
    """
    given = [name for name, v in (("--rank", rank), ("--energy", energy), ("--method", method),
                                  ("--avg-rank", avg_rank)) if v is not None]
    if threshold is not None and method is None:
        raise InvalidOptionError("--threshold needs --method sv_ratio|sv_fro|sv_cumulative")
    if len(given) > 1:
        raise InvalidOptionError(f"choose one way to pick ranks; got {' and '.join(given)}")
    if not given:
        raise InvalidOptionError("say how to pick ranks: --rank K, --energy F, --method M --threshold T "
                                 "or --avg-rank K")
    if rank is not None:
        return RankRule("fixed", parse_positive_int(rank, "--rank"))
    if energy is not None:
        fraction = parse_number(energy, "--energy")
        if not 0.0 < fraction <= 1.0:
            raise InvalidOptionError(f"--energy must lie in (0, 1], found {fraction:g}")
        return RankRule("energy", fraction)
    if method is not None:
        if method not in DYNAMIC_METHODS:
            raise InvalidOptionError(f"unknown --method {method!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
        if threshold is None:
            raise InvalidOptionError(f"--method {method} needs --threshold T")
        return RankRule(method, parse_number(threshold, "--threshold"))
    return parse_positive_int(avg_rank, "--avg-rank")


def output_dtype(name: str, stored: str) -> torch.dtype:
    """The dtype a factor is written in: ``keep`` keeps the input's (``stored``, safetensors spelling)."""
    if name == "keep":
        return torch_dtype(stored) if stored in FLOAT_DTYPES else torch.float32
    if name not in OUTPUT_DTYPES:
        raise InvalidOptionError(f"unknown --dtype {name!r}; choose keep, {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


def uses_rslora(adapter: Adapter) -> bool:
    return bool(adapter.config.get("use_rslora")) if adapter.format in ("peft", "diffusers") else False


def alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """The alpha whose loader scale (alpha/r, or alpha/sqrt(r) for rsLoRA) is ``scale`` at ``rank``."""
    return scale * math.sqrt(rank) if rslora else scale * rank


@torch.no_grad()
def truncate(adapter: Adapter, *, rank: Any = None, energy: Any = None, method: str | None = None,
             threshold: Any = None, avg_rank: Any = None, dtype: str = "keep", allow_nonfinite: bool = False,
             covariances: Mapping[str, torch.Tensor] | None = None,
             progress: Callable[[int], None] | None = None) -> TruncateResult:
    """Truncate every module of ``adapter``; returns the new in-memory adapter and a report (plain data).

    Exactly one selector: ``rank`` (every module to min(rank, its rank)), ``energy`` (smallest rank keeping that
    fraction of Σσ²), ``method`` + ``threshold`` (kohya's sv_ratio / sv_fro / sv_cumulative) or ``avg_rank``
    (a global parameter budget equal to rank ``avg_rank`` everywhere, allocated for the most retained energy).

    With ``covariances`` (module name -> input covariance C = Σ x xᵀ from calibration data), those modules are
    truncated activation-aware: the rank-k update minimising the error on layer outputs ‖(ΔW − ΔŴ) X‖_F
    instead of ‖ΔW − ΔŴ‖_F (see ``calibration.activation_aware_factors``), and ranks are chosen on the output
    spectrum sqrt(λ_i) of ΔW C ΔWᵀ. The report then also gives the retained output energy.
    """
    covariances = covariances or {}
    rule = select_rule(rank=rank, energy=energy, method=method, threshold=threshold, avg_rank=avg_rank)
    output_dtype(dtype, "F32")  # validate before any work
    advance = progress or (lambda n: None)
    spectra: dict[str, torch.Tensor] = {}
    nonfinite: list[str] = []
    # Pass 1 (global budget only): spectra without singular vectors, to choose ranks before building factors.
    if isinstance(rule, int):
        for name, module in adapter.modules.items():
            B, A = _checked_factors(adapter, module, allow_nonfinite)
            if B is None:
                nonfinite.append(name)
                continue
            if name in covariances:
                output_energy = activation_aware_factors(B, A, module.scale, covariances[name])[1]
                spectra[name] = output_energy.clamp_min(0).sqrt()
            else:
                spectra[name] = lowrank_svd(B, A, module.scale, compute_uv=False).S
        ranks, allocation = _budget_ranks(adapter, spectra, rule)
        description = f"avg-rank {rule} ({allocation})"
    else:
        ranks = {}
        description = rule.description

    rslora = uses_rslora(adapter)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, LoraModule] = {}
    rows: list[dict[str, Any]] = []
    total_energy = kept_energy = 0.0
    for name, module in adapter.modules.items():
        B, A = _checked_factors(adapter, module, allow_nonfinite)
        if B is None:
            if name not in nonfinite:
                nonfinite.append(name)
            modules[name] = _carry_module(adapter, module, tensors)
            rows.append(_row(module, module.rank, float("nan"), ["nonfinite (kept unchanged)"]))
            advance(1)
            continue
        if name in covariances:
            # Output-space directions: U (out, m), λ (m,) and T = Uᵀ·ΔW (m, in), ΔŴ = U_k T_k.
            U_out, out_energy, T_out = activation_aware_factors(B, A, module.scale, covariances[name])
            selection = out_energy.clamp_min(0).sqrt()  # eigenvalues of a PSD matrix, up to rounding
        else:
            svd = lowrank_svd(B, A, module.scale)  # U: (out, m), S: (m,), Vh: (m, in), m = min(r, out, in)
            selection = svd.S
        new_rank = ranks[name] if name in ranks else rule.select(selection)  # type: ignore[union-attr]
        new_rank = max(1, min(new_rank, selection.numel()))
        if name in covariances:
            energy_total = float(T_out.square().sum())  # ‖ΔW‖_F², as U has orthonormal columns
            # ΔŴ = U_k U_kᵀ ΔW is an orthogonal projection of ΔW, so ‖ΔW − ΔŴ‖² = ‖ΔW‖² − ‖ΔŴ‖² still holds.
            svd = lowrank_svd(U_out[:, :new_rank], T_out[:new_rank])
            kept = float(svd.S.square().sum()) / energy_total if energy_total > 0 else 1.0
            output_kept = retained_energy(selection, new_rank)
        else:
            kept = retained_energy(svd.S, new_rank)
            energy_total = float(svd.S.square().sum())
            output_kept = None
        S = svd.S
        total_energy += energy_total
        kept_energy += kept * energy_total
        new_scale = module.scale if module.scale > 0 and math.isfinite(module.scale) else 1.0
        root = torch.sqrt(S[:new_rank] / new_scale)  # (k,)
        new_B = svd.U[:, :new_rank] * root  # (out, k)
        new_A = root[:, None] * svd.Vh[:new_rank]  # (k, in)
        modules[name] = _new_module(adapter, module, new_B, new_A, new_rank, new_scale, rslora, dtype, tensors)
        # An all-zero update (untrained B) keeps "all" of nothing: say so rather than let 1.0 pass for a result.
        rows.append(_row(module, new_rank, kept, ["zero_update"] if energy_total == 0 else [], output_kept))
        advance(1)

    _carry_extras(adapter, modules, tensors)
    new_adapter = Adapter(
        path=adapter.path, format=adapter.format, modules=modules,
        source=MemorySource(tensors, adapter.path, adapter.metadata), config=copy.deepcopy(adapter.config),
        metadata=dict(adapter.metadata), extra_tensors=list(adapter.extra_tensors), warnings=[],
        base_model=adapter.base_model, scale_rule=adapter.scale_rule, weights_path=None,
    )
    warnings = list(adapter.warnings)
    if nonfinite:
        warnings.append(f"{len(nonfinite)} module(s) with NaN/Inf factors were copied unchanged "
                        f"(--allow-nonfinite), e.g. {nonfinite[0]}")
    if any("dora" in m.flags for m in adapter.modules.values()):
        warnings.append("DoRA adapter: B·A was truncated optimally but the magnitude vectors were kept as they "
                        "are; they were trained for the untruncated column norms of W0 + s·B·A, so the "
                        "truncated DoRA update is an approximation beyond the reported error")
    new_adapter.warnings = warnings
    report = _report(adapter, new_adapter, rows, description, total_energy, kept_energy, warnings)
    return TruncateResult(new_adapter, report)


def _checked_factors(adapter: Adapter, module: LoraModule,
                     allow_nonfinite: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    B, A = adapter.factors(module.name, torch.float64)  # B: (out, r), A: (r, in)
    if bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all()):
        return B, A
    if allow_nonfinite:
        return None, None
    raise NonFiniteWeightsError(
        f"{adapter.path}: module {module.name}: LoRA factors contain NaN or Inf; refusing to truncate "
        "(pass --allow-nonfinite to copy such modules unchanged)"
    )


def _budget_ranks(adapter: Adapter, spectra: dict[str, torch.Tensor], avg_rank: int) -> tuple[dict[str, int], str]:
    names = list(spectra)
    modules = [adapter.modules[n] for n in names]
    # Parameters per unit of rank: one column of B and one row of A (out + in, conv kernels flattened into in).
    unit_costs = [m.out_features + m.in_features for m in modules]
    # Budget: what `--rank avg_rank` would store, i.e. min(avg_rank, attainable rank) in every module.
    budget = sum(min(avg_rank, spectra[n].numel()) * c for n, c in zip(names, unit_costs, strict=True))
    allocation = allocate_ranks([spectra[n].square() for n in names], unit_costs, budget)
    if allocation.method != "exact":
        logger.warning("global budget solved greedily (the exact table would be too large); the allocation "
                       "may fall short of the optimum by less than one singular value's energy per module")
    detail = f"{allocation.method} allocation, {allocation.cost:,} of {budget:,} parameters"
    return dict(zip(names, allocation.ranks, strict=True)), detail


def _new_module(adapter: Adapter, module: LoraModule, new_B: torch.Tensor, new_A: torch.Tensor, rank: int,
                scale: float, rslora: bool, dtype: str, tensors: dict[str, torch.Tensor]) -> LoraModule:
    a_shape = (rank, *module.a_info.shape[1:])  # conv: (k, in, *kernel)
    b_shape = (module.b_info.shape[0], rank, *module.b_info.shape[2:])  # conv: (out, k, 1, 1)
    a_tensor = new_A.reshape(a_shape).to(output_dtype(dtype, module.a_info.dtype)).contiguous()
    b_tensor = new_B.reshape(b_shape).to(output_dtype(dtype, module.b_info.dtype)).contiguous()
    tensors[module.a_info.key] = a_tensor
    tensors[module.b_info.key] = b_tensor
    alpha = alpha_for(scale, rank, rslora)
    if module.alpha_key:
        # A stored scalar alpha (kohya, diffusers) in float32: kohya reads it with .item() whatever its dtype.
        tensors[module.alpha_key] = torch.tensor(alpha, dtype=torch.float32)
    if module.bias_key:
        bias = adapter.source.get(module.bias_key)
        if scale != module.scale:
            # PEFT multiplies lora_B's bias by the scale too: keep scale·bias when the scale had to change.
            bias = (bias.to(torch.float64) * (module.scale / scale)).to(bias.dtype)
        tensors[module.bias_key] = bias
    if module.magnitude_key:
        tensors[module.magnitude_key] = adapter.source.get(module.magnitude_key)
    return LoraModule(
        name=module.name, kind=module.kind, rank=rank, alpha=alpha, scale=scale,
        a_info=TensorInfo(module.a_info.key, _st(a_tensor), tuple(a_tensor.shape)),
        b_info=TensorInfo(module.b_info.key, _st(b_tensor), tuple(b_tensor.shape)),
        bias_key=module.bias_key, magnitude_key=module.magnitude_key, alpha_key=module.alpha_key,
        flags=list(module.flags),
    )


def _carry_module(adapter: Adapter, module: LoraModule, tensors: dict[str, torch.Tensor]) -> LoraModule:
    for key in module.tensor_keys:
        tensors[key] = adapter.source.get(key)
    return copy.copy(module)


def _carry_extras(adapter: Adapter, modules: dict[str, LoraModule], tensors: dict[str, torch.Tensor]) -> None:
    for info in adapter.extra_tensors:
        tensors[info.key] = adapter.source.get(info.key)


def _st(tensor: torch.Tensor) -> str:
    from lora_tools.tensorfile import safetensors_dtype

    return safetensors_dtype(tensor)


def _row(module: LoraModule, new_rank: int, kept: float, flags: list[str],
         output_kept: float | None = None) -> dict[str, Any]:
    return {
        "name": module.name,
        "kind": module.kind,
        "shape": [module.out_features, module.in_features],
        "old_rank": module.rank,
        "new_rank": new_rank,
        "retained_energy": kept,
        "rel_fro_error": relative_error(kept) if math.isfinite(kept) else float("nan"),
        "method": "activation-aware" if output_kept is not None else "svd",
        # Activation-aware modules: share of the calibration output energy ‖ΔW X‖² kept, and the relative
        # output error sqrt(1 − that) — the quantity this method minimises.
        "retained_output_energy": output_kept,
        "rel_output_error": relative_error(output_kept) if output_kept is not None else None,
        "flags": flags,
    }


def _tensor_bytes(adapter: Adapter) -> int:
    infos = adapter.source.infos()
    return sum(info.nbytes for info in infos.values())


def _report(old: Adapter, new: Adapter, rows: list[dict[str, Any]], description: str, total_energy: float,
            kept_energy: float, warnings: list[str]) -> dict[str, Any]:
    return {
        "path": str(old.path),
        "format": old.format,
        "selection": description,
        "num_modules": len(rows),
        "modules": rows,
        "params_before": old.total_params,
        "params_after": new.total_params,
        "bytes_before": _tensor_bytes(old),
        "bytes_after": _tensor_bytes(new),
        "retained_energy": kept_energy / total_energy if total_energy > 0 else 1.0,
        "warnings": warnings,
    }
