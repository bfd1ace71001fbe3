"""Merge several adapters module by module into one in-memory adapter, with a per-module report.

The merged update of a module is Σ w_i·ΔW_i over the adapters that have it (ΔW_i = s_i·B_i·A_i with each
adapter's own scale: rank, alpha, rsLoRA and rank/alpha patterns all resolved by the readers), unless the method
says otherwise (TIES, DARE and magnitude pruning change the update on purpose). Every module is checked against
that exact weighted sum from the factors: the report's ``rel_error`` is ‖merged − Σ w_i·ΔW_i‖_F / ‖Σ w_i·ΔW_i‖_F,
after the cast to the output dtype.

Before any tensor is merged, the inputs must be of one base model (``bases``: stated base names and shared modules)
and agree on the tensors they carry whole (``heads``: modules_to_save copies such as classification heads).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.builder import AdapterBuilder, widest_dtype
from lora_tools.convert.run import aligned_keys
from lora_tools.errors import InvalidOptionError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats import peft
from lora_tools.linalg import LowRankSVD, lowrank_svd, single_threaded
from lora_tools.linalg.lowrank import idle_threads
from lora_tools.linalg.products import lowrank_fro_norm, lowrank_inner, stack_factors, subspace_similarity
from lora_tools.linalg.truncate import RankRule
from lora_tools.merge import heads as head_rules
from lora_tools.merge.bases import check_bases
from lora_tools.merge.methods import MergeOptions, MergeTerm, weighted_stack
from lora_tools.merge.registry import MergeMethod, get_method
from lora_tools.truncate import OUTPUT_DTYPES, parse_number, parse_positive_int

logger = logging.getLogger(__name__)

# Dense (ties/dare/magnitude) modules with at least this many out·in entries run on the idle cores: their
# out x in SVD is the merge's cost (80% of a 12-module GPT-2 ties merge). Smaller problems, and every factor-space
# one ((out + in) x r), stay on one thread, where OpenMP's fork/join would cost more than the work.
PARALLEL_MIN_ENTRIES = 1 << 18


@dataclass
class MergeResult:
    adapter: Adapter
    report: dict[str, Any] = field(default_factory=dict)


def parse_weights(weights: str | Sequence[float] | None, count: int) -> list[float]:
    """One weight per adapter, from ``"0.5,0.5"`` or a sequence; default 1 each."""
    if weights is None:
        return [1.0] * count
    items = [w for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    values = [parse_number(item.strip() if isinstance(item, str) else item, "--weights") for item in items]
    if len(values) != count:
        raise InvalidOptionError(f"--weights has {len(values)} value(s) but {count} adapter(s) were given; "
                                 "give one weight per adapter")
    return values


def validate_options(method: str, count: int, *, weights: Any = None, rank: Any = None, energy: Any = None,
                     density: Any = None, dtype: str = "keep", heads: str | None = None) -> tuple[
                         MergeMethod, list[float], RankRule | None, float]:
    """Check every option before any tensor is read; return (method, weights, rank rule, density)."""
    merge_method = get_method(method)
    head_rules.parse_heads(heads)
    if count < 1:
        raise InvalidOptionError("merge needs at least one adapter")
    parsed_weights = parse_weights(weights, count)
    if rank is not None and energy is not None:
        raise InvalidOptionError("choose one of --rank and --energy")
    rule: RankRule | None = None
    if rank is not None:
        rule = RankRule("fixed", parse_positive_int(rank, "--rank"))
    elif energy is not None:
        fraction = parse_number(energy, "--energy")
        if not 0.0 < fraction <= 1.0:
            raise InvalidOptionError(f"--energy must lie in (0, 1], found {fraction:g}")
        rule = RankRule("energy", fraction)
    if method == "cat" and rule is not None:
        raise InvalidOptionError("cat is exact and keeps rank Σ r_i; --rank/--energy apply to svd, ties, dare, "
                                 "magnitude and rank1-topk")
    if density is not None and not merge_method.uses_density:
        raise InvalidOptionError(f"--density applies to ties, dare and magnitude, not {method}")
    fraction = 0.2 if density is None else parse_number(density, "--density")
    if not 0.0 < fraction <= 1.0:
        raise InvalidOptionError(f"--density must lie in (0, 1], found {fraction:g}")
    if dtype != "keep" and dtype not in OUTPUT_DTYPES:
        raise InvalidOptionError(f"unknown --dtype {dtype!r}; choose keep, {', '.join(OUTPUT_DTYPES)}")
    return merge_method, parsed_weights, rule, fraction


def module_slots(adapters: Sequence[Adapter]) -> dict[str, list[LoraModule | None]]:
    """Modules by merge key, one slot per adapter (None where an adapter lacks the module), unchecked.

    Adapters in one format match by module name; across formats by the module each name resolves to (the name
    resolution of ``convert``: kohya names against recorded names or the built-in lists, image-model layers in
    diffusers' naming; convert/align.py).
    """
    slots: dict[str, list[LoraModule | None]] = {}
    for index, (adapter, keys) in enumerate(zip(adapters, aligned_keys(adapters), strict=True)):
        for name, module in adapter.modules.items():
            slots.setdefault(keys[name], [None] * len(adapters))[index] = module
    return slots


def align_modules(adapters: Sequence[Adapter], *,
                  slots: dict[str, list[LoraModule | None]] | None = None) -> dict[str, list[LoraModule | None]]:
    """``module_slots`` with each module's layer kind and shape checked across the inputs."""
    slots = module_slots(adapters) if slots is None else slots
    for key, modules in slots.items():
        present = [(i, m) for i, m in enumerate(modules) if m is not None]
        first_index, first = present[0]
        for index, module in present[1:]:
            if (module.kind, module.weight_shape) != (first.kind, first.weight_shape):
                raise ModuleMismatchError(
                    f"module {key}: {adapters[first_index].path} has a {first.kind} update of shape "
                    f"{list(first.weight_shape)} but {adapters[index].path} has a {module.kind} update of shape "
                    f"{list(module.weight_shape)}; the adapters were trained on different base models")
        for index, module in present:
            if module.magnitude_key or module.bias_key:
                what = "a DoRA magnitude" if module.magnitude_key else "a LoRA bias (lora_B.bias)"
                raise UnsupportedAdapterError(
                    f"{adapters[index].path}: module {module.name} has {what}, which does not add linearly; "
                    "merge supports plain LoRA updates only")
    return slots


def _output_config(first: Adapter, names: list[str], heads: head_rules.HeadsChoice) -> dict[str, Any] | None:
    if first.format != "peft" or not first.config:
        return None
    config = dict(first.config)
    # The merged adapter targets exactly its own modules, with plain alpha/r scales; modules_to_save and task_type
    # follow the whole tensors it keeps (heads.output_config).
    config.update({"target_modules": sorted(names, key=peft.natural_key), "use_rslora": False,
                   "use_dora": False, "layers_to_transform": None,
                   "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}})
    heads.warnings.extend(head_rules.output_config(config, heads))
    return config


@contextmanager
def module_threads(merge_method: MergeMethod, entries: int, threads: int) -> Iterator[None]:
    """``threads`` torch threads for a dense module of ``entries`` out·in entries; otherwise unchanged."""
    if not (merge_method.dense and entries >= PARALLEL_MIN_ENTRIES and threads > 1):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def merge_adapters(adapters: Sequence[Adapter], method: str = "cat", *, weights: Any = None, rank: Any = None,
                   energy: Any = None, density: Any = None, seed: int = 0, dtype: str = "keep",
                   heads: str | None = None, allow_different_bases: bool = False,
                   progress: Callable[[int], None] | None = None) -> MergeResult:
    """Merge ``adapters`` with ``method``; returns the merged in-memory adapter (first input's format and module
    names, scale 1 per module) and a report (plain data).

    Refused (``ModuleMismatchError``) when the inputs' bases differ or one shares no module with the others
    (unless ``allow_different_bases``), and when they carry different non-LoRA tensors (modules_to_save heads)
    and ``heads`` (first, average or drop) does not say what to keep."""
    merge_method, weight_values, rule, fraction = validate_options(
        method, len(adapters), weights=weights, rank=rank, energy=energy, density=density, dtype=dtype,
        heads=heads)
    slots = module_slots(adapters)
    base_warnings = check_bases(adapters, slots, allow_different_bases)
    align_modules(adapters, slots=slots)
    head_choice = head_rules.choose_heads(adapters, heads)
    first = adapters[0]
    advance = progress or (lambda n: None)
    options_base = MergeOptions(rank_rule=rule, density=fraction, seed=seed)
    out_format = first.format
    names = []
    for modules in slots.values():
        owner = next(m for m in modules if m is not None)
        names.append(owner.name)
    builder = AdapterBuilder(out_format, Path(f"merge({', '.join(str(a.path) for a in adapters)})"),
                             config=_output_config(first, names, head_choice), base_model=first.base_model,
                             scale_rule="alpha/r (merged: scale 1 per module)")
    for key, tensor in head_choice.tensors.items():
        builder.add_tensor(key, tensor)
    threads = idle_threads() if merge_method.dense else 1
    rows: list[dict[str, Any]] = []
    with single_threaded():
        for key, modules in slots.items():
            present = [(i, m) for i, m in enumerate(modules) if m is not None]
            owner_index, owner = present[0]
            if adapters[owner_index].format != out_format:
                raise ModuleMismatchError(
                    f"module {owner.name} exists only in {adapters[owner_index].path} "
                    f"({adapters[owner_index].format}), not in the first adapter ({first.format}); convert the "
                    "adapters to one format first (loratools convert)")
            terms = []
            for index, module in present:
                B, A = adapters[index].factors(module.name, torch.float64)  # B: (out, r), A: (r, in)
                _check_finite(adapters[index], module, B, A)
                terms.append(MergeTerm(weight_values[index], module.scale * B, A))
            options = MergeOptions(rank_rule=options_base.rank_rule, density=options_base.density,
                                   seed=options_base.seed, module=key)
            # The dense methods' out x in SVD is the one problem worth several threads (see PARALLEL_MIN_ENTRIES).
            with module_threads(merge_method, owner.out_features * owner.in_features, threads):
                merged = merge_method.func(terms, options)
            out_dtype = (widest_dtype([m.a_info.dtype for _, m in present] + [m.b_info.dtype for _, m in present])
                         if dtype == "keep" else OUTPUT_DTYPES[dtype])
            new_module = builder.add_module(owner.name, owner.kind, merged.B, merged.A, scale=1.0,
                                            alpha=float(merged.A.shape[0]), dtype=out_dtype, like=owner)
            stored_B = builder.tensors[new_module.b_info.key].reshape(merged.B.shape).to(torch.float64)
            stored_A = builder.tensors[new_module.a_info.key].reshape(merged.A.shape).to(torch.float64)
            exact_B, exact_A = weighted_stack(terms)
            row = {
                "name": owner.name,
                "kind": owner.kind,
                "shape": [owner.out_features, owner.in_features],
                "ranks_in": [m.rank if m is not None else None for m in modules],
                "rank_out": new_module.rank,
                # One exact SVD per input serves both the error floor (its norm) and the interference.
                **_checks(stored_B, stored_A, exact_B, exact_A, terms),
                **merged.info,
            }
            rows.append(row)
            advance(1)
    warnings: list[str] = base_warnings + head_choice.warnings
    partial = [r["name"] for r in rows if None in r["ranks_in"]]
    if partial:
        warnings.append(f"{len(partial)} module(s) exist in only some adapters and were merged from those "
                        f"(e.g. {partial[0]})")
    if merge_method.dense:
        warnings.append(f"{method} is defined entry-wise on ΔW: each module's dense out x in update was built "
                        "(one module at a time) and the result truncated by a dense SVD")
    builder.metadata["loratools_merge"] = json.dumps({
        "method": method, "inputs": [str(a.path) for a in adapters], "weights": weight_values,
        "density": fraction if merge_method.uses_density else None, "seed": seed if method == "dare" else None,
        "heads": head_choice.report["policy"]})
    merged_adapter = builder.build()
    merged_adapter.warnings = warnings
    report = {
        "method": method,
        "reference": merge_method.reference,
        "exact": merge_method.exact,
        "dense": merge_method.dense,
        "summary": merge_method.summary,
        "inputs": [str(a.path) for a in adapters],
        "input_formats": [a.format for a in adapters],
        "weights": weight_values,
        "selection": rule.description if rule else "method default",
        "density": fraction if merge_method.uses_density else None,
        "seed": seed if method == "dare" else None,
        "num_modules": len(rows),
        "modules": rows,
        "max_rel_error": max((r["rel_error"] for r in rows), default=0.0),
        "params_in": [a.total_params for a in adapters],
        "params_out": merged_adapter.total_params,
        "heads": head_choice.report,
        "warnings": warnings,
    }
    return MergeResult(merged_adapter, report)


def _checks(B: torch.Tensor, A: torch.Tensor, exact_B: torch.Tensor, exact_A: torch.Tensor,
            terms: Sequence[MergeTerm]) -> dict[str, float | None]:
    """The merged module's error against the exact weighted sum and the interference between its inputs."""
    svds = [lowrank_svd(t.B, t.A) for t in terms]
    norms = [float(svd.S.norm()) for svd in svds]  # ‖ΔW_i‖_F
    return {"rel_error": _merge_error(B, A, exact_B, exact_A, terms, norms), **_interference(terms, svds, norms)}


def _merge_error(B: torch.Tensor, A: torch.Tensor, exact_B: torch.Tensor, exact_A: torch.Tensor,
                 terms: Sequence[MergeTerm], norms: list[float]) -> float:
    """‖merged − Σ‖_F / ‖Σ‖_F, with ‖Σ‖ floored at 1e-9·Σ‖w_i·ΔW_i‖: inputs that cancel (Σ ≈ 0) would otherwise
    divide rounding noise by rounding noise."""
    difference = lowrank_fro_norm(*stack_factors([(B, A), (-exact_B, exact_A)]))
    floor = 1e-9 * sum(abs(t.weight) * n for t, n in zip(terms, norms, strict=True))
    denominator = max(lowrank_fro_norm(exact_B, exact_A), floor)
    if denominator == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / denominator


def _check_finite(adapter: Adapter, module: LoraModule, B: torch.Tensor, A: torch.Tensor) -> None:
    if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
        raise ModuleMismatchError(f"{adapter.path}: module {module.name}: LoRA factors contain NaN or Inf; "
                                  "refusing to merge")


def _interference(terms: Sequence[MergeTerm], svds: list[LowRankSVD],
                  norms: list[float]) -> dict[str, float | None]:
    """Worst pairwise |cosine| of the inputs' ΔW and the largest subspace overlap φ (Hu et al. 2021) of their
    column spaces at full rank: 0 means the updates do not interfere, 1 that they share directions."""
    if len(terms) < 2:
        return {"max_abs_cosine": None, "max_subspace_overlap": None}
    cosines, overlaps = [], []
    for (i, a), (j, b) in itertools.combinations(enumerate(terms), 2):
        scale = norms[i] * norms[j]
        cosines.append(abs(lowrank_inner(a.B, a.A, b.B, b.A)) / scale if scale > 0 else 0.0)
        phi = subspace_similarity(svds[i].U, svds[j].U)
        overlaps.append(float(phi[-1, -1]) if phi.numel() else 0.0)
    return {"max_abs_cosine": max(cosines), "max_subspace_overlap": max(overlaps)}
