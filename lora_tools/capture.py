"""Layer-input capture from a transformers model, in streaming form.

Forward hooks on the adapted layers' base modules see each batch's inputs; hooks are registered inside context
managers whose ``finally`` always removes them (an exception mid-forward must not leave a hook that keeps
capturing, or keeps adding a LoRA update, on a model the caller goes on using). Padding positions are dropped via
the attention mask before anything is accumulated.

What is kept per layer is bounded by the layer's width, never by the number of tokens: ``CovarianceAccumulator``
holds C = Σ_t x_t x_tᵀ (in x in, float64) and the token count; per-token statistics are computed batch by batch
by the caller (see ``lora_tools.compare.metrics``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import InvalidOptionError
from lora_tools.memory import release_free_memory

log = logging.getLogger(__name__)

InputCallback = Callable[[str, torch.Tensor], None]
GRAM_BLOCK = 1024  # columns of C formed per product (CovarianceAccumulator.update)


class CovarianceAccumulator:
    """Running C = Σ x xᵀ over tokens (float64, on the inputs' device) and the token count.

    The (in, in) matrix is allocated by the first batch: a split that sees no tokens (``--holdout 0``) costs
    nothing, and reads as zeros. On CPU, while batches arrive, only the lower triangle is kept, as column panels
    C[start:, start:start + GRAM_BLOCK] (C is symmetric): about half the memory and half the products. The full
    matrix is built from the panels when ``gram`` is first read (each panel freed as it is copied), so a streamed
    block holds its other layers' covariances at half size while one layer is fitted (5632 inputs: 147 MB, not
    254 MB).
    """

    def __init__(self, dim: int, device: Any = "cpu") -> None:
        self.dim, self.device, self.tokens = dim, device, 0
        self._gram: torch.Tensor | None = None
        self._panels: list[torch.Tensor] | None = None
        self._released = False

    @property
    def gram(self) -> torch.Tensor:
        if self._released:
            raise RuntimeError("covariance read after release()")
        if self._panels is not None:
            self._gram = self._assemble(self._panels)
            self._panels = None
        if self._gram is None:
            return torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        return self._gram

    def _assemble(self, panels: list[torch.Tensor]) -> torch.Tensor:
        """The full C from its lower panels, freeing each once copied (the caller holds no other reference)."""
        full = torch.empty(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for index, start in enumerate(range(0, self.dim, GRAM_BLOCK)):
            panel, panels[index] = panels[index], None  # (dim - start, width)
            width = panel.shape[1]
            stop = start + width
            diagonal = panel[:width]
            full[start:stop, start:stop] = (diagonal + diagonal.T) / 2  # formed whole by one product: ~symmetric
            full[stop:, start:stop] = panel[width:]
            full[start:stop, stop:] = panel[width:].T
            del panel, diagonal
        return full

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` (T, in)."""
        if x.device.type == "cpu" and self._gram is None:
            # On CPU the batch's Gram matrix is formed in float32 (this product dominates a run's cost, and a
            # float64 GEMM is slower still) and summed across batches in float64, so the rounding does not grow
            # with the number of batches. Per batch it is ~1e-6 relative — far below any error reported here.
            # Panel by panel: the float32 product and its float64 copy are then a few tens of MB, not 380 MB for
            # a 5632-wide input (the peak of a streamed block).
            x32 = x.to(torch.float32)
            starts = range(0, self.dim, GRAM_BLOCK)
            if self._panels is None:
                self._panels = [torch.zeros(self.dim - start, min(GRAM_BLOCK, self.dim - start),
                                            dtype=torch.float64) for start in starts]
            for panel, start in zip(self._panels, starts, strict=True):
                panel += (x32[:, start:].T @ x32[:, start:start + panel.shape[1]]).to(torch.float64)
        else:  # on a GPU, or more tokens after C was read: the full matrix
            if self._panels is not None:
                self._gram, self._panels = self._assemble(self._panels), None
            if self._gram is None:
                self._gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
            gram = self._gram
            if x.device.type == "cpu":
                x32 = x.to(torch.float32)
                for start in range(0, self.dim, GRAM_BLOCK):
                    stop = min(start + GRAM_BLOCK, self.dim)
                    gram[:, start:stop] += (x32.T @ x32[:, start:stop]).to(torch.float64)
            else:
                x64 = x.to(torch.float64)
                gram.addmm_(x64.T, x64)
        self.tokens += x.shape[0]

    def release(self) -> None:
        """Free C, keep the token count (a finished layer's report still says how many tokens it saw)."""
        self._gram, self._panels, self._released = None, None, True


class _MaskState:
    """The attention mask of the batch now running (set by the driver before each forward), and the last input
    flattened: consecutive modules fed the very same tensor (q, k, v of an attention block; gate and up of an
    MLP) get the very same flattened tensor, so a callback can tell shared inputs by identity
    (``SharedInputs``). One entry only: nothing is held beyond the module that ran last."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None

    def flatten(self, source: torch.Tensor) -> torch.Tensor:
        if source is not self._source:
            self._source, self._flat = source, _flatten_tokens(source.detach(), self.mask)
        return self._flat


class SharedInputs:
    """One C for the layers fed the same input tensor: their accumulators become one on the first batch, and
    each batch is added once (q/k/v share their input in every transformer block, as do gate/up: 3 of 7
    covariances per Llama block are then enough)."""

    def __init__(self) -> None:
        self._x: torch.Tensor | None = None
        self._accumulator: CovarianceAccumulator | None = None

    def add(self, accumulator: CovarianceAccumulator, x: torch.Tensor) -> CovarianceAccumulator:
        """Add ``x`` to ``accumulator`` unless the previous call added this very tensor; returns the accumulator
        the layer should keep (the previous one, adopted while this one is still empty)."""
        if x is self._x:
            if accumulator is not self._accumulator and accumulator.tokens == 0:
                accumulator = self._accumulator
            if accumulator is self._accumulator:
                return accumulator
        accumulator.update(x)
        self._x, self._accumulator = x, accumulator
        return accumulator


def _flatten_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, in) -> (T, in) keeping only the mask's real tokens; anything else -> (-1, in)."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def capture_inputs(modules: Mapping[str, torch.nn.Module], callback: InputCallback) -> Iterator[_MaskState]:
    """Call ``callback(name, x)`` with each module's input tokens x (T, in) on every forward.

    Yields a state object: set ``state.mask`` (batch, seq) before a forward to drop padding tokens. The hooks
    are removed on exit, whatever happens inside the block.
    """
    state = _MaskState()
    handles = []
    try:
        for name, module in modules.items():
            def hook(mod: torch.nn.Module, args: tuple[Any, ...], output: Any, _name: str = name) -> None:
                callback(_name, state.flatten(args[0]))

            handles.append(module.register_forward_hook(hook))
        yield state
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def lora_hooks(modules: Mapping[str, torch.nn.Module],
               factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> Iterator[None]:
    """Add ``scale · B · A · x`` to each named module's output (B: (out, r), A: (r, in)) while inside the block.

    Hooks rather than PEFT wrapping: this applies an adapter read from any format (kohya, diffusers, PEFT) to
    the plain model without touching its weights, and the ``finally`` takes it off again.
    """
    handles = []
    try:
        for name, module in modules.items():
            B, A, scale = factors[name]

            def hook(mod: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor,
                     _B: torch.Tensor = B, _A: torch.Tensor = A, _s: float = scale) -> torch.Tensor:
                x = args[0]
                update = (x.to(_A.dtype) @ _A.T) @ _B.T  # (..., out)
                return output + (_s * update).to(output.dtype)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def holdout_split(count: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(calibration indices, held-out indices) of ``count`` sequences: a fixed-seed shuffle, sorted back.

    At least one sequence lands on each side when count >= 2 and 0 < fraction < 1.
    """
    if not 0.0 <= fraction < 1.0:
        raise InvalidOptionError(f"--holdout must be in [0, 1), got {fraction}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_holdout = round(count * fraction)
    if fraction > 0 and count >= 2:
        n_holdout = min(max(n_holdout, 1), count - 1)
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


# --- calibration text ----------------------------------------------------------------------------------------


def read_documents(path: Path) -> list[str]:
    """Documents of a plain-text file: blocks separated by blank lines, whitespace-trimmed, empty ones dropped."""
    if not path.is_file():
        raise InvalidOptionError(f"{path}: calibration file not found (pass a plain-text file, or --calib random)")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise InvalidOptionError(f"{path}: calibration file is not text (it holds NUL bytes); pass a plain-text "
                                 "file with one document per blank-line-separated block")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidOptionError(f"{path}: calibration file is not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start})") from None
    blocks = [" ".join(block.split()) for block in _split_blocks(text)]
    documents = [b for b in blocks if b]
    if not documents:
        raise InvalidOptionError(f"{path}: calibration file is empty (no non-blank text)")
    return documents


def _split_blocks(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


@dataclass(frozen=True)
class TokenizedCorpus:
    """Token ids of each sequence (no padding), at most ``max_length`` each."""

    sequences: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def tokenize_documents(tokenizer: Any, documents: Sequence[str], max_tokens: int,
                       max_length: int = 128) -> TokenizedCorpus:
    """Tokenize documents in order until ``max_tokens`` tokens (special tokens included) are collected.

    Long documents are cut into consecutive windows of ``max_length`` (each with the model's special tokens),
    so no text is silently dropped; the last sequence is cut to land exactly on ``max_tokens``.
    """
    sequences: list[list[int]] = []
    total = 0
    for document in documents:
        # Overflowing windows: the tokenizer cuts a long document into consecutive max_length pieces, each
        # with its special tokens ([CLS] ... [SEP] for BERT).
        encoded = tokenizer(document, truncation=True, max_length=max_length, return_overflowing_tokens=True)
        windows = encoded["input_ids"]
        if windows and isinstance(windows[0], int):  # slow tokenizers return one flat window
            windows = [windows]
        for window in windows:
            room = max_tokens - total
            if room <= 0:
                return TokenizedCorpus(sequences)
            window = window[:room]
            sequences.append(window)
            total += len(window)
    return TokenizedCorpus(sequences)


def iter_batches(sequences: Sequence[list[int]], batch_size: int, pad_id: int,
                 device: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask), both (batch, longest), right-padded; sequences sorted by length would pad
    less but would change which tokens share a batch, which nothing here depends on — so order is kept."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        yield ids.to(device), mask.to(device)


def _skip_logits(model: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """Forward arguments that spare a causal LM its output layer when nothing captured sits there: the inputs of
    the adapted layers are all that capture needs, and SmolLM2's logits for one batch of 32 x 128 tokens are
    0.8 GB (49,152-token vocabulary). transformers' ``logits_to_keep=1`` computes the last position only."""
    import inspect

    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not accepts or any(module is head for module in modules.values()):
        return {}
    return {"logits_to_keep": 1}


@torch.no_grad()
def run_model(model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], sequences: Sequence[list[int]],
              callback: InputCallback, *, pad_id: int, batch_size: int = 32, device: Any = "cpu",
              progress: Callable[[int], None] | None = None) -> None:
    """Forward ``sequences`` through ``model`` and hand every module's real (non-padding) input tokens to
    ``callback``; ``progress(n)`` gets the number of sequences done after each batch."""
    extra = _skip_logits(model, modules)
    with capture_inputs(modules, callback) as state:
        for ids, mask in iter_batches(sequences, batch_size, pad_id, device):
            state.mask = mask
            model(input_ids=ids, attention_mask=mask, **extra)
            release_free_memory()  # see lora_tools.memory: bounded RSS over many batches
            if progress is not None:
                progress(ids.shape[0])


def random_inputs(dims: Mapping[str, int], tokens: int, callback: InputCallback, *, seed: int = 0,
                  batch_tokens: int = 2048, device: Any = "cpu") -> None:
    """Isotropic Gaussian inputs N(0, I) per layer, batch by batch (for models whose base cannot be run)."""
    gen = torch.Generator().manual_seed(seed)
    for name, dim in dims.items():
        for start in range(0, tokens, batch_tokens):
            count = min(batch_tokens, tokens - start)
            callback(name, torch.randn(count, dim, generator=gen).to(device))


def split_tokens(tokens: int, fraction: float) -> tuple[int, int]:
    """(calibration, held-out) token counts for random inputs."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidOptionError(f"--holdout must be in [0, 1), got {fraction}")
    holdout = math.floor(tokens * fraction)
    return tokens - holdout, holdout
