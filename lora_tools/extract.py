"""Extract a LoRA adapter from a fine-tuned model: the best rank-R (or energy-F) approximation of W_ft − W0.

For every weight of a linear layer (nn.Linear, or GPT-2's Conv1D, seen as its (out, in) map) that differs between
the two models, the difference D is factored by a truncated SVD (Eckart–Young: the best rank-R approximation in
Frobenius norm), D ≈ U_R·S_R·V_Rᵀ, stored balanced as B = U_R·sqrt(S_R), A = sqrt(S_R)·V_Rᵀ with scale 1. Small
layers (min(out, in) <= ``EXACT_LIMIT``) and energy selection use the exact dense SVD; larger layers at a fixed
rank use a randomized range finder (Halko et al. 2011; ``torch.svd_lowrank`` with oversampling and power
iterations), whose retained energy ‖U_RᵀD‖² / ‖D‖² is still measured exactly and reported, and which falls back to
the exact SVD when it keeps visibly less than it should (accuracy check against a second, larger sketch).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.builder import AdapterBuilder
from lora_tools.errors import BaseModelError, InvalidOptionError
from lora_tools.fold import base_keys, weight_files
from lora_tools.linalg import single_threaded
from lora_tools.linalg.truncate import RankRule, relative_error
from lora_tools.truncate import parse_number, parse_positive_int

logger = logging.getLogger(__name__)

EXACT_LIMIT = 2048
OVERSAMPLE = 10
POWER_ITERATIONS = 4


def select(rank: Any, energy: Any) -> RankRule:
    if (rank is None) == (energy is None):
        raise InvalidOptionError("say how to pick ranks: exactly one of --rank R and --energy F")
    if rank is not None:
        return RankRule("fixed", parse_positive_int(rank, "--rank"))
    fraction = parse_number(energy, "--energy")
    if not 0.0 < fraction <= 1.0:
        raise InvalidOptionError(f"--energy must lie in (0, 1], found {fraction:g}")
    return RankRule("energy", fraction)


def linear_kinds(model_dir: Path) -> dict[str, str] | None:
    """Module name -> "linear" | "conv1d" from the model's architecture (built on the meta device, no weights);
    None when the folder has no usable config.json."""
    config_path = model_dir / "config.json" if model_dir.is_dir() else None
    if config_path is None or not config_path.is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        architecture = getattr(transformers, (config.architectures or ["AutoModel"])[0])
        with torch.device("meta"):
            model = (architecture.from_config(config) if architecture.__name__.startswith("Auto")
                     else architecture(config))
    except Exception as exc:  # an unknown architecture: fall back to treating 2-D weights as linear
        logger.warning("cannot build %s from its config (%s); treating every 2-D weight as linear", model_dir, exc)
        return None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif type(module).__name__ == "Conv1D":
            kinds[name] = "conv1d"
    return kinds


@torch.no_grad()
def truncated_svd(D: torch.Tensor, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(U_k, S_k, Vh_k, retained energy, method) of the (out, in) difference ``D``."""
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


def extract(base: Path, finetuned: Path, *, rank: Any = None, energy: Any = None,
            dtype: str = "fp32") -> tuple[Adapter, dict[str, Any]]:
    """A PEFT adapter (in memory) holding the truncated differences of every changed linear weight."""
    from safetensors import safe_open

    from lora_tools.truncate import OUTPUT_DTYPES

    rule = select(rank, energy)
    if dtype not in OUTPUT_DTYPES:
        raise InvalidOptionError(f"unknown --dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    base_index, ft_index = base_keys(weight_files(base)), base_keys(weight_files(finetuned))
    kinds = linear_kinds(finetuned) or linear_kinds(base)
    warnings: list[str] = []
    if kinds is None:
        warnings.append("no config.json: every 2-D '*.weight' tensor was treated as an nn.Linear weight (out, in)")
    builder = AdapterBuilder("peft", Path(f"extract({finetuned})"), base_model=str(base))
    rows: list[dict[str, Any]] = []
    unchanged = skipped = 0
    with single_threaded():
        for key, ft_file in ft_index.items():
            if not key.endswith(".weight") or key not in base_index:
                continue
            name = key[: -len(".weight")]
            kind = kinds.get(name) if kinds is not None else "linear"
            with safe_open(str(ft_file), framework="pt") as handle:
                w_ft = handle.get_tensor(key)
            if w_ft.ndim != 2 or not w_ft.is_floating_point():
                continue  # norms, biases, buffers
            if kind is None:
                skipped += 1  # embeddings, heads of other types: not a linear layer PEFT would adapt here
                continue
            with safe_open(str(base_index[key]), framework="pt") as handle:
                w_0 = handle.get_tensor(key)
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
                raise BaseModelError(f"{ft_file}: tensor {key!r}: the difference from {base_index[key]} contains "
                                     "NaN or Inf; nothing to extract from a broken weight")
            if kind == "conv1d":
                D = D.T  # Conv1D stores (in, out); the LoRA factors describe the (out, in) map
            U, S, Vh, kept, method = truncated_svd(D, rule)
            root = S.clamp_min(0).sqrt()
            builder.add_module(name, kind, U * root, root[:, None] * Vh, scale=1.0, alpha=float(S.numel()),
                               dtype=OUTPUT_DTYPES[dtype])
            rows.append({"name": name, "shape": list(D.shape), "rank": int(S.numel()), "retained_energy": kept,
                         "rel_fro_error": relative_error(kept), "method": method})
    if not rows:
        raise BaseModelError(f"{finetuned}: no linear weight differs from {base}; nothing to extract")
    names = sorted(builder.modules)
    builder.config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "task_type": None,
                      "target_modules": names, "fan_in_fan_out": any(m.kind == "conv1d"
                                                                     for m in builder.modules.values()),
                      "use_rslora": False, "bias": "none", "lora_dropout": 0.0, "inference_mode": True}
    builder.metadata["loratools_extract"] = json.dumps({"base": str(base), "finetuned": str(finetuned),
                                                        "selection": rule.description})
    conv1d_and_linear = {m.kind for m in builder.modules.values()} == {"linear", "conv1d"}
    if conv1d_and_linear:
        warnings.append("both nn.Linear and Conv1D layers changed; PEFT's single fan_in_fan_out flag is set for "
                        "Conv1D and ignored for Linear layers")
    adapter = builder.build()
    report = {"base": str(base), "finetuned": str(finetuned), "selection": rule.description,
              "num_modules": len(rows), "num_unchanged": unchanged, "num_skipped": skipped, "modules": rows,
              "mean_retained_energy": sum(r["retained_energy"] for r in rows) / len(rows),
              "min_retained_energy": min(r["retained_energy"] for r in rows), "warnings": warnings}
    if any(math.isnan(r["retained_energy"]) for r in rows):
        warnings.append("some differences are not finite")
    return adapter, report
