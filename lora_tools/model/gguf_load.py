"""Load a GGUF model file with transformers (``from_pretrained(folder, gguf_file=...)``), offline, quickly.

transformers parses the GGUF header once for the config, once for the weights and once for the tokenizer,
converts the ~100k vocabulary fields to Python values on each metadata read, and rebuilds gguf's tensor-name
table once per submodule (~400 times for a 30-layer model). While our load runs, ``gguf.GGUFReader``,
``gguf.get_tensor_name_map`` and transformers' metadata-only ``load_gguf_checkpoint`` are memoised (one parse,
one table, one conversion); all three are restored in a ``finally``, and nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import BaseModelError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _shared_gguf_parse() -> Iterator[None]:
    """Within the block, one GGUFReader per (path, mode) and one tensor-name map per (arch, layers)."""
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original_checkpoint = gguf_utils.load_gguf_checkpoint
    metadata: dict[str, Any] = {}

    def checkpoint(path: Any, return_tensors: bool = False, **kwargs: Any) -> Any:
        # Metadata-only reads (config, then tokenizer) turn the same ~100k vocabulary fields into Python
        # values each time; do it once and hand each caller its own copy, since callers edit the dicts.
        if return_tensors or kwargs.get("model_to_load") is not None:
            return original_checkpoint(path, return_tensors=return_tensors, **kwargs)
        key = os.fspath(path)
        if key not in metadata:
            metadata[key] = original_checkpoint(path, return_tensors=False, **kwargs)
        return copy.deepcopy(metadata[key])

    # transformers imports these names at call time (``from gguf import ...`` / ``from ..modeling_gguf...``)
    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    gguf_utils.load_gguf_checkpoint = checkpoint
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
        gguf_utils.load_gguf_checkpoint = original_checkpoint


def _quiet_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_gguf_model(path: Path, device: Any, dtype: torch.dtype,
                    need_tokenizer: bool = True) -> tuple[Any, Any]:
    """(causal LM in eval mode on ``device``, tokenizer or None) from the GGUF model file ``path``."""
    from lora_tools.model.gguf_file import check_gguf_model

    info = check_gguf_model(path)
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError:
        raise BaseModelError(f"{path}: loading a .gguf base needs the 'gguf' package "
                             "(pip install 'loratools[models]')") from None
    if need_tokenizer and not info.has_tokenizer:
        raise BaseModelError(f"{path}: this GGUF holds no tokenizer (no tokenizer.ggml.tokens); pass a base "
                             "with a tokenizer, or use --calib random")
    transformers = _quiet_transformers()
    started = time.perf_counter()
    folder, name = str(path.parent), path.name
    with _shared_gguf_parse(), _no_tqdm():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                                      local_files_only=True)
            tokenizer = None
            if need_tokenizer:
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                                                       local_files_only=True)
        except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
            raise BaseModelError(f"{path}: transformers cannot load this GGUF model ({info.architecture}): "
                                 f"{' '.join(str(exc).split())[:300]}") from None
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    log.info("loaded %s in %.1f s", path, time.perf_counter() - started)
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """transformers' GGUF dequantization draws a tqdm bar on stderr whatever its own progress setting says (the
    module imported ``tqdm`` by name); the bar is replaced by a plain iteration during our load."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original
