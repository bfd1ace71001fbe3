"""``compare-quant``: truncation vs rounding, measured on real layer outputs, as a report dict.

Plan (``prepare_compare``): resolve the layers, load the base model and tokenize the calibration text, split the
sequences into calibration and held-out parts. Run (``CompareJob.run``):

1. forward the calibration sequences (adapter applied by hooks for ``delta``/``merged``) and accumulate
   C_calib = Σ x xᵀ per layer;
2. fit every method per layer from the weights (and C_calib for ``svd-act``);
3. forward the held-out sequences: accumulate C_holdout and stream per-token statistics of every method's ΔY;
4. finalize per layer: Frobenius errors from C_calib / C_holdout, error structure, noise-model prediction, the
   built-in check that ``svd-act``'s calibration error equals the eigenvalue tail.

Nothing fitted ever sees the held-out split.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools import __version__
from lora_tools.adapter import Adapter, LoraModule
from lora_tools.capture import (
    CovarianceAccumulator,
    lora_hooks,
    random_inputs,
    run_model,
    split_tokens,
)
from lora_tools.compare.holdout import TokenCounts
from lora_tools.compare.methods import (
    Approximation,
    ErrorMap,
    OutputEigen,
    Target,
    activation_aware,
    equal_budget_rank,
    output_eigen,
    quantize_target,
    svd_truncation,
    target_svd,
)
from lora_tools.compare.metrics import (
    EnergyContext,
    OutputErrorStats,
    approximation_error_structure,
    rel_error,
    snr_db,
    uniform_noise_prediction,
)
from lora_tools.compare.options import CompareOptions, display_path
from lora_tools.compare.summary import aggregate, mark_duplicates, summary
from lora_tools.errors import LoraToolsError
from lora_tools.memory import release_free_memory
from lora_tools.quant import QuantScheme

log = logging.getLogger(__name__)

# Relative tolerance of the built-in check: svd-act's calibration error² vs the eigenvalue tail (both float64).
OPTIMAL_CHECK_RTOL = 1e-6
STATS_CHUNK = 256


@dataclass
class Layer:
    """One compared layer and everything accumulated for it."""

    name: str
    lora: LoraModule | None
    target: Target
    model_name: str | None = None
    calib: CovarianceAccumulator | None = None
    holdout: CovarianceAccumulator | None = None
    approximations: list[Approximation] = field(default_factory=list)
    stats: list[OutputErrorStats] = field(default_factory=list)
    error_maps: list[ErrorMap] = field(default_factory=list)
    optimal: list[float] = field(default_factory=list)  # sqrt(tail_k)/‖Y‖ on calibration, k = 0..max_rank
    eigen: OutputEigen | None = None
    entries: list[tuple[int, str | None]] = field(default_factory=list)  # result rows: (approximation, budget)
    notes: list[str] = field(default_factory=list)


@dataclass
class CompareJob:
    """A prepared comparison: call ``run`` (``steps`` progress units: sequences forwarded + layers fitted)."""

    options: CompareOptions
    device: torch.device
    layers: list[Layer]
    schemes: list[QuantScheme]
    ranks: tuple[int, ...]
    adapter: Adapter | None
    base_path: Path | None
    model: Any = None
    pad_id: int = 0
    calib_sequences: list[list[int]] = field(default_factory=list)
    holdout_sequences: list[list[int]] = field(default_factory=list)
    calib_description: str = ""
    unmatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    counts: TokenCounts | None = None  # set by prepare_compare, after the token check
    end_to_end: bool = False  # set by prepare_compare (compare.whole_model.planned)
    end_to_end_skipped: str | None = None  # why end-to-end evaluation does not run, when it does not
    end_to_end_metric: str = "kl"  # "kl" (causal LM) or "cosine" (encoder), set with end_to_end
    base_note: str | None = None  # what a report must say about the base (e.g. its weights were 4-bit)

    @property
    def evaluation(self) -> str:
        """"held-out", or "in-sample" when --holdout 0 asked for no split."""
        return self.counts.evaluation if self.counts is not None else "held-out"

    @property
    def random(self) -> bool:
        return self.model is None

    @property
    def steps(self) -> int:
        forwarded = len(self.calib_sequences) + len(self.holdout_sequences) if not self.random else 2 * len(
            self.layers)
        steps = forwarded + len(self.layers)
        if self.end_to_end:
            from lora_tools.compare.whole_model import evaluation_sequences

            steps += len(evaluation_sequences(self))
        return steps

    @torch.no_grad()
    def run(self, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        advance = progress or (lambda n: None)
        for layer in self.layers:
            dim = layer.target.shape[1]
            layer.calib = CovarianceAccumulator(dim, self.device)
            layer.holdout = CovarianceAccumulator(dim, self.device)
        by_name = {layer.name: layer for layer in self.layers}

        def on_calib(name: str, x: torch.Tensor) -> None:
            by_name[name].calib.update(x)

        self._forward(self.calib_sequences, on_calib, advance, seed=self.options.seed)
        for layer in self.layers:
            self._fit(layer)
            advance(1)

        def on_holdout(name: str, x: torch.Tensor) -> None:
            layer = by_name[name]
            layer.holdout.update(x)
            for start in range(0, x.shape[0], STATS_CHUNK):
                x32 = x[start:start + STATS_CHUNK].to(torch.float32)
                y = layer.target.apply(x32)  # (t, out)
                y_sq = y.square().sum(dim=1, dtype=torch.float64)  # (t,)
                for error_map, stats in zip(layer.error_maps, layer.stats, strict=True):
                    stats.update(y, error_map(x32, y), y_sq)

        self._forward(self.holdout_sequences, on_holdout, advance, seed=self.options.seed + 1)
        report = self._report()
        for layer in self.layers:
            # The per-layer report is done: only the calibration covariances (svd-act variants) are still needed.
            # On SmolLM2 the held-out ones are 1 GB of float64.
            layer.holdout, layer.error_maps, layer.stats = None, [], []
        release_free_memory()
        if self.end_to_end:
            from lora_tools.compare.whole_model import run_end_to_end

            report["end_to_end"] = run_end_to_end(self, advance)
        else:
            report["end_to_end"] = None
            report["end_to_end_skipped"] = self.end_to_end_skipped
        return report

    # --- the three stages ------------------------------------------------------------------------------------

    def _forward(self, sequences: list[list[int]], callback: Callable[[str, torch.Tensor], None],
                 advance: Callable[[int], None], seed: int) -> None:
        if self.random:
            calib_tokens, holdout_tokens = split_tokens(self.options.max_tokens, self.options.holdout)
            tokens = calib_tokens if seed == self.options.seed else holdout_tokens
            dims = {layer.name: layer.target.shape[1] for layer in self.layers}
            random_inputs(dims, tokens, callback, seed=seed, device=self.device)
            advance(len(self.layers))
            return
        if not sequences:
            return
        factors = {}
        if self.options.target != "base":
            # The inputs of every layer are those of the adapted model (earlier layers' LoRA included).
            dtype = next(self.model.parameters()).dtype
            for layer in self.layers:
                B, A = self.adapter.factors(layer.name)
                factors[layer.name] = (B.to(self.device, dtype), A.to(self.device, dtype), layer.lora.scale)
        with lora_hooks(self.modules, factors) if factors else contextlib.nullcontext():
            run_model(self.model, self.modules, sequences, callback, pad_id=self.pad_id,
                      batch_size=self.options.batch_size, device=self.device, progress=advance)

    def _fit(self, layer: Layer) -> None:
        target = layer.target
        C = layer.calib.gram
        eigen = output_eigen(target, C)
        total = eigen.total_energy
        layer.optimal = [math.sqrt(eigen.tail_energy(k) / total) if total > 0 else math.nan
                         for k in range(target.max_rank + 1)]
        svd = target_svd(target)
        approximations: list[Approximation] = []
        entries: list[tuple[int, str | None]] = []  # (index into approximations, equal_budget_to)
        lowrank: dict[tuple[str, int], int] = {}

        def add_lowrank(rank: int, equal_budget_to: str | None) -> None:
            # An equal-budget rank that is also a --ranks rank reuses that approximation (and its statistics).
            for method, build in (("svd", lambda: svd_truncation(target, svd, rank)),
                                  ("svd-act", lambda: activation_aware(target, eigen, rank))):
                if (method, rank) not in lowrank:
                    lowrank[(method, rank)] = len(approximations)
                    approximations.append(build())
                entries.append((lowrank[(method, rank)], equal_budget_to))

        for scheme in self.schemes:
            entries.append((len(approximations), None))
            approximations.append(quantize_target(target, scheme))
        quantized = list(approximations)
        for rank in self.ranks:
            if rank > target.max_rank:
                layer.notes.append(f"rank {rank} skipped: exceeds the layer's rank {target.max_rank}")
                continue
            add_lowrank(rank, None)
        for approx in quantized:
            add_lowrank(equal_budget_rank(target.shape, approx.bytes, target.max_rank), approx.method)
        layer.entries = entries
        layer.approximations = approximations
        # rms of one output entry on calibration: the unit of the error-entry histogram.
        entry_rms = math.sqrt(total / max(layer.calib.tokens * target.shape[0], 1))
        plotted = {i for i, budget in entries if budget is not None or approximations[i].steps}
        layer.stats = [OutputErrorStats(self.device, entry_rms, entry_histogram=i in plotted)
                       for i in range(len(approximations))]
        layer.eigen = eigen  # kept for the built-in check in _finalize
        layer.error_maps = [ErrorMap(target, approx) for approx in approximations]

    def _finalize(self, layer: Layer) -> dict[str, Any]:
        target = layer.target
        C_calib, C_hold = layer.calib.gram, layer.holdout.gram
        has_hold = layer.holdout.tokens > 0
        W = target.dense(torch.float64).to(self.device)  # (out, in)
        calib_ctx = EnergyContext(target, C_calib, W)
        hold_ctx = EnergyContext(target, C_hold, W)
        y_calib, y_hold = calib_ctx.y, hold_ctx.y
        eigen = layer.eigen
        computed = []
        for approx, stats in zip(layer.approximations, layer.stats, strict=True):
            err_calib, _, _ = calib_ctx.energies(approx)
            err_hold, y_hat_hold, inner = hold_ctx.energies(approx)
            if approx.method == "svd-act":
                expected = eigen.tail_energy(approx.rank)
                if abs(err_calib - expected) > OPTIMAL_CHECK_RTOL * y_calib + 1e-300:
                    raise LoraToolsError(
                        f"internal check failed for {layer.name}: svd-act error² {err_calib:.6g} at rank "
                        f"{approx.rank} differs from the eigenvalue tail {expected:.6g}")
            stable_rank, top1 = approximation_error_structure(target, approx, W)
            predicted = uniform_noise_prediction(approx, target, C_hold if has_hold else C_calib)
            measured = err_hold if has_hold else err_calib
            computed.append({
                "method": approx.method,
                "rank": approx.rank,
                "bytes": approx.bytes,
                "bits_per_param": 8.0 * approx.bytes / target.params,
                "rel_error": rel_error(y_hold, err_hold) if has_hold else math.nan,
                "rel_error_calib": rel_error(y_calib, err_calib),
                "snr_db": snr_db(y_hold, err_hold) if has_hold else math.nan,
                "cosine": inner / math.sqrt(y_hold * y_hat_hold) if y_hold > 0 and y_hat_hold > 0 else math.nan,
                **stats.summary(),
                "error_stable_rank": stable_rank,
                "error_top1_energy": top1,
                "uniform_noise_ratio": (measured / predicted if predicted else math.nan)
                if predicted is not None else None,
                "_energy": (y_hold, err_hold, y_calib, err_calib, inner, y_hat_hold),
            })
        results = []
        for index, budget in layer.entries:
            base = computed[index]
            label = f"{base['method']}@{budget}" if budget else layer.approximations[index].label
            results.append({"label": label, "method": base["method"], "rank": base["rank"],
                            "equal_budget_to": budget, **{k: v for k, v in base.items()
                                                          if k not in ("method", "rank")}})
        mark_duplicates(results, [index for index, _ in layer.entries])
        return {
            "name": layer.name,
            "model_module": layer.model_name,
            "kind": layer.lora.kind if layer.lora else "linear",
            "shape": list(target.shape),
            "params": target.params,
            "reference_bytes": target.reference_bytes,
            "optimal_rel_error_calib": layer.optimal,
            "notes": layer.notes,
            "results": results,
        }

    def _report(self) -> dict[str, Any]:
        layers = [self._finalize(layer) for layer in self.layers]
        layer_stats = [[layer.stats[index] for index, _ in layer.entries] for layer in self.layers]
        aggregate_rows, histograms = aggregate(layers, layer_stats)
        for row in layers:
            for result in row["results"]:
                result.pop("_energy")
        first = self.layers[0] if self.layers else None
        schemes = [s.name for s in self.schemes]
        return {
            "tool": f"loratools {__version__}",
            "base_model": display_path(self.base_path) if self.base_path else None,
            "base_note": self.base_note,
            # The name the adapter gives its base, whether or not a base model was loaded.
            "adapter_base_model": self.adapter.base_model if self.adapter else None,
            "base_model_run": not self.random,
            "inputs": "random" if self.random else "captured",
            "adapter": display_path(self.adapter.path) if self.adapter else None,
            "target": self.options.target,
            "device": str(self.device),
            "dtype": self.options.dtype,
            "calib": self.calib_description,
            # Which tokens the errors in "summary" (and rel_error) were measured on; see compare.holdout.
            "evaluation": self.evaluation,
            "calib_tokens": first.calib.tokens if first else 0,
            "holdout_tokens": first.holdout.tokens if first else 0,
            "calib_sequences": len(self.calib_sequences),
            "holdout_sequences": len(self.holdout_sequences),
            "holdout_fraction": self.options.holdout,
            "min_tokens": max(layer.target.shape[1] for layer in self.layers) if self.layers else 0,
            "ranks": list(self.ranks),
            "schemes": schemes,
            "unmatched_modules": self.unmatched,
            "skipped_modules": self.skipped,
            "layers": layers,
            "aggregate": aggregate_rows,
            "summary": summary(layers, aggregate_rows, schemes, self.evaluation),
            "error_histograms": histograms,
        }
