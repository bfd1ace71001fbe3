"""compare-quant's plan: validate the options, pick the layers, decide whether the base runs whole or streamed
(``--offload``), load it (or its weightless skeleton), tokenize and split the calibration text, and check that both
sides of the split hold enough tokens — everything before the computation (``CompareJob.run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.calibration import CAPTURE_KINDS
from lora_tools.capture import holdout_split, read_documents, split_tokens, tokenize_documents
from lora_tools.compare.holdout import TokenCounts, check_token_counts
from lora_tools.compare.methods import Target
from lora_tools.compare.options import (
    DEFAULT_RANKS,
    DTYPES,
    TARGETS,
    CompareOptions,
    display_path,
    resolve_device,
)
from lora_tools.compare.run import CompareJob, Layer
from lora_tools.compare.whole_model import planned
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.quant import get_scheme


def prepare_compare(adapter: Adapter | None, base: Path | None, options: CompareOptions) -> CompareJob:
    """Validate options, pick layers, load what is needed and tokenize: everything but the computation."""
    if options.target not in TARGETS:
        raise InvalidOptionError(f"unknown target {options.target!r}; choose one of {', '.join(TARGETS)}")
    if options.dtype not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    if options.max_tokens <= 0:
        raise InvalidOptionError(f"--max-tokens must be positive, got {options.max_tokens}")
    if not 0.0 <= options.holdout < 1.0:
        raise InvalidOptionError(f"--holdout must be in [0, 1), got {options.holdout}")
    ranks = options.ranks if options.ranks is not None else DEFAULT_RANKS[options.target]
    if any(r <= 0 for r in ranks):
        raise InvalidOptionError(f"--ranks: rank must be positive, got {min(ranks)}")
    schemes = [get_scheme(name) for name in options.schemes]
    device = resolve_device(options.device)
    if adapter is None:
        raise InvalidOptionError("compare-quant needs an adapter (its modules choose the layers compared)")
    is_random = isinstance(options.calib, str) and options.calib == "random"
    documents = None
    if not is_random:
        from lora_tools.data import calib_corpus_path

        calib_path = Path(options.calib) if options.calib is not None else calib_corpus_path()
        documents = read_documents(calib_path)  # validate the text before loading a model
    job = CompareJob(options, device, [], schemes, tuple(ranks), adapter, None)
    needs_model = not is_random or options.target != "delta"
    if needs_model:
        from lora_tools.basemodel import check_module_map, match_modules, resolve_base

        job.base_path = resolve_base(adapter, base)
        job.base_note = base_note(job.base_path)
        model, tokenizer = _load(job, is_random)
        mapping = match_modules(model, list(adapter.modules))
        job.unmatched = mapping.unmatched
        # Another architecture, modules the base lacks (the first few named), or shapes of another model size.
        check_module_map(adapter, model, mapping, display_path(job.base_path))
    job.layers = _build_layers(job, adapter, mapping if needs_model else None, is_random)
    if not job.layers:
        raise ModuleMismatchError(f"{adapter.path}: no module of a supported kind to compare "
                                  f"(supported: {', '.join(CAPTURE_KINDS)})")
    if is_random:
        job.calib_description = "random: isotropic Gaussian inputs N(0, I) (no base model run)"
        calib_tokens, holdout_tokens = split_tokens(options.max_tokens, options.holdout)
        job.counts = TokenCounts(calib_tokens, holdout_tokens, options.holdout, "--calib random",
                                 available=options.max_tokens, max_tokens=options.max_tokens)
        _check_counts(job)
        job.end_to_end, job.end_to_end_skipped = planned(job)
        return job
    job.model = model
    job.pad_id = int(tokenizer.pad_token_id)
    corpus = tokenize_documents(tokenizer, documents, options.max_tokens, options.max_length)
    calib_idx, holdout_idx = holdout_split(len(corpus.sequences), options.holdout, options.seed)
    job.calib_sequences = [corpus.sequences[i] for i in calib_idx]
    job.holdout_sequences = [corpus.sequences[i] for i in holdout_idx]
    # Sequences carry no padding, so these are exactly the tokens the layers will see.
    job.counts = TokenCounts(sum(map(len, job.calib_sequences)), sum(map(len, job.holdout_sequences)),
                             options.holdout, display_path(calib_path), available=corpus.tokens,
                             max_tokens=options.max_tokens, sequences=len(corpus.sequences))
    _check_counts(job)
    job.calib_description = ("bundled: Python standard-library docstrings (lora_tools/data/calib_corpus.txt)"
                             if options.calib is None else f"file: {options.calib}")
    job.modules = {layer.name: mapping.modules[layer.name] for layer in job.layers}
    job.end_to_end, job.end_to_end_skipped = planned(job)
    return job


def _load(job: CompareJob, is_random: bool) -> tuple[Any, Any]:
    """(model, tokenizer): the whole model, or the skeleton of a streamed one (``job.stream`` set)."""
    from lora_tools.basemodel import load_base
    from lora_tools.model.offload import load_planned

    options = job.options
    dtype = DTYPES[options.dtype]
    if is_random:
        return load_base(job.base_path, job.device, dtype, need_tokenizer=False)
    # Hidden states carried per token: the sequences are at most max_length long, padded per batch.
    model, tokenizer, job.stream, plan = load_planned(
        job.base_path, options.offload, options.max_memory, job.device, dtype,
        tokens=options.max_tokens + options.max_length * options.batch_size, plan_sink=options.plan_sink)
    job.offload_plan = plan.as_dict()
    return model, tokenizer


def base_note(path: Path) -> str | None:
    """What every report on this base must say: a GGUF base's weights were quantized and are dequantized here."""
    if path.suffix.lower() != ".gguf":
        return None
    from lora_tools.model.smollm2 import NOTE, is_bundled

    if is_bundled(path):
        return NOTE
    return (f"base: {path.name} is a GGUF file; its weights are dequantized from their stored quantization, so "
            "--target base compares against an already-quantized W0")


def _check_counts(job: CompareJob) -> None:
    widest = max(job.layers, key=lambda layer: layer.shape[1])
    check_token_counts(job.counts, widest.shape[1], widest.name)


def _build_layers(job: CompareJob, adapter: Adapter, mapping: Any, is_random: bool) -> list[Layer]:
    from lora_tools.basemodel import base_weight

    layers = []
    target_kind = job.options.target
    for name, lora in adapter.modules.items():
        if not is_random and lora.kind not in CAPTURE_KINDS:
            job.skipped.append(f"{name} ({lora.kind}: input capture handles {', '.join(CAPTURE_KINDS)} layers)")
            continue
        if mapping is not None and name not in mapping.modules:
            continue
        shape = (lora.out_features, lora.in_features)
        if mapping is not None and lora.kind not in CAPTURE_KINDS:
            job.skipped.append(f"{name} ({lora.kind})")
            continue
        module = mapping.modules[name] if mapping is not None else None
        if job.stream is not None and target_kind != "delta":
            # W0 is read when the block holding this layer is loaded (run.dense_target).
            layers.append(Layer(name, lora, None, model_name=mapping.model_names[name], module=module))
            continue
        W0 = base_weight(module, lora).to(job.device) if module is not None and target_kind != "delta" else None
        if target_kind == "base":
            target = Target(shape, weight=W0)
        else:
            B, A = adapter.factors(name, torch.float32)  # B: (out, r), A: (r, in)
            B, A = B.to(job.device), A.to(job.device)
            if target_kind == "delta":
                target = Target(shape, B=B, A=A, scale=lora.scale)
            else:
                target = Target(shape, weight=W0 + lora.scale * (B @ A))
        layer = Layer(name, lora, target, model_name=mapping.model_names[name] if mapping is not None else None,
                      module=module)
        layers.append(layer)
    return layers
