"""Extract a LoRA adapter from a fine-tuned model: the best rank-R (or energy-F) approximation of W_ft − W0.

For every weight of a linear layer (nn.Linear, or GPT-2's Conv1D, seen as its (out, in) map) that differs between
the two models, the difference D is factored by a truncated SVD (Eckart–Young: the best rank-R approximation in
Frobenius norm), D ≈ U_R·S_R·V_Rᵀ, stored balanced as B = U_R·sqrt(S_R), A = sqrt(S_R)·V_Rᵀ with scale 1. Small
layers (min(out, in) <= ``EXACT_LIMIT``) and energy selection use the exact dense SVD; larger layers at a fixed
rank use a randomized range finder (Halko et al. 2011; ``torch.svd_lowrank`` with oversampling and power
iterations), whose retained energy ‖U_RᵀD‖² / ‖D‖² is still measured exactly and reported, and which falls back to
the exact SVD when it keeps visibly less than it should (accuracy check against a second, larger sketch).

Every other tensor that differs (norms, biases, embeddings, tied copies, tensors in one model only) is listed with
its relative change; ``include_other`` stores what PEFT can carry (see ``lora_tools.extract_other``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.builder import AdapterBuilder
from lora_tools.errors import BaseModelError, InvalidOptionError
from lora_tools.extract_other import change_row, model_layout, plan_other, tensor_change
from lora_tools.fold import base_keys, weight_files
from lora_tools.formats.peft import PREFIX as PEFT_PREFIX
from lora_tools.formats.peft import natural_key
from lora_tools.linalg import single_threaded
from lora_tools.linalg.lowrank import idle_threads
from lora_tools.linalg.truncate import RankRule, relative_error
from lora_tools.truncate import parse_number, parse_positive_int

logger = logging.getLogger(__name__)

EXACT_LIMIT = 2048
OVERSAMPLE = 10
POWER_ITERATIONS = 4
# Differences with fewer elements than this are factored on one thread: OpenMP's fork/join costs more than a second
# thread gains (on the shared 2-core machine: 128x128 float64 SVD 2.3 ms on 1 thread, 5.6 ms on 2). Above it, see
# ``svd_threads``. The crossover could not be pinned down there (load 5-12 on 2 cores: 2 threads were 0.35-0.98x
# as fast as 1 at every size up to 768x3072; one run at load 4.7 gave 1.9x at 256x256 and 384x384).
THREADED_MIN_ELEMENTS = 256 * 256


def select(rank: Any, energy: Any) -> RankRule:
    if (rank is None) == (energy is None):
        raise InvalidOptionError("say how to pick ranks: exactly one of --rank R and --energy F")
    if rank is not None:
        return RankRule("fixed", parse_positive_int(rank, "--rank"))
    fraction = parse_number(energy, "--energy")
    if not 0.0 < fraction <= 1.0:
        raise InvalidOptionError(f"--energy must lie in (0, 1], found {fraction:g}")
    return RankRule("energy", fraction)


@torch.no_grad()
def truncated_svd(D: torch.Tensor, rule: RankRule, max_threads: int | None = None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(U_k, S_k, Vh_k, retained energy, method) of the (out, in) difference ``D``, on up to ``max_threads``
    threads (default: torch's current number)."""
    threads = svd_threads(D.numel(), torch.get_num_threads() if max_threads is None else max_threads)
    if threads == 1:
        with single_threaded():
            return _truncated_svd(D, rule)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _truncated_svd(D, rule)
    finally:
        torch.set_num_threads(previous)


def svd_threads(numel: int, threads: int) -> int:
    """Threads for the SVD of a ``numel``-element difference: one below ``THREADED_MIN_ELEMENTS``; above,
    ``threads`` (torch's, by default one per core) capped by the cores other work leaves idle. A thread that waits
    for a busy core holds up the others at every OpenMP barrier: on 2 cores at load 10, GPT-2's 48 SVDs took 164 s
    on 2 threads and 146 s on 1."""
    if numel < THREADED_MIN_ELEMENTS or threads <= 1:
        return 1
    return idle_threads(threads)


def _truncated_svd(D: torch.Tensor, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    total = float(D.double().square().sum())
    small = min(D.shape) <= EXACT_LIMIT
    if rule.method == "fixed" and not small:
        k = min(int(rule.value), min(D.shape))
        U, S, V = torch.svd_lowrank(D, q=min(k + OVERSAMPLE, min(D.shape)), niter=POWER_ITERATIONS)
        kept = float(S[:k].double().square().sum()) / total if total > 0 else 1.0
        # Accuracy check: a second, larger sketch must not find noticeably more energy in k directions.
        U2, S2, _ = torch.svd_lowrank(D, q=min(2 * k + OVERSAMPLE, min(D.shape)), niter=POWER_ITERATIONS + 2)
        better = float(S2[:k].double().square().sum()) / total if total > 0 else 1.0
        if better <= kept * (1 + 1e-4) + 1e-12:
            return U[:, :k], S[:k], V[:, :k].T, kept, "randomized"
        logger.info("randomized SVD inaccurate (%.6g vs %.6g); using the exact SVD", kept, better)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = max(1, min(rule.select(S.double()), S.numel()))
    kept = float(S[:k].double().square().sum()) / total if total > 0 else 1.0
    return U[:, :k], S[:k], Vh[:k], min(1.0, kept), "exact"


def extract(base: Path, finetuned: Path, *, rank: Any = None, energy: Any = None, dtype: str = "fp32",
            include_other: bool = False) -> tuple[Adapter, dict[str, Any]]:
    """A PEFT adapter (in memory) holding the truncated differences of every changed linear weight.

    Every other tensor that differs (norms, biases, embeddings, tensors in one model only) is listed in the report
    with its relative change; ``include_other`` stores those PEFT can carry (``modules_to_save``, ``lora_B.bias``).
    """
    from safetensors import safe_open

    from lora_tools.truncate import OUTPUT_DTYPES

    rule = select(rank, energy)
    if dtype not in OUTPUT_DTYPES:
        raise InvalidOptionError(f"unknown --dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    base_index, ft_index = base_keys(weight_files(base)), base_keys(weight_files(finetuned))
    layout = model_layout(finetuned) or model_layout(base)
    kinds = layout.kinds if layout is not None else None
    warnings: list[str] = []
    if kinds is None:
        warnings.append("no config.json: every 2-D '*.weight' tensor was treated as an nn.Linear weight (out, in)")
    builder = AdapterBuilder("peft", Path(f"extract({finetuned})"), base_model=str(base))
    changed_other = [change_row(key, shape, note="only in the base model")
                     for key, shape in _shapes(base_index, set(base_index) - set(ft_index)).items()]

    def read(index: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(str(index[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    # The reads, comparisons and differences are memory-bound: on the busy 2-core machine a second thread made them
    # 3x slower (GPT-2 pair: 8.6 s vs 2.7 s), so the loop runs on one thread and only large SVDs get more.
    max_threads = torch.get_num_threads()
    with single_threaded():
        rows, unchanged, other_unchanged = _compare_and_factor(
            base_index, ft_index, read, kinds, rule, OUTPUT_DTYPES[dtype], max_threads, builder, changed_other)
    plan = plan_other(changed_other, lora_modules={n: m.kind for n, m in builder.modules.items()}, layout=layout,
                      ft_keys=set(ft_index), base_keys=set(base_index), include=include_other)
    if not rows:
        other = f" ({len(plan.rows)} other tensor(s) differ, e.g. {plan.rows[0]['name']})" if plan.rows else ""
        raise BaseModelError(f"{finetuned}: no linear weight differs from {base}; nothing to extract{other}")
    for keys in plan.modules_to_save.values():
        for key, source in keys.items():
            # kept in the fine-tuned dtype, bit for bit: PEFT copies them into its module as they are
            builder.add_tensor(f"{PEFT_PREFIX}{key}", read(ft_index, source).contiguous())
    if plan.lora_biases:
        for name, module in builder.modules.items():
            # lora_bias is one flag for all adapted layers: the unchanged ones get a zero bias
            bias_key = plan.lora_biases.get(name)
            delta = (read(ft_index, bias_key).double() - read(base_index, bias_key).double() if bias_key
                     else torch.zeros(module.out_features, dtype=torch.float64))
            module.bias_key = f"{PEFT_PREFIX}{name}.lora_B.bias"
            builder.tensors[module.bias_key] = delta.to(OUTPUT_DTYPES[dtype])
    names = sorted(builder.modules)
    builder.config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "task_type": None,
                      "target_modules": names, "fan_in_fan_out": any(m.kind == "conv1d"
                                                                     for m in builder.modules.values()),
                      "use_rslora": False, "bias": "none", "lora_dropout": 0.0, "inference_mode": True}
    if plan.modules_to_save:
        builder.config["modules_to_save"] = sorted(plan.modules_to_save, key=natural_key)
    if plan.lora_biases:
        builder.config["lora_bias"] = True
        warnings.append(f"{len(plan.lora_biases)} bias change(s) of LoRA layers stored as lora_B.bias "
                        "(lora_bias=true): loading needs PEFT >= 0.14")
    builder.metadata["loratools_extract"] = json.dumps({"base": str(base), "finetuned": str(finetuned),
                                                        "selection": rule.description})
    conv1d_and_linear = {m.kind for m in builder.modules.values()} == {"linear", "conv1d"}
    if conv1d_and_linear:
        warnings.append("both nn.Linear and Conv1D layers changed; PEFT's single fan_in_fan_out flag is set for "
                        "Conv1D and ignored for Linear layers")
    warnings += _other_warnings(plan.rows, include_other)
    adapter = builder.build()
    report = {"base": str(base), "finetuned": str(finetuned), "selection": rule.description,
              "num_modules": len(rows), "num_unchanged": unchanged, "modules": rows,
              "mean_retained_energy": sum(r["retained_energy"] for r in rows) / len(rows),
              "min_retained_energy": min(r["retained_energy"] for r in rows),
              "include_other": include_other, "num_other_changed": len(plan.rows),
              "num_other_unchanged": other_unchanged, "other_tensors": plan.rows,
              "modules_to_save": builder.config.get("modules_to_save", []), "warnings": warnings}
    if any(math.isnan(r["retained_energy"]) for r in rows):
        warnings.append("some differences are not finite")
    return adapter, report


def _compare_and_factor(base_index: dict[str, Path], ft_index: dict[str, Path],
                        read: Callable[[dict[str, Path], str], torch.Tensor], kinds: dict[str, str] | None,
                        rule: RankRule, out_dtype: torch.dtype, max_threads: int, builder: AdapterBuilder,
                        changed_other: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """Add a LoRA module to ``builder`` for every changed linear weight and append every other changed tensor to
    ``changed_other``; return (module rows, identical linear weights, identical other tensors)."""
    rows: list[dict[str, Any]] = []
    unchanged = other_unchanged = 0
    for key in ft_index:
        w_ft = read(ft_index, key)
        if key not in base_index:
            changed_other.append(change_row(key, list(w_ft.shape), note="not in the base model"))
            continue
        w_0 = read(base_index, key)
        name = key[: -len(".weight")]
        kind = (kinds.get(name) if kinds is not None else "linear") if key.endswith(".weight") else None
        if kind is None or w_ft.ndim != 2 or not w_ft.is_floating_point():
            # norms, biases, embeddings, buffers: not a linear map LoRA factors describe
            if w_0.shape != w_ft.shape:
                changed_other.append(change_row(key, list(w_ft.shape), note=f"shape {list(w_ft.shape)} differs from "
                                                f"the base's {list(w_0.shape)}"))
            elif torch.equal(w_0, w_ft):
                other_unchanged += 1
            else:
                changed_other.append(change_row(key, list(w_ft.shape), *tensor_change(w_0, w_ft)))
            continue
        if w_0.shape != w_ft.shape:
            raise BaseModelError(f"{key}: base weight {list(w_0.shape)} vs fine-tuned {list(w_ft.shape)}; "
                                 "not the same architecture")
        if torch.equal(w_0, w_ft):
            unchanged += 1
            continue
        work = torch.float64 if w_ft.numel() <= (1 << 22) else torch.float32
        D = w_ft.to(work) - w_0.to(work)
        if not bool(torch.isfinite(D).all()):
            # an SVD of NaN/Inf fails inside LAPACK; name the tensor and the files instead
            raise BaseModelError(f"{ft_index[key]}: tensor {key!r}: the difference from {base_index[key]} contains "
                                 "NaN or Inf; nothing to extract from a broken weight")
        if kind == "conv1d":
            D = D.T  # Conv1D stores (in, out); the LoRA factors describe the (out, in) map
        U, S, Vh, kept, method = truncated_svd(D, rule, max_threads)
        root = S.clamp_min(0).sqrt()
        builder.add_module(name, kind, U * root, root[:, None] * Vh, scale=1.0, alpha=float(S.numel()),
                           dtype=out_dtype)
        rows.append({"name": name, "shape": list(D.shape), "rank": int(S.numel()), "retained_energy": kept,
                     "rel_fro_error": relative_error(kept), "method": method})
    return rows, unchanged, other_unchanged


def _shapes(index: dict[str, Path], keys: set[str]) -> dict[str, list[int]]:
    from lora_tools.tensorfile import read_safetensors_header

    shapes: dict[str, list[int]] = {}
    for path in sorted({index[k] for k in keys}):
        infos = read_safetensors_header(path)[0]
        shapes.update({k: list(infos[k].shape) for k in keys if index[k] == path})
    return shapes


def _other_warnings(rows: list[dict[str, Any]], include_other: bool) -> list[str]:
    """One line on what the adapter leaves out of the fine-tune (the table lists every tensor)."""
    left_out = [r for r in rows if not r["saved"]]
    if not left_out:
        return []
    savable = sum(r["saved_as"] is not None for r in left_out)
    largest = max(left_out, key=lambda r: -1.0 if r["rel_change"] is None else r["rel_change"])
    detail = (f"largest relative change {largest['rel_change']:.3g} in {largest['name']}"
              if largest["rel_change"] is not None else f"e.g. {largest['name']}")
    hint = f"; --include-other saves {savable} of them" if savable and not include_other else ""
    return [f"{len(left_out)} changed tensor(s) outside the LoRA modules are not in the adapter ({detail}){hint}"]
