"""compare-quant's options: what a run compares, parsed and validated before anything is loaded."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_tools.errors import InvalidOptionError
from lora_tools.quant import DEFAULT_SCHEMES, get_scheme

TARGETS = ("delta", "merged", "base")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_RANKS = {"delta": (1, 2, 4, 8), "merged": (8, 32, 128), "base": (8, 32, 128)}


@dataclass
class CompareOptions:
    target: str = "delta"
    ranks: tuple[int, ...] | None = None  # None: DEFAULT_RANKS[target]
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    calib: str | Path | None = None  # None: bundled corpus; "random": Gaussian inputs; else a text file
    max_tokens: int = 8192
    holdout: float = 0.25
    device: str = "auto"
    dtype: str = "fp32"
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    # End-to-end (compare.whole_model): None = on for causal LMs; max_kl / budget choose the recommendation.
    end_to_end: bool | None = None
    max_kl: float | None = None
    budget: int | None = None
    e2e_tokens: int | None = 512  # held-out tokens run through the full model per variant (None: all)
    e2e_batch_size: int = 8
    # Streaming (lora_tools.model.offload): auto / never / always, a memory budget in bytes, and where the
    # plan line goes (the CLI prints it on stderr).
    offload: str = "auto"
    max_memory: int | None = None
    plan_sink: Callable[[str], None] | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda: CUDA is not available here (no GPU, or a CPU-only torch "
                                 f"{torch.__version__}); use --device cpu or --device auto")
    if device not in ("cpu", "cuda"):
        raise InvalidOptionError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


def parse_ranks(text: str | None) -> tuple[int, ...] | None:
    """'1,2,4' -> (1, 2, 4); every rank must be a positive integer."""
    if text is None or not text.strip():
        return None
    ranks = []
    for part in text.split(","):
        try:
            rank = int(part.strip())
        except ValueError:
            raise InvalidOptionError(f"--ranks: {part.strip()!r} is not an integer (e.g. --ranks 1,2,4,8)") \
                from None
        if rank <= 0:
            raise InvalidOptionError(f"--ranks: rank must be positive, got {rank}")
        ranks.append(rank)
    return tuple(sorted(set(ranks)))


def parse_schemes(text: str | None) -> tuple[str, ...]:
    if text is None or not text.strip():
        return DEFAULT_SCHEMES
    names = [part.strip() for part in text.split(",") if part.strip()]
    return tuple(dict.fromkeys(get_scheme(name).name for name in names))


def display_path(path: Path) -> str:
    """A path as a report should show it: relative to the working folder or to the installed packages, so that
    committed reports do not carry one machine's absolute paths."""
    resolved = Path(path).resolve()
    anchors = [Path.cwd()] + [Path(p).resolve() for p in sys.path if p and Path(p).is_dir()]
    for anchor in sorted(anchors, key=lambda a: len(a.parts), reverse=True):
        if resolved.is_relative_to(anchor):
            return str(resolved.relative_to(anchor)) or "."
    return str(path)
