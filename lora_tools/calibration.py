"""Input covariances C = Σ x xᵀ of an adapter's layers, from running its real base model on calibration text.

Shared by activation-aware truncation (`truncate --base --calib`); compare-quant drives the same pieces
(``capture``, ``basemodel``) with a held-out split of its own. The adapter is applied through hooks while the
model runs, so each layer sees the inputs it has in the adapted model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_tools.adapter import Adapter
from lora_tools.capture import (
    CovarianceAccumulator,
    SharedInputs,
    read_documents,
    tokenize_documents,
)
from lora_tools.errors import InvalidOptionError, ModuleMismatchError

CAPTURE_KINDS = ("linear", "conv1d")  # layers whose input a forward hook sees as (..., in)


@dataclass
class Calibration:
    covariances: dict[str, torch.Tensor]  # module name -> C (in, in), float64
    tokens: int
    base_path: Path
    source: str
    skipped: list[str] = field(default_factory=list)  # modules without a covariance, with the reason


@torch.no_grad()
def collect_covariances(adapter: Adapter, base: Path | None, calib: Path | None, *, max_tokens: int = 8192,
                        max_length: int = 128, batch_size: int = 32, device: str = "cpu", offload: str = "auto",
                        max_memory: int | None = None, plan_sink: Callable[[str], None] | None = None,
                        progress: Callable[[int], None] | None = None) -> Calibration:
    """Run the base model (adapter applied) on ``calib`` (default: the bundled corpus) and accumulate C per layer;
    the base runs whole or block by block (``--offload``, see ``lora_tools.model.offload``)."""
    from lora_tools.basemodel import check_module_map, match_modules, resolve_base
    from lora_tools.data import calib_corpus_path
    from lora_tools.model.feed import model_feed
    from lora_tools.model.offload import load_planned

    calib_path = calib if calib is not None else calib_corpus_path()
    documents = read_documents(calib_path)  # validate the text before loading a model
    base_path = resolve_base(adapter, base)
    torch_device = torch.device(device)
    model, tokenizer, stream, _ = load_planned(base_path, offload, max_memory, torch_device, torch.float32,
                                               tokens=max_tokens + max_length * batch_size, plan_sink=plan_sink)
    mapping = match_modules(model, list(adapter.modules))
    check_module_map(adapter, model, mapping, base_path)  # another architecture or missing modules: refused
    skipped = []
    modules = {}
    for name, module in mapping.modules.items():
        if adapter.modules[name].kind in CAPTURE_KINDS:
            modules[name] = module
        else:
            skipped.append(f"{name} ({adapter.modules[name].kind} layer: plain SVD truncation)")
    if not modules:
        raise ModuleMismatchError(f"{base_path}: none of the adapter's linear modules exist in the base model; "
                                  "is --base the model this adapter was trained on?")
    accumulators = {name: CovarianceAccumulator(adapter.modules[name].in_features, device) for name in modules}
    factors = {}
    for name in modules:
        B, A = adapter.factors(name)  # float32, B: (out, r), A: (r, in)
        factors[name] = (B.to(device), A.to(device), adapter.modules[name].scale)
    corpus = tokenize_documents(tokenizer, documents, max_tokens, max_length)
    widest = max(modules, key=lambda name: adapter.modules[name].in_features)
    width = adapter.modules[widest].in_features
    if corpus.tokens < width:
        # From fewer tokens than inputs, C is rank-deficient: the fit would ignore the input directions never seen.
        raise InvalidOptionError(
            f"{calib_path}: {corpus.tokens} calibration tokens (--max-tokens {max_tokens}), but activation-aware "
            f"truncation needs at least {width}: layer {widest} takes {width} inputs, and from fewer tokens its "
            f"input covariance is rank-deficient; give a longer calibration text or raise --max-tokens")
    sequences = {"calib": corpus.sequences}
    common = {"pad_id": int(tokenizer.pad_token_id), "batch_size": batch_size, "device": torch_device,
              "progress": progress or (lambda n: None)}
    feed = model_feed(model, stream, modules, mapping.model_names, sequences, **common)

    shared = SharedInputs()  # q/k/v (and gate/up) get one C: same tensor, same numbers

    def on_input(name: str, x: torch.Tensor) -> None:
        accumulators[name] = shared.add(accumulators[name], x)

    for names in feed.stages():
        feed.forward("calib", on_input, {name: factors[name] for name in names})
    return Calibration({name: acc.gram.cpu() for name, acc in accumulators.items()},
                       tokens=next(iter(accumulators.values())).tokens, base_path=base_path,
                       source=str(calib_path), skipped=skipped)


@torch.no_grad()
def activation_aware_factors(B: torch.Tensor, A: torch.Tensor, scale: float,
                             C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ΔW = s·B·A and input covariance C: (U, λ, T) with ΔW C ΔWᵀ = U diag(λ) Uᵀ (λ descending).

    The rank-k update minimising ‖(ΔW − ΔŴ) X‖_F is ΔŴ = U_k U_kᵀ ΔW (no inverse of C, so a singular C is fine);
    its squared output error is Σ_{i>k} λ_i. With B = Q R, ΔW C ΔWᵀ = Q (s² R G Rᵀ) Qᵀ, G = A C Aᵀ: an r x r
    eigenproblem, and U_kᵀ ΔW = V_kᵀ (s R A) =: T_k, so ΔŴ = (Q V_k) T_k is built from (r x in) work only.
    Returns U = Q V (out, m), λ (m,), T = Vᵀ s R A (m, in), m = min(out, r); λ may hold rounding-level
    negatives (the core is PSD only up to rounding).
    """
    B = B.to(torch.float64)
    A = A.to(torch.float64)
    Q, R = torch.linalg.qr(B)  # Q: (out, m), R: (m, r)
    RA = scale * (R @ A)  # (m, in): ΔW = Q · RA
    # C may be a compare.span.SpanCovariance (RA's rows lie in A's row space, where it is exact).
    core = C.sandwich(RA) if hasattr(C, "sandwich") else RA @ C.to(torch.float64) @ RA.T  # (m, m)
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    return Q @ vectors, values, vectors.T @ RA
