"""End-to-end evaluation on a streamed base (``--offload``): every variant carries its own hidden states.

The same measures as ``compare.end_to_end`` (same comparator, tallies and section), fed block-major: the
held-out batches are embedded once; then, one decoder block loaded at a time, the reference adapter, the base and
every variant each move their own hidden states through it with their factors switched in by the same hooks; the
final norm and LM head then give each one's logits, batch by batch, compared with the reference's. Memory beyond
one block: (variants + 2) x held-out tokens x hidden size in the forward dtype (SmolLM2, 25 variants, 512 tokens:
32 MB in float32; a 70B base with hidden 8192 in bf16: 230 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lora_tools.capture import iter_batches
from lora_tools.compare.end_to_end import (
    DEFAULT_CHUNK_ELEMENTS,
    FactorSet,
    _kl_batch,
    _LogitComparator,
    _section,
    _Tally,
    prepare_factors,
    variant_hooks,
)
from lora_tools.compare.variants import Variant
from lora_tools.errors import InvalidOptionError
from lora_tools.memory import release_free_memory
from lora_tools.model.feed import block_index
from lora_tools.model.stream import run_block


@torch.no_grad()
def evaluate_variants_streamed(stream: Any, modules: Mapping[str, torch.nn.Module], model_names: Mapping[str, str],
                               sequences: Sequence[Sequence[int]], reference: Variant, variants: Sequence[Variant],
                               *, pad_id: int, batch_size: int, device: torch.device,
                               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``compare.end_to_end.evaluate_variants`` for a ``StreamedModel`` (causal LMs: next-token KL)."""
    sequences = [list(s) for s in sequences if len(s) > 0]
    if sum(len(s) - 1 for s in sequences) <= 0:
        raise InvalidOptionError("end-to-end evaluation: the held-out split has no sequence with two tokens "
                                 "(no next-token position)")
    reference_factors = prepare_factors(reference, modules, device)
    prepared = [prepare_factors(v, modules, device) for v in variants]
    factor_sets: list[FactorSet | None] = [reference_factors, None, *prepared]
    batches = list(iter_batches(sequences, batch_size, pad_id, device))
    kwargs, states = [], [[] for _ in factor_sets]
    for ids, mask in batches:
        hidden, block_kwargs = stream.embed(ids, mask)
        kwargs.append(block_kwargs)
        for carried in states:
            carried.append(hidden)
    stream.release_embeddings()  # reloaded for a tied head only
    by_block: dict[int, list[str]] = {}
    for name in modules:
        by_block.setdefault(block_index(model_names[name]), []).append(name)
    for index in range(stream.checkpoint.blocks):
        names = by_block.get(index, [])
        with stream.block(index) as block, variant_hooks({n: modules[n] for n in names}) as switch:
            for factors, carried in zip(factor_sets, states, strict=True):
                switch.active = None if factors is None else {n: factors[n] for n in names}
                for b, hidden in enumerate(carried):
                    carried[b] = run_block(block, hidden, kwargs[b])
        release_free_memory()
    slot = {id(factors): i for i, factors in enumerate(factor_sets) if factors is not None}
    base_tally, adapter_tally = _Tally(), _Tally()
    tallies = [_Tally() for _ in variants]
    comparator = _LogitComparator(DEFAULT_CHUNK_ELEMENTS)
    try:
        for b, (ids, mask) in enumerate(batches):
            def forward(factors: FactorSet | None, _b: int = b) -> torch.Tensor:
                return stream.logits(states[1 if factors is None else slot[id(factors)]][_b])

            _kl_batch(forward, ids, mask, comparator, reference_factors, prepared, base_tally, adapter_tally,
                      tallies)
            release_free_memory()
            if progress is not None:
                progress(int(ids.shape[0]))
    finally:
        stream.release_head()
    return _section("kl", base_tally, adapter_tally, variants, tallies, len(sequences), device, stream.dtype)
