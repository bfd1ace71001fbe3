"""``compare-quant``: truncation vs rounding, measured on real layer outputs, as a report dict.

The pipeline's stages are files: ``plan`` (options, layers, base model, tokens, offload), ``feed`` (capture:
how each layer's real inputs arrive: whole model in memory, or streamed block by block), ``fit`` (every method
per layer from its weights and C_calib), ``evaluate`` (held-out statistics, each layer's row), ``report`` (the
roll-up) and ``whole_model`` (the end-to-end stage). ``CompareJob.run`` drives them; per stage of the feed:

1. forward the calibration split (adapter applied by hooks for ``delta``/``merged``): C_calib = Σ x xᵀ per layer;
2. fit every method per layer, measure everything that reads C_calib, and free C_calib (a layer never holds
   two in x in covariances);
3. forward the held-out split: C_holdout and streamed per-token statistics of every method's ΔY;
4. finalize each layer's row and free what only it needed, so a streamed run holds one block's statistics.

Nothing fitted ever sees the held-out split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.capture import CovarianceAccumulator, SharedInputs
from lora_tools.compare.holdout import TokenCounts
from lora_tools.compare.methods import Approximation, ErrorMap, OutputEigen, Target
from lora_tools.compare.metrics import OutputErrorStats
from lora_tools.compare.options import CompareOptions
from lora_tools.memory import release_free_memory
from lora_tools.quant import QuantScheme


@dataclass
class Layer:
    """One compared layer and everything accumulated for it."""

    name: str
    lora: LoraModule | None
    target: Target | None  # None until its stage loads the weights (base / merged targets)
    model_name: str | None = None
    module: Any = None  # the base model's module (for W0 of base / merged targets)
    calib: CovarianceAccumulator | None = None
    holdout: CovarianceAccumulator | None = None
    approximations: list[Approximation] = field(default_factory=list)
    stats: list[OutputErrorStats] = field(default_factory=list)
    error_maps: list[ErrorMap] = field(default_factory=list)
    optimal: list[float] = field(default_factory=list)  # sqrt(tail_k)/‖Y‖ on calibration, k = 0..max_rank
    eigen: OutputEigen | None = None
    entries: list[tuple[int, str | None]] = field(default_factory=list)  # result rows: (approximation, budget)
    notes: list[str] = field(default_factory=list)
    span: Any = None  # compare.span.SpanCovariance of C_calib, kept for the end-to-end stage
    calib_energy: tuple[float, list[float]] | None = None  # ‖Y‖² and each approximation's error² on calibration
    calib_noise: list[float | None] = field(default_factory=list)  # uniform-noise predictions on calibration

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the layer's linear map."""
        if self.target is not None:
            return self.target.shape
        return (self.lora.out_features, self.lora.in_features)

    def release(self) -> None:
        """Drop what only the per-layer report needed (C_holdout, approximations, error maps, a dense target);
        C_calib went after the fit (measured by evaluate.measure_calibration), leaving ``span`` for the end-to-end
        stage."""
        if self.holdout is not None:
            self.holdout.release()
        self.approximations, self.error_maps, self.eigen = [], [], None
        if self.target is not None and not self.target.factored:
            self.target = None


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
    model: Any = None  # the model (its weightless skeleton when streamed), None for --calib random
    pad_id: int = 0
    calib_sequences: list[list[int]] = field(default_factory=list)
    holdout_sequences: list[list[int]] = field(default_factory=list)
    calib_description: str = ""
    unmatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    counts: TokenCounts | None = None  # set by plan.prepare_compare, after the token check
    end_to_end: bool = False  # set by plan.prepare_compare (compare.whole_model.planned)
    end_to_end_skipped: str | None = None  # why end-to-end evaluation does not run, when it does not
    end_to_end_metric: str = "kl"  # "kl" (causal LM) or "cosine" (encoder), set with end_to_end
    base_note: str | None = None  # what a report must say about the base (e.g. its weights were 4-bit)
    stream: Any = None  # a lora_tools.model.stream.StreamedModel when the base runs block by block
    offload_plan: dict[str, Any] | None = None  # lora_tools.model.offload's decision, for the report

    @property
    def evaluation(self) -> str:
        """"held-out", or "in-sample" when --holdout 0 asked for no split."""
        return self.counts.evaluation if self.counts is not None else "held-out"

    @property
    def random(self) -> bool:
        return self.model is None

    @property
    def steps(self) -> int:
        from lora_tools.compare.capture import make_feed

        steps = make_feed(self, lambda n: None).steps + len(self.layers)
        if self.end_to_end:
            from lora_tools.compare.whole_model import end_to_end_steps

            steps += end_to_end_steps(self)
        return steps

    def factors(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The adapter's factors for the named layers in the forward dtype (none for ``--target base``): the
        inputs of every layer are those of the adapted model, earlier layers' LoRA included."""
        if self.options.target == "base" or self.random:
            return {}
        from lora_tools.compare.options import DTYPES

        dtype = DTYPES[self.options.dtype]
        result = {}
        for name in names:
            layer = self._by_name[name]
            B, A = self.adapter.factors(name)
            result[name] = (B.to(self.device, dtype), A.to(self.device, dtype), layer.lora.scale)
        return result

    @torch.no_grad()
    def run(self, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        from lora_tools.compare.capture import make_feed
        from lora_tools.compare.evaluate import add_holdout_tokens, finalize_layer, measure_calibration
        from lora_tools.compare.fit import fit_layer
        from lora_tools.compare.report import build_report

        advance = progress or (lambda n: None)
        self._by_name = {layer.name: layer for layer in self.layers}
        feed = make_feed(self, advance)
        rows: dict[str, dict[str, Any]] = {}
        for names in feed.stages():
            layers = [self._by_name[name] for name in names]
            for layer in layers:
                if layer.target is None:
                    layer.target = dense_target(self.options.target, layer, self.adapter, self.device)
                layer.calib = CovarianceAccumulator(layer.shape[1], self.device)
                layer.holdout = CovarianceAccumulator(layer.shape[1], self.device)
            factors = self.factors(names)
            shared_calib, shared_holdout = SharedInputs(), SharedInputs()

            def on_calib(name: str, x: torch.Tensor, _shared: SharedInputs = shared_calib) -> None:
                layer = self._by_name[name]
                layer.calib = _shared.add(layer.calib, x)

            def on_holdout(name: str, x: torch.Tensor, _shared: SharedInputs = shared_holdout) -> None:
                layer = self._by_name[name]
                layer.holdout = _shared.add(layer.holdout, x)
                add_holdout_tokens(layer, x)

            feed.forward("calib", on_calib, factors)
            if self.stream is not None and not all(layer.target.factored for layer in layers):
                self._layer_by_layer(feed, layers, factors, rows, advance)
                continue
            for i, layer in enumerate(layers):
                fit_layer(layer, self.schemes, self.ranks, self.device)
                measure_calibration(layer, self.device, keep_span=self.end_to_end)
                advance(1)
                release_after_last_reader(layers, i)
            feed.forward("holdout", on_holdout, factors)
            for layer in layers:
                rows[layer.name] = finalize_layer(layer, self.device)
            for layer in layers:  # after every layer sharing a C_holdout was finalized
                layer.release()
            release_free_memory()
        report = build_report(self, [rows[layer.name] for layer in self.layers])
        if self.end_to_end:
            from lora_tools.compare.whole_model import run_end_to_end

            report["end_to_end"] = run_end_to_end(self, advance)
        else:
            report["end_to_end"] = None
            report["end_to_end_skipped"] = self.end_to_end_skipped
        if self.offload_plan is not None:
            report["offload"] = dict(self.offload_plan)
            if self.stream is not None:  # the floor of a streamed run: reading every block's weights
                report["offload"].update(bytes_read=self.stream.bytes_read,
                                         seconds_reading=round(self.stream.seconds_reading, 3))
        return report

    def _layer_by_layer(self, feed: Any, layers: list[Layer], factors: dict[str, Any],
                        rows: dict[str, dict[str, Any]], advance: Callable[[int], None]) -> None:
        """A streamed block of dense targets (``--target base|merged``), one layer at a time: the held-out split
        is forwarded once and each layer's inputs kept (an input shared by q/k/v or gate/up is one tensor),
        then every layer is fitted, measured and finalized in turn and its inputs dropped. A block's dense
        approximations (the quantized W, rank-k factors at the equal-budget ranks: ~0.2 GB per 2048 x 5632
        layer) are then never held together, only one layer's."""
        from lora_tools.compare.evaluate import add_holdout_tokens, finalize_layer, measure_calibration
        from lora_tools.compare.fit import fit_layer

        held: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
        feed.forward("holdout", lambda name, x: held[name].append(x), factors)
        # Narrowest inputs first: every C_calib is alive when the first layer is fitted, and each is freed with
        # the last layer reading it, so the widest (the down projection's: 254 MB for 5632 inputs) is then
        # fitted alone. A stable sort keeps layers sharing one input (q/k/v, gate/up) next to each other.
        layers = sorted(layers, key=lambda layer: layer.shape[1])
        for i, layer in enumerate(layers):
            fit_layer(layer, self.schemes, self.ranks, self.device)
            measure_calibration(layer, self.device, keep_span=False)
            advance(1)
            release_after_last_reader(layers, i)
            for x in held.pop(layer.name):  # a C_holdout of its own: one layer's at a time
                layer.holdout.update(x)
                add_holdout_tokens(layer, x)
            rows[layer.name] = finalize_layer(layer, self.device)
            layer.release()
            release_free_memory()


def release_after_last_reader(layers: list[Layer], i: int) -> None:
    """Free layer i's C_calib unless a later layer of the stage shares it (q/k/v, gate/up): a covariance read
    once in full (``CovarianceAccumulator.gram``) is not kept beside the next layer's."""
    if not any(later.calib is layers[i].calib for later in layers[i + 1:]):
        layers[i].calib.release()


def dense_target(kind: str, layer: Layer, adapter: Adapter | None, device: torch.device) -> Target:
    """W0 (``base``) or W0 + s·B·A (``merged``) of a layer whose module holds its weights now."""
    from lora_tools.basemodel import base_weight

    W0 = base_weight(layer.module, layer.lora).to(device)
    if kind == "base":
        return Target(layer.shape, weight=W0)
    B, A = adapter.factors(layer.name, torch.float32)
    return Target(layer.shape, weight=W0 + layer.lora.scale * (B.to(device) @ A.to(device)))
