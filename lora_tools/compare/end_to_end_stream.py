"""End-to-end evaluation on a streamed base (``--offload``): every variant carries its own hidden states.

The same measures as ``compare.end_to_end`` (same comparator, tallies and section), fed block-major: the
held-out batches are embedded once; then, one decoder block loaded at a time, the reference adapter, the base and
every variant each move their own hidden states through it with their factors switched in by the same hooks; the
final norm and LM head then give each one's logits, batch by batch, compared with the reference's.

The variants' factors exist one block at a time too: ``VariantPlan.build`` makes every variant's factors for the
block's modules just before the block runs (their SVD bases and activation-aware eigenfactors with them), and they
are dropped when it is done; what outlives the block is each variant's summary (bytes, predicted errors, ranks).
Memory beyond one block's weights and factors: (variants + 2) x held-out tokens x hidden size in the forward dtype
(SmolLM2, 25 variants, 512 tokens: 32 MB in float32; a 70B base with hidden 8192 in bf16: 230 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lora_tools.capture import iter_batches
from lora_tools.compare.end_to_end import (
    DEFAULT_CHUNK_ELEMENTS,
    _kl_batch,
    _LogitComparator,
    _section,
    _Tally,
    prepare_module_factors,
    variant_hooks,
)
from lora_tools.compare.variants_plan import VariantPlan
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.memory import release_free_memory
from lora_tools.model.feed import group_by_block
from lora_tools.model.stream import run_block

BASE = 1  # slot of the base model's hidden states; 0 is the reference adapter's, 2.. the variants'


@torch.no_grad()
def evaluate_variants_streamed(stream: Any, modules: Mapping[str, torch.nn.Module], model_names: Mapping[str, str],
                               sequences: Sequence[Sequence[int]], plan: VariantPlan, *, pad_id: int,
                               batch_size: int, device: torch.device,
                               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``compare.end_to_end.evaluate_variants`` for a ``StreamedModel`` (causal LMs: next-token KL), the variants
    of ``plan`` (its first one the identity: the reference) built block by block."""
    sequences = [list(s) for s in sequences if len(s) > 0]
    if sum(len(s) - 1 for s in sequences) <= 0:
        raise InvalidOptionError("end-to-end evaluation: the held-out split has no sequence with two tokens "
                                 "(no next-token position)")
    if not plan.variants or plan.variants[0].method != "identity":
        raise ValueError("the plan's first variant must be the identity (the reference adapter)")
    if set(plan.names) != set(modules):
        raise ModuleMismatchError("the variant plan and the hooked modules differ (every variant must cover "
                                  "exactly the modules being hooked)")
    by_block, head_names = group_by_block(modules, model_names, stream.model.get_output_embeddings())
    batches = list(iter_batches(sequences, batch_size, pad_id, device))
    kwargs, states = [], [[] for _ in range(len(plan.variants) + 1)]
    for ids, mask in batches:
        hidden, block_kwargs = stream.embed(ids, mask)
        kwargs.append(block_kwargs)
        for carried in states:
            carried.append(hidden)
    stream.release_embeddings()  # reloaded for a tied head only
    for index in range(stream.checkpoint.blocks):
        _through_block(stream, index, {n: modules[n] for n in by_block.get(index, [])}, plan, states, kwargs,
                       device)
        release_free_memory()
    # An adapted LM head: its factors (built last, small: (vocab + hidden) x r each) are switched in with the
    # hidden states of the same slot while the logits are computed.
    head_modules = {n: modules[n] for n in head_names}
    head_factors = [prepare_module_factors(v.label, factors, head_modules, device)
                    for v, factors in zip(plan.variants, plan.build(head_names), strict=True)]
    head_slots = [head_factors[0], None, *head_factors[1:]]
    if not plan.complete:
        raise RuntimeError("streamed end-to-end: some variant modules were never built")
    variants = plan.variants[1:]
    base_tally, adapter_tally = _Tally(), _Tally()
    tallies = [_Tally() for _ in variants]
    comparator = _LogitComparator(DEFAULT_CHUNK_ELEMENTS)
    try:
        with variant_hooks(head_modules) as switch:
            for b, (ids, mask) in enumerate(batches):
                def forward(slot: int | None, _b: int = b) -> torch.Tensor:
                    index = BASE if slot is None else slot
                    switch.active = head_slots[index]
                    return stream.logits(states[index][_b])

                _kl_batch(forward, ids, mask, comparator, 0, list(range(2, len(states))), base_tally,
                          adapter_tally, tallies)
                release_free_memory()
                if progress is not None:
                    progress(int(ids.shape[0]))
    finally:
        stream.release_head()
    return _section("kl", base_tally, adapter_tally, variants, tallies, len(sequences), device, stream.dtype)


def _through_block(stream: Any, index: int, modules: Mapping[str, torch.nn.Module], plan: VariantPlan,
                   states: list[list[torch.Tensor]], kwargs: list[dict[str, Any]], device: torch.device) -> None:
    """Block ``index`` (its adapter ``modules``) for every slot's hidden states, with the block's factors of
    every variant built here: they are gone when this returns, before the next block builds its own."""
    prepared = [prepare_module_factors(v.label, factors, modules, device)
                for v, factors in zip(plan.variants, plan.build(modules), strict=True)]
    slots = [prepared[0], None, *prepared[1:]]  # same order as ``states``
    with stream.block(index) as block, variant_hooks(modules) as switch:
        for factors, carried in zip(slots, states, strict=True):
            switch.active = factors
            for b, hidden in enumerate(carried):
                carried[b] = run_block(block, hidden, kwargs[b])
