"""End-to-end evaluation: each whole-adapter variant judged by the model's own outputs against the unmodified adapter.

Nothing is loaded here: the caller passes the base model (already on its device, in its forward dtype), the
adapter's modules in it (name -> nn.Module, e.g. ``basemodel.match_modules``), held-out token sequences and the
variants (``compare.variants``). One set of forward hooks is installed for the whole run and *switched* between
no update (the base), the reference adapter and each variant, so the model is never reloaded or modified; the
hooks come off in a ``finally``.

Causal LMs (``metric="kl"``), per next-token position t (both t and t+1 real tokens, so padding never counts and
KL, top-1 and perplexity share one set of positions):

* KL(P_adapter ‖ P_variant) = Σ_v p_a(v)·(log p_a(v) − log p_variant(v)), mean and p99 over positions
  (p99: linear interpolation between order statistics, numpy's default);
* top-1 agreement: argmax P_variant == argmax P_adapter; perplexity exp(mean −log P(next token));
* effect kept = 1 − mean KL(P_adapter‖P_variant) / mean KL(P_adapter‖P_base): 1 for the adapter itself, 0 for a
  variant whose outputs are the base model's (a zeroed adapter). When the adapter itself does not change the
  model (KL(P_adapter‖P_base) = 0), there is no effect to keep: effect_kept is None (null), not a fraction.

Encoders (``metric="cosine"``), per sequence: embeddings mean-pooled over the attention mask; cosine between the
adapter's and the variant's pooled embedding (mean and worst), and 1 − cos in place of KL (mean, p99, effect kept).

Memory (the vocabulary is the problem: SmolLM2 has 49,152 tokens): nothing of size positions x vocab outlives a
batch, and no reference is stored across batches. The loop is batch-outer, variant-inner: per batch the reference
and the base run once, the reference's logits are kept (as the model returned them) while each variant runs, and
every comparison is float64 over row chunks of ``chunk_elements`` entries in reused buffers. Per position only
scalars are kept (KL, NLL, top-1 hit; CPU, float64), so the p99 is exact. Extra memory ≈ 2 x batch x seq x vocab
x (model dtype bytes) + 3 x 8 + 1 x (dtype bytes) x chunk_elements (4M: 112 MB in float32).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tools.capture import iter_batches
from lora_tools.compare.variants import ModuleFactors, Variant
from lora_tools.errors import BaseModelError, InvalidOptionError, ModuleMismatchError
from lora_tools.memory import release_free_memory

log = logging.getLogger(__name__)

METRICS = ("kl", "cosine")
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M float64 entries (32 MB) per temporary in the KL arithmetic
P99 = 0.99

FactorSet = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class EndToEndModelError(BaseModelError):
    """A model whose outputs end-to-end evaluation cannot compare (no LM head and no pooled hidden states)."""


def detect_metric(model: torch.nn.Module) -> str:
    """``"kl"`` for a causal LM (an output head and ``can_generate``), ``"cosine"`` for a bare encoder/decoder
    (no head: its last hidden states are pooled). A model with another head raises ``EndToEndModelError``."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise EndToEndModelError(f"{name}: encoder-decoder models are not supported by end-to-end evaluation "
                                 "(it needs a causal LM head or an encoder's hidden states)")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        can_generate = getattr(model, "can_generate", None)
        if callable(can_generate) and can_generate():
            return "kl"
        raise EndToEndModelError(f"{name}: has an output head but is not a causal LM, so it gives no next-token "
                                 "distribution; load the bare encoder (AutoModel) to compare pooled embeddings")
    return "cosine"  # confirmed on the first forward: the output must carry last_hidden_state


class VariantSwitch:
    """Which factors the hooks add right now: None (the base model) or {module: (B, A, scale)}."""

    def __init__(self) -> None:
        self.active: FactorSet | None = None


@contextlib.contextmanager
def variant_hooks(modules: Mapping[str, torch.nn.Module]) -> Iterator[VariantSwitch]:
    """Hooks adding ``scale · (x Aᵀ) Bᵀ`` of ``switch.active`` to each module's output; removed on exit whatever
    happens. The update is computed in the factors' dtype (float32) and added to the output upcast to it, then
    cast back — what PEFT does for float32 LoRA weights on a bf16/fp16 base (its ``torch_result_dtype`` cast)."""
    switch = VariantSwitch()
    handles = []
    try:
        for name, module in modules.items():
            def hook(mod: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor,
                     _name: str = name) -> torch.Tensor | None:
                factors = switch.active
                if factors is None:
                    return None  # keep the module's own output
                B, A, scale = factors[_name]
                update = (args[0].to(A.dtype) @ A.T) @ B.T  # (..., out)
                return (output.to(update.dtype) + update * scale).to(output.dtype)

            handles.append(module.register_forward_hook(hook))
        yield switch
    finally:
        switch.active = None
        for handle in handles:
            handle.remove()


def module_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a layer the hooks can adapt: ``nn.Linear`` or transformers' ``Conv1D`` (weight (in, out))."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "nf") and getattr(module, "weight", None) is not None and module.weight.ndim == 2:
        return int(module.nf), int(module.weight.shape[0])
    raise ModuleMismatchError(f"{type(module).__name__} layer: end-to-end hooks adapt Linear and Conv1D layers "
                              "only")


def prepare_factors(variant: Variant, modules: Mapping[str, torch.nn.Module], device: Any) -> FactorSet:
    """The variant's factors on ``device`` (float32), checked against the model's modules."""
    return prepare_module_factors(variant.label, variant.factors, modules, device)


def prepare_module_factors(label: str, factors: Mapping[str, ModuleFactors], modules: Mapping[str, torch.nn.Module],
                           device: Any) -> FactorSet:
    """Factors of variant ``label`` for exactly ``modules`` (all of them, or one block's) on ``device``, checked
    against the model's layers."""
    if set(factors) != set(modules):
        missing = sorted(set(modules) - set(factors))
        extra = sorted(set(factors) - set(modules))
        detail = f"lacks {', '.join(missing[:3])}" if missing else f"has modules not in the model: " \
                                                                  f"{', '.join(extra[:3])}"
        raise ModuleMismatchError(f"variant {label}: {detail} (every variant must cover exactly the "
                                  "modules being hooked)")
    prepared = {}
    for name, module in modules.items():
        out, inp = module_dims(module)
        f = factors[name]
        if f.B.ndim != 2 or f.A.ndim != 2 or f.B.shape[0] != out or f.A.shape[1] != inp \
                or f.B.shape[1] != f.A.shape[0]:
            raise ModuleMismatchError(f"variant {label}: module {name}: factors B {tuple(f.B.shape)} @ "
                                      f"A {tuple(f.A.shape)} do not fit the layer ({out} x {inp})")
        prepared[name] = (f.B.to(device, torch.float32), f.A.to(device, torch.float32), float(f.scale))
    return prepared


@contextlib.contextmanager
def apply_variant(modules: Mapping[str, torch.nn.Module], variant: Variant | None,
                  device: Any = "cpu") -> Iterator[None]:
    """The model with ``variant`` applied (None: the base) for the duration of the block; hooks always come off."""
    factors = prepare_factors(variant, modules, device) if variant is not None else None
    with variant_hooks(modules) as switch:
        switch.active = factors
        yield


@dataclass
class _Tally:
    """Per-position (or per-sequence) scalars of one compared model, on the CPU in float64."""

    divergence: list[torch.Tensor] = field(default_factory=list)  # KL or 1 − cos
    nll: list[torch.Tensor] = field(default_factory=list)
    top1: int = 0
    count: int = 0
    cosine_min: float = math.inf

    def values(self) -> torch.Tensor:
        return torch.cat(self.divergence) if self.divergence else torch.zeros(0, dtype=torch.float64)

    def mean(self) -> float:
        values = self.values()
        return float(values.mean()) if values.numel() else math.nan

    def p99(self) -> float:
        values = self.values()
        return float(torch.quantile(values, P99)) if values.numel() else math.nan

    def ppl(self) -> float | None:
        if not self.nll:
            return None
        return math.exp(float(torch.cat(self.nll).mean()))


class _LogitComparator:
    """Float64 KL / NLL / top-1 of one batch's logits against the reference's, chunk by chunk.

    The logits stay as the model returned them, (batch, seq, V) in its dtype; the real positions are picked per
    chunk with ``index_select`` into reused buffers: three (rows, V) float64 and one (rows, V) in the model's
    dtype, allocated once per run. Reusing them matters beyond speed: freshly allocated temporaries of varying
    sizes just under glibc's 32 MB mmap threshold fragmented the heap (RSS grew by ~100 MB per batch at a 49k
    vocabulary, 7.7 GB over one run); with fixed buffers it stays flat.
    """

    def __init__(self, chunk_elements: int) -> None:
        self.chunk_elements = chunk_elements
        self.buffers: tuple[torch.Tensor, ...] | None = None

    def _workspace(self, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        rows = max(1, self.chunk_elements // vocab)
        b = self.buffers
        if b is None or b[0].shape[1] != vocab or b[3].dtype != dtype or b[0].device != device:
            f64 = {"dtype": torch.float64, "device": device}
            self.buffers = (torch.empty(rows, vocab, **f64), torch.empty(rows, vocab, **f64),
                            torch.empty(rows, vocab, **f64), torch.empty(rows, vocab, dtype=dtype, device=device))
        return self.buffers

    def _rows(self, logits: torch.Tensor, index: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the flattened logits, copied into the float64 buffer ``into`` (n, V)."""
        staging = self.buffers[3][:index.numel()]
        torch.index_select(logits.reshape(-1, logits.shape[-1]), 0, index, out=staging)
        return into.copy_(staging)

    @staticmethod
    def _logsumexp(raw: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        top = raw.amax(dim=1, keepdim=True)  # (n, 1)
        torch.sub(raw, top, out=scratch).exp_()
        return scratch.sum(dim=1, keepdim=True).log_().add_(top)  # (n, 1)

    def set_reference(self, logits: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                      tally: _Tally) -> None:
        """Keep the reference logits (batch, seq, V) and, per real position, its log-normaliser and argmax;
        its own NLL goes to ``tally`` (its KL to itself is 0 by definition)."""
        self.logits, self.positions, self.targets = logits, positions, targets
        raw, _, scratch, _ = self._workspace(logits.shape[-1], logits.dtype, logits.device)
        self.chunk = raw.shape[0]
        lse, top1, nll = [], [], []
        for start in range(0, positions.numel(), self.chunk):
            index = positions[start:start + self.chunk]
            n = index.numel()
            rows = self._rows(logits, index, raw[:n])
            top1.append(rows.argmax(dim=1))
            lse.append(self._logsumexp(rows, scratch[:n]))
            nll.append((lse[-1][:, 0] - rows.gather(1, targets[start:start + n, None])[:, 0]).cpu())
        self.lse = torch.cat(lse)  # (N, 1) float64
        self.top1 = torch.cat(top1)  # (N,)
        tally.nll.append(torch.cat(nll))
        tally.count += positions.numel()

    def compare(self, logits: torch.Tensor, tally: _Tally) -> None:
        """Add KL(P_ref ‖ P_other) = Σ p_ref (log p_ref − log p_other), NLL and top-1 hits of ``logits``."""
        log_other, log_ref, scratch, _ = self._workspace(logits.shape[-1], logits.dtype, logits.device)
        kls, nlls, hits = [], [], 0
        for start in range(0, self.positions.numel(), self.chunk):
            index = self.positions[start:start + self.chunk]
            n = index.numel()
            other = self._rows(logits, index, log_other[:n])
            hits += int((other.argmax(dim=1) == self.top1[start:start + n]).sum())
            lse = self._logsumexp(other, scratch[:n])
            nlls.append((lse[:, 0] - other.gather(1, self.targets[start:start + n, None])[:, 0]).cpu())
            other.sub_(lse)  # log p_other
            ref = self._rows(self.logits, index, log_ref[:n]).sub_(self.lse[start:start + n])  # log p_ref
            p_ref = torch.exp(ref, out=scratch[:n])
            kl = p_ref.mul_(ref.sub_(other)).sum(dim=1).clamp_min_(0.0)  # rounding can dip just below 0
            kls.append(kl.cpu())
        tally.divergence.append(torch.cat(kls))
        tally.nll.append(torch.cat(nlls))
        tally.top1 += hits
        tally.count += self.positions.numel()


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, H) -> (batch, H) float64 mean over the real tokens."""
    weights = mask.to(torch.float64)[..., None]
    return (hidden.to(torch.float64) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _compare_pooled(ref: torch.Tensor, other: torch.Tensor, tally: _Tally) -> None:
    """1 − cos between pooled embeddings, as ‖â − ô‖²/2 of the unit vectors (no cancellation near cos = 1)."""
    unit_ref = ref / ref.norm(dim=-1, keepdim=True)
    unit_other = other / other.norm(dim=-1, keepdim=True)
    one_minus_cos = ((unit_ref - unit_other).square().sum(dim=-1) / 2).clamp(0.0, 2.0)
    tally.divergence.append(one_minus_cos.cpu())
    tally.cosine_min = min(tally.cosine_min, float((1.0 - one_minus_cos).min()))
    tally.count += int(ref.shape[0])


def _effect_kept(kl_variant: float, kl_base: float) -> float | None:
    if not (kl_base > 0 and math.isfinite(kl_base)):
        return None  # the adapter does not change the model: no effect to keep (and no division by zero)
    return 1.0 - kl_variant / kl_base


@torch.no_grad()
def evaluate_variants(model: torch.nn.Module, modules: Mapping[str, torch.nn.Module],
                      sequences: Sequence[Sequence[int]], reference: Variant, variants: Sequence[Variant], *,
                      pad_id: int = 0, batch_size: int = 8, device: Any = None, metric: str | None = None,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``sequences`` through the base, the ``reference`` adapter and every variant; return the plain-data
    ``end_to_end`` section (without ``on_frontier`` and ``recommendation``: see ``compare.frontier``).

    ``device`` is where batches go (default: the model's); the forward dtype is the model's own, every comparison
    is float64. ``progress(n)`` gets the number of sequences finished after each batch.
    """
    if metric is None:
        metric = detect_metric(model)
    elif metric not in METRICS:
        raise InvalidOptionError(f"unknown end-to-end metric {metric!r}; choose one of {', '.join(METRICS)}")
    if batch_size < 1 or chunk_elements < 1:
        raise InvalidOptionError("batch_size and chunk_elements must be positive")
    if any(hasattr(m, "lora_A") for m in modules.values()):
        raise ModuleMismatchError("the model already holds LoRA layers (a PEFT model?); pass the base model, the "
                                  "adapter is applied by hooks")
    parameter = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (parameter.device if parameter is not None
                                                               else torch.device("cpu"))
    forward_dtype = parameter.dtype if parameter is not None else torch.float32
    sequences = [list(s) for s in sequences if len(s) > 0]
    positions = sum(len(s) - 1 for s in sequences) if metric == "kl" else len(sequences)
    if positions == 0:
        what = "no sequence has two tokens (no next-token position)" if metric == "kl" else "no sequence"
        raise InvalidOptionError(f"end-to-end evaluation: the held-out split has {what}")
    reference_factors = prepare_factors(reference, modules, device)
    prepared = [prepare_factors(v, modules, device) for v in variants]
    base_tally, adapter_tally = _Tally(), _Tally()
    tallies = [_Tally() for _ in variants]
    comparator = _LogitComparator(chunk_elements)
    was_training = model.training
    model.eval()
    try:
        with variant_hooks(modules) as switch:
            for ids, mask in iter_batches(sequences, batch_size, pad_id, device):
                def forward(factors: FactorSet | None, _ids: torch.Tensor = ids,
                            _mask: torch.Tensor = mask) -> torch.Tensor:
                    switch.active = factors
                    return _forward(model, _ids, _mask, metric)

                if metric == "kl":
                    _kl_batch(forward, ids, mask, comparator, reference_factors, prepared, base_tally,
                              adapter_tally, tallies)
                else:
                    ref = _pooled(forward(reference_factors), mask)
                    _compare_pooled(ref, _pooled(forward(None), mask), base_tally)
                    for factors, tally in zip(prepared, tallies, strict=True):
                        _compare_pooled(ref, _pooled(forward(factors), mask), tally)
                release_free_memory()  # logits of a large vocabulary: see lora_tools.memory
                if progress is not None:
                    progress(int(ids.shape[0]))
    finally:
        model.train(was_training)
    return _section(metric, base_tally, adapter_tally, variants, tallies, len(sequences), device, forward_dtype)


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "kl":
        output = model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = getattr(output, "logits", None)
        if logits is None:
            raise EndToEndModelError(f"{type(model).__name__}: the forward returned no logits; end-to-end KL "
                                     "needs a causal LM head")
        return logits
    output = model(input_ids=ids, attention_mask=mask)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise EndToEndModelError(f"{type(model).__name__}: the forward returned neither logits of a causal LM nor "
                                 "last_hidden_state to pool; end-to-end evaluation needs one of them")
    return hidden


def _kl_batch(forward: Callable[[Any], torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
              comparator: _LogitComparator, reference: Any, prepared: Sequence[Any], base_tally: _Tally,
              adapter_tally: _Tally, tallies: list[_Tally]) -> None:
    """One batch: the reference logits are kept while the base and every variant are compared with them.
    ``reference`` and ``prepared`` are what ``forward`` takes to select a model (factor sets, or the slots of a
    streamed run's hidden states); ``forward(None)`` is the base."""
    pairs = torch.zeros_like(mask, dtype=torch.bool)
    pairs[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()  # position t predicts the real token t+1
    positions = torch.nonzero(pairs.flatten())[:, 0]  # (N,) indices into the flattened (batch x seq)
    if positions.numel() == 0:
        return
    targets = ids[:, 1:][pairs[:, :-1]]  # (N,), in the same row-major order
    comparator.set_reference(forward(reference), positions, targets, adapter_tally)
    comparator.compare(forward(None), base_tally)
    for factors, tally in zip(prepared, tallies, strict=True):
        comparator.compare(forward(factors), tally)


def _section(metric: str, base: _Tally, adapter: _Tally, variants: Sequence[Variant], tallies: list[_Tally],
             sequences: int, device: torch.device, forward_dtype: torch.dtype) -> dict[str, Any]:
    kl_base = base.mean()
    rows = []
    for variant, tally in zip(variants, tallies, strict=True):
        kl_mean = tally.mean()
        row: dict[str, Any] = {
            "label": variant.label, "method": variant.method, "rank": variant.rank, "scheme": variant.scheme,
            "bytes": variant.bytes, "kl_mean": kl_mean, "kl_p99": tally.p99(),
            "top1": tally.top1 / tally.count if metric == "kl" and tally.count else None,
            "ppl": tally.ppl() if metric == "kl" else None,
            "effect_kept": _effect_kept(kl_mean, kl_base),
        }
        if metric == "cosine":
            row["cosine_mean"] = 1.0 - kl_mean
            row["cosine_worst"] = tally.cosine_min
        summary = variant.summary()
        row.update({k: summary[k] for k in ("mean_rank", "predicted_weight_rel_error",
                                            "predicted_output_rel_error", "notes")})
        rows.append(row)
    section: dict[str, Any] = {
        "metric": metric,
        "base_ppl": base.ppl() if metric == "kl" else None,
        "adapter_ppl": adapter.ppl() if metric == "kl" else None,
        "kl_adapter_base": kl_base,
        "kl_adapter_base_p99": base.p99(),
        "positions": base.count,
        "sequences": sequences,
        "device": str(device),
        "forward_dtype": str(forward_dtype).removeprefix("torch."),
        "variants": rows,
    }
    if metric == "cosine":
        section["cosine_adapter_base_mean"] = 1.0 - kl_base
        section["cosine_adapter_base_worst"] = base.cosine_min
    return section
