"""A GGUF model file as a tensor source for streaming: the same surface as the safetensors ``Checkpoint``.

``StreamedModel`` and ``--offload`` ask a checkpoint for its config, its tensor names (transformers names), their
sizes and, block by block, the tensors themselves. Here those come from one ``.gguf`` file:

* the config is the one transformers derives from the GGUF metadata (``AutoConfig.from_pretrained(gguf_file=)``),
  so the skeleton is the model ``load_base`` would build;
* names: each skeleton parameter's module path goes through gguf's own table (``gguf.get_tensor_name_map``,
  e.g. ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``), the lookup transformers' GGUF loader makes too;
* tensors: ``gguf.GGUFReader`` maps the file, and only the requested tensors are dequantized
  (``gguf.quants.dequantize``, which also gives them their (out, in) shape), then the per-architecture fix-ups
  transformers applies on load are applied here (facts from transformers' ``modeling_gguf_pytorch_utils``:
  llama.cpp stores Llama-family q/k rows permuted for its rotary layout, undone per head; Gemma 2/3 store
  RMSNorm weights as 1 + w), so a streamed GGUF base computes what the GGUF loaded whole computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_tools.model.stream import Checkpoint, StreamError


@dataclass
class GGUFCheckpoint(Checkpoint):
    """Where every transformers tensor of a GGUF model lives (its GGUF tensor), validated before any load.
    ``folder`` is the .gguf file and every ``files`` entry names it (the safetensors Checkpoint's interface)."""

    gguf_names: dict[str, str] = field(default_factory=dict)  # transformers name -> GGUF tensor name
    architecture: str = ""  # general.architecture
    reader: Any = None
    hf_config: Any = None
    tokenizer: Any = None

    def label(self, name: str) -> str:
        return f"{self.gguf_names.get(name, '?')} ({name})"

    def transformers_config(self) -> Any:
        return self.hf_config

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, float32 tensor in transformers' layout) for each name, dequantized one at a time."""
        from gguf.quants import dequantize

        tensors = {t.name: t for t in self.reader.tensors}
        for name in names:
            tensor = tensors[self.gguf_names[name]]
            weights = dequantize(tensor.data, tensor.tensor_type)  # numpy, shape (out, in) for a matrix
            weights = self._fix_up(tensor.name, weights)
            if not weights.flags.writeable or not weights.flags.c_contiguous:  # F32 data is a view of the map
                weights = np.array(weights, copy=True)
            yield name, torch.from_numpy(weights)

    def _fix_up(self, gguf_name: str, weights: np.ndarray) -> np.ndarray:
        if self.architecture == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = self.config.get("num_attention_heads")
            kv_heads = self.config.get("num_key_value_heads")
            if heads is None or kv_heads is None:
                return weights
            return _unpermute(weights, int(heads) if ".attn_q." in gguf_name else int(kv_heads))
        if self.architecture in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
            return weights - 1
        return weights


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows were interleaved pairs (dim, 2) -> (2, dim)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


# One parsed file kept: the plan, the skeleton and the tokenizer of one run read the same GGUF, and its header
# (a 49k-token vocabulary for SmolLM2) takes seconds to parse.
_CACHE: dict[tuple[str, int, int], GGUFCheckpoint] = {}


def read_gguf_checkpoint(path: Path) -> GGUFCheckpoint:
    """The tensor map of the GGUF model ``path``: config, tokenizer (when the file has one), every skeleton
    parameter matched to a GGUF tensor of the expected shape (a missing or misshapen one is named)."""
    try:
        stat = path.stat()
    except OSError:
        raise StreamError(f"{path}: no such GGUF file") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _read(path)
    return _CACHE[key]


def _read(path: Path) -> GGUFCheckpoint:
    from lora_tools.model.gguf_file import check_gguf_model

    info = check_gguf_model(path)  # not a model (an adapter, a vocabulary): refused in one line
    try:
        import gguf
    except ImportError:
        raise StreamError(f"{path}: streaming a .gguf base needs the 'gguf' package "
                          "(pip install 'loratools[models]')") from None
    from lora_tools.model.gguf_load import _quiet_transformers, _shared_gguf_parse

    transformers = _quiet_transformers()
    folder, name = str(path.parent), path.name
    with _shared_gguf_parse():  # one header parse for the reader, the config and the tokenizer
        reader = gguf.GGUFReader(path)
        try:
            config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
            tokenizer = None
            if info.has_tokenizer:
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                                                       local_files_only=True)
        except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
            raise StreamError(f"{path}: transformers cannot read this GGUF model's config ({info.architecture}): "
                              f"{' '.join(str(exc).split())[:200]}") from None
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    architecture = info.architecture or "?"
    checkpoint = GGUFCheckpoint(path, config.to_dict(), {}, architecture=architecture, reader=reader,
                                hf_config=config, tokenizer=tokenizer)
    _map_tensors(checkpoint, gguf)
    return checkpoint


def _map_tensors(checkpoint: GGUFCheckpoint, gguf: Any) -> None:
    """Fill files/sizes/gguf_names from the skeleton's parameters (names and shapes from the config)."""
    from lora_tools.model.stream import STREAMABLE, skeleton

    path = checkpoint.folder
    if checkpoint.model_type not in STREAMABLE:
        return  # check_streamable names the architecture; nothing to map
    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == checkpoint.architecture), None)
    if arch is None:
        raise StreamError(f"{path}: the gguf package has no tensor names for architecture "
                          f"{checkpoint.architecture!r}")
    name_map = gguf.get_tensor_name_map(arch, checkpoint.blocks)
    stored = {t.name: t for t in checkpoint.reader.tensors}
    model = skeleton(checkpoint.hf_config, torch.float32)
    tied = bool(getattr(checkpoint.hf_config, "tie_word_embeddings", False))
    for hf_name, parameter in model.named_parameters(remove_duplicate=False):
        module, _, suffix = hf_name.rpartition(".")
        base_name = name_map.get_name(module)
        gguf_name = f"{base_name}.{suffix}" if base_name else None
        if gguf_name is None or gguf_name not in stored:
            if hf_name == "lm_head.weight" and tied:
                continue  # the head is the embedding matrix
            raise StreamError(f"{path}: tensor {gguf_name or '?'} ({hf_name}) is missing from the GGUF")
        tensor = stored[gguf_name]
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        if shape != tuple(parameter.shape):
            raise StreamError(f"{path}: tensor {gguf_name} ({hf_name}) has shape {shape}, the config says "
                              f"{tuple(parameter.shape)}")
        checkpoint.files[hf_name] = path
        checkpoint.gguf_names[hf_name] = gguf_name
        checkpoint.sizes[hf_name] = (int(tensor.n_bytes), int(tensor.n_elements))
    del model
