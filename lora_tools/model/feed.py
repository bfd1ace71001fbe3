"""Feeds: how each compared layer's real input tokens reach the statistics (compare-quant, truncate --calib).

A *feed* hands the job its layers in *stages* and, within a stage, forwards one split of the token sequences
("calib", then "holdout") with a callback seeing each layer's input tokens and the adapter (or nothing) applied
by hooks. Three feeds, one pipeline (``compare.run``, ``calibration``):

* ``InMemoryFeed``: the whole model is loaded; one stage holds every layer and a split is one full forward.
* ``StreamedFeed``: the base is larger than memory (``lora_tools.model.stream``); one stage per decoder block, whose
  weights are loaded on entry and freed on exit, each split's hidden states carried from block to block.
* ``RandomFeed``: ``--calib random``, Gaussian inputs and no model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from lora_tools.capture import (
    capture_inputs,
    iter_batches,
    lora_hooks,
    random_inputs,
    run_model,
    split_tokens,
)
from lora_tools.errors import InvalidOptionError
from lora_tools.memory import release_free_memory

Callback = Callable[[str, torch.Tensor], None]
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
SPLITS = ("calib", "holdout")


class InMemoryFeed:
    """The model is loaded whole: a single stage, each split one forward of the full model."""

    def __init__(self, model: torch.nn.Module, modules: Mapping[str, torch.nn.Module],
                 sequences: Mapping[str, Sequence[list[int]]], *, pad_id: int, batch_size: int,
                 device: torch.device, progress: Callable[[int], None]) -> None:
        self.model, self.modules, self.sequences = model, dict(modules), sequences
        self.pad_id, self.batch_size, self.device, self.progress = pad_id, batch_size, device, progress

    @property
    def steps(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    def stages(self) -> Iterator[list[str]]:
        yield list(self.modules)

    def forward(self, split: str, callback: Callback, factors: Factors) -> None:
        sequences = self.sequences[split]
        if not sequences:
            return
        with lora_hooks(self.modules, factors) if factors else contextlib.nullcontext():
            run_model(self.model, self.modules, sequences, callback, pad_id=self.pad_id,
                      batch_size=self.batch_size, device=self.device, progress=self.progress)


class RandomFeed:
    """``--calib random``: isotropic Gaussian inputs of each layer's width, no model run."""

    def __init__(self, dims: Mapping[str, int], tokens: Mapping[str, int], *, seed: int, device: torch.device,
                 progress: Callable[[int], None]) -> None:
        self.dims, self.tokens, self.seed, self.device, self.progress = dict(dims), tokens, seed, device, progress

    @property
    def steps(self) -> int:
        return 2 * len(self.dims)

    def stages(self) -> Iterator[list[str]]:
        yield list(self.dims)

    def forward(self, split: str, callback: Callback, factors: Factors) -> None:
        random_inputs(self.dims, self.tokens[split], callback, seed=self.seed + SPLITS.index(split),
                      device=self.device)
        self.progress(len(self.dims))


def random_tokens(max_tokens: int, holdout: float) -> dict[str, int]:
    calib, held = split_tokens(max_tokens, holdout)
    return {"calib": calib, "holdout": held}


class StreamedFeed:
    """One stage per decoder block of a ``StreamedModel``; each split's hidden states live between stages.

    A split not forwarded by the job in a stage (a block with no compared layer) is still carried through the
    block on the stage's exit, so every block sees the hidden states of all blocks before it. Blocks after the
    last compared one are not read at all, and the embeddings are freed once every batch is embedded.

    An adapted LM head (``lm_head``, the Linear after the final norm) gets a last stage after every block: the
    final norm and the head are loaded, and the normed last hidden states are handed over as its inputs (the
    logits themselves are never computed: nothing after the head is compared, and for SmolLM2 one batch's
    logits are 0.8 GB). Other modules outside the blocks (embeddings, norms) are refused.
    """

    def __init__(self, streamed: Any, modules: Mapping[str, torch.nn.Module], model_names: Mapping[str, str],
                 sequences: Mapping[str, Sequence[list[int]]], *, pad_id: int, batch_size: int,
                 device: torch.device, progress: Callable[[int], None]) -> None:
        self.streamed, self.modules, self.sequences = streamed, dict(modules), sequences
        self.pad_id, self.batch_size, self.device, self.progress = pad_id, batch_size, device, progress
        self.by_block, self.head_names = group_by_block(self.modules, model_names,
                                                        streamed.model.get_output_embeddings())
        self.states: dict[str, list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]] = {}
        self._block: torch.nn.Module | None = None
        self._at_head = False
        self._names: list[str] = []
        self._done: set[str] = set()

    @property
    def blocks(self) -> int:
        """Blocks run: up to the last one holding a compared layer (nothing later changes their inputs), all of
        them when the LM head is compared."""
        if self.head_names:
            return int(self.streamed.checkpoint.blocks)
        return max(self.by_block, default=-1) + 1

    @property
    def steps(self) -> int:
        """Progress units: every sequence once per block run (and once more through the head)."""
        return sum(len(s) for s in self.sequences.values()) * (self.blocks + bool(self.head_names))

    def stages(self) -> Iterator[list[str]]:
        for split, sequences in self.sequences.items():
            self.states[split] = [(*self.streamed.embed(ids, mask), mask)
                                  for ids, mask in iter_batches(sequences, self.batch_size, self.pad_id, self.device)]
        self.streamed.release_embeddings()  # every batch is embedded: the matrix is not needed again here
        try:
            for index in range(self.blocks):
                with self.streamed.block(index) as block:
                    self._block, self._names, self._done = block, self.by_block.get(index, []), set()
                    yield list(self._names)
                    for split in self.sequences:
                        if split not in self._done:  # carried on, nothing captured
                            self._through_block(split, {}, lambda name, x: None, {})
                    self._block = None
                release_free_memory()
            if self.head_names:
                with self.streamed.head():
                    self._at_head, self._names = True, list(self.head_names)
                    yield list(self._names)
                    self._at_head = False
        finally:
            self._at_head = False
            self.states.clear()

    def forward(self, split: str, callback: Callback, factors: Factors) -> None:
        if self._at_head:
            self._into_head(split, callback)
            return
        if self._block is None:
            raise RuntimeError("StreamedFeed.forward outside a stage")
        modules = {n: self.modules[n] for n in self._names}
        self._through_block(split, modules, callback, {n: f for n, f in factors.items() if n in modules})

    def _through_block(self, split: str, modules: Mapping[str, torch.nn.Module], callback: Callback,
                       factors: Factors) -> None:
        from lora_tools.model.stream import run_block

        carried = []
        with capture_inputs(modules, callback) as state, \
                lora_hooks(modules, factors) if factors else contextlib.nullcontext():
            for hidden, kwargs, mask in self.states[split]:
                state.mask = mask
                carried.append((run_block(self._block, hidden, kwargs), kwargs, mask))
                release_free_memory()
                self.progress(int(mask.shape[0]))
        self.states[split] = carried
        self._done.add(split)

    @torch.no_grad()
    def _into_head(self, split: str, callback: Callback) -> None:
        """The head's inputs: the final norm of the last block's output, real tokens only. No hook: the same
        tensor an in-memory forward hands the head, without computing the logits. The factors do not matter
        here: nothing compared comes after the head."""
        norm = self.streamed.model.model.norm
        with capture_inputs({}, callback) as state:  # its mask state flattens exactly as the hooks do
            for hidden, _, mask in self.states[split]:
                state.mask = mask
                inputs = state.flatten(norm(hidden))
                for name in self._names:
                    callback(name, inputs)
                release_free_memory()
                self.progress(int(mask.shape[0]))


def model_feed(model: torch.nn.Module, stream: Any, modules: Mapping[str, torch.nn.Module],
               model_names: Mapping[str, str], sequences: Mapping[str, Sequence[list[int]]],
               **common: Any) -> InMemoryFeed | StreamedFeed:
    """The feed for a loaded base: streamed block by block when ``stream`` (a StreamedModel) is given, else the
    whole model. ``common``: pad_id, batch_size, device, progress."""
    if stream is not None:
        return StreamedFeed(stream, modules, model_names, sequences, **common)
    return InMemoryFeed(model, modules, sequences, **common)


def group_by_block(modules: Mapping[str, torch.nn.Module], model_names: Mapping[str, str],
                   head: torch.nn.Module | None) -> tuple[dict[int, list[str]], list[str]]:
    """(decoder block index -> the modules in it, the modules that are the LM head ``head``), in ``modules``
    order; any other module outside the blocks is refused (streaming has no stage for it)."""
    by_block: dict[int, list[str]] = {}
    head_names: list[str] = []
    for name, module in modules.items():
        index = block_index(model_names[name])
        if index is not None:
            by_block.setdefault(index, []).append(name)
        elif head is not None and module is head:
            head_names.append(name)
        else:
            raise InvalidOptionError(f"module {name} ({model_names[name]}) is outside the decoder blocks "
                                     "(model.layers.N) and is not the LM head; streaming compares the blocks' "
                                     "layers and lm_head only: use --offload never")
    return by_block, head_names


def block_index(model_name: str) -> int | None:
    """N of ``...layers.N....`` in a model module name, or None outside the decoder blocks."""
    parts = model_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
