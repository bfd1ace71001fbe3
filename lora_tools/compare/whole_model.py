"""compare-quant's last stage: every whole-adapter variant judged by what the model finally outputs.

After the per-layer comparison (``CompareJob.run``) the base model is still loaded and the layers' calibration
covariances are known. This stage plans the whole-adapter variants (``compare.variants_plan`` over the families of
``compare.variants``: all modules truncated to rank k, plain and activation-aware; all quantized with each scheme;
rank k then INT8/INT4 factors; the ``avg-rank`` global budget), runs the held-out sequences through the full model
once per variant (``compare.end_to_end``: hooks switched between variants, nothing reloaded; on a streamed base
``compare.end_to_end_stream``, whose variants' factors exist one decoder block at a time), and adds the frontier
and the recommendation (``compare.frontier``). The result is report.json's ``end_to_end`` section.

The measure follows llama.cpp's ``llama-perplexity --kl-divergence``: KL divergence of the next-token distributions
against the reference model, top-1 agreement and perplexity; here the reference is the unmodified adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_tools.compare.end_to_end import EndToEndModelError, detect_metric, evaluate_variants
from lora_tools.compare.frontier import finalize
from lora_tools.compare.variants_plan import VariantPlan
from lora_tools.errors import InvalidOptionError

# Quantization schemes of the factors in the mixed variants (rank k, then quantized factors).
MIXED_SCHEMES = ("int8-channel", "int4-g128")


def planned(job: Any) -> tuple[bool, str | None]:
    """(whether end-to-end runs, why not when it does not). ``options.end_to_end`` None means auto: on for causal
    LMs; an explicit True on a model that cannot be judged end to end is an error, raised here before any work."""
    wanted = job.options.end_to_end
    if wanted is False:
        return False, "--no-end-to-end"
    reason = None
    if job.random:
        reason = "--calib random runs no model"
    elif job.options.target != "delta":
        reason = f"--target {job.options.target} compares stored weights, not adapter variants"
    if reason is not None:
        if wanted:
            raise InvalidOptionError(f"--end-to-end: {reason}; end-to-end evaluation needs the base model run on "
                                     "text with --target delta")
        return False, reason
    try:
        metric = detect_metric(job.model)
    except EndToEndModelError as exc:
        if wanted:
            raise
        return False, str(exc)
    if wanted is None and metric != "kl":
        return False, "encoder base: pass --end-to-end for pooled-embedding cosine"
    job.end_to_end_metric = metric
    if job.options.max_kl is not None and metric != "kl":
        raise InvalidOptionError("--max-kl needs a causal LM (next-token KL); this base gives pooled embeddings "
                                 "(1 − cos): use --budget, or read the cosine table")
    return True, None


def evaluation_sequences(job: Any) -> list[list[int]]:
    """The held-out sequences (the calibration ones when --holdout 0 asked for an in-sample run), cut to the
    first ``options.e2e_tokens`` tokens so that the many full-model forwards of a causal LM stay affordable on a
    CPU. An encoder gives one pooled embedding per sequence, so it gets every sequence (a p99 over a handful of
    sequences would mean nothing, and encoder forwards are cheap next to an LM head)."""
    sequences = job.holdout_sequences or job.calib_sequences
    limit = job.options.e2e_tokens if getattr(job, "end_to_end_metric", "kl") == "kl" else None
    chosen, total = [], 0
    for sequence in sequences:
        if limit is not None and total >= limit:
            break
        chosen.append(sequence)
        total += len(sequence)
    return chosen


def end_to_end_steps(job: Any) -> int:
    """Progress units of the end-to-end stage: the sequences it evaluates."""
    return len(evaluation_sequences(job))


def run_end_to_end(job: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The ``end_to_end`` section for a job whose per-layer run is done (its layers hold C_calib on the row
    space of A: ``Layer.span``)."""
    names = [layer.name for layer in job.layers if layer.lora is not None]
    covariances = {layer.name: layer.span for layer in job.layers if layer.span is not None}
    plan = VariantPlan(job.adapter, covariances, names, ranks=job.ranks, schemes=[s.name for s in job.schemes],
                       mixed_schemes=MIXED_SCHEMES, avg_rank=True, identity=True)
    sequences = evaluation_sequences(job)
    modules = {n: job.modules[n] for n in names}
    if job.stream is not None:  # the factors built, run and dropped one decoder block at a time
        from lora_tools.compare.end_to_end_stream import evaluate_variants_streamed

        model_names = {layer.name: layer.model_name for layer in job.layers}
        section = evaluate_variants_streamed(job.stream, modules, model_names, sequences, plan,
                                             pad_id=job.pad_id, batch_size=job.options.e2e_batch_size,
                                             device=job.device, progress=progress)
    else:
        reference, *others = plan.build_all()
        section = evaluate_variants(job.model, modules, sequences, reference, others, pad_id=job.pad_id,
                                    batch_size=job.options.e2e_batch_size, device=job.device, progress=progress)
    section["evaluation"] = job.evaluation
    section["sequences_evaluated"] = len(sequences)
    section["tokens_evaluated"] = sum(map(len, sequences))
    section["modules"] = len(names)
    if len(names) < len(job.adapter.modules):
        section["modules_not_varied"] = [n for n in job.adapter.modules if n not in names]
    base_note = getattr(job, "base_note", None)
    if base_note:
        section["base_note"] = base_note
    return finalize(section, max_kl=job.options.max_kl, budget=job.options.budget)
