"""Sequential onloading: run a decoder-only transformer one block at a time, holding one block's weights.

This is how GPTQ/AWQ calibrate bases larger than memory (llm-compressor's sequential pipeline, GPTQModel): build
the model skeleton without weights (meta device), load the embeddings, catch what the first decoder block receives
(hidden states plus the keyword arguments the model builds for every block: attention mask, rotary position
embeddings, position ids), then for each block load just its tensors from the safetensors shards (or dequantize
them from a ``.gguf`` file: ``gguf_stream``), run every batch through it, free it and carry the hidden states on.
The final norm and LM head give the logits.

Only the forward of the model's own modules runs: the same kernels, shapes and order as an in-memory forward, so a
streamed run gives the same numbers (the tests hold them to 1e-5).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import BaseModelError

# config.json model_type values whose models are embed -> N identical decoder blocks -> norm -> LM head, with the
# transformers layout model.embed_tokens / model.layers / model.norm / lm_head.
STREAMABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")


class StreamError(BaseModelError):
    """A checkpoint that cannot be streamed (missing shard, wrong shapes, unsupported architecture)."""


class _Caught(Exception):
    """Raised by the hook on the first block to stop the forward once its inputs are known."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


@dataclass
class Checkpoint:
    """Where every tensor of a safetensors checkpoint lives, validated before anything is loaded."""

    folder: Path
    config: dict[str, Any]
    files: dict[str, Path]  # tensor name -> shard
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor name -> (bytes as stored, elements)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @property
    def blocks(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    def block_bytes(self, index: int, dtype_bytes: int | None = None) -> int:
        """Bytes of block ``index``'s tensors, as stored (or at ``dtype_bytes`` per element)."""
        prefix = f"model.layers.{index}."
        return sum(self._bytes(name, dtype_bytes) for name in self.files if name.startswith(prefix))

    def total_bytes(self, dtype_bytes: int | None = None) -> int:
        return sum(self._bytes(name, dtype_bytes) for name in self.files)

    def _bytes(self, name: str, dtype_bytes: int | None) -> int:
        stored, element = self.sizes[name]
        return stored if dtype_bytes is None else element * dtype_bytes

    def label(self, name: str) -> str:
        return name

    def transformers_config(self) -> Any:
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.folder), local_files_only=True)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor as stored) for each name, one shard opened at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for shard, keys in by_file.items():
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                for key in keys:
                    yield key, handle.get_tensor(key)


def is_gguf_file(base: Path) -> bool:
    """Whether a base is a ``.gguf`` model file (streamed through ``gguf_stream``), not a folder."""
    return base.suffix.lower() == ".gguf" and not base.is_dir()


def open_checkpoint(base: Path) -> Any:
    """The tensor source of a base: a safetensors folder (``Checkpoint``) or a ``.gguf`` model file
    (``lora_tools.model.gguf_stream.GGUFCheckpoint``, same interface)."""
    if is_gguf_file(base):
        from lora_tools.model.gguf_stream import read_gguf_checkpoint

        return read_gguf_checkpoint(base)
    return read_checkpoint(base)


def skeleton(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (buffers such as rotary inv_freq real)."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def read_checkpoint(folder: Path) -> Checkpoint:
    """The tensor -> shard map of a transformers folder (model.safetensors or a sharded index), every shard
    checked to exist and its header read (sizes, no data)."""
    from safetensors import safe_open

    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise StreamError(f"{config_path}: cannot read the model config ({type(exc).__name__})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise StreamError(f"{index}: not a safetensors index (no weight_map)") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
    elif (folder / "model.safetensors").is_file():
        files = {}
    else:
        raise StreamError(f"{folder}: streaming reads safetensors checkpoints (model.safetensors or "
                          "model.safetensors.index.json with its shards); none here")
    shards = sorted(set(files.values())) or [folder / "model.safetensors"]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise StreamError(f"{missing[0]}: shard named by {index.name} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    sizes: dict[str, tuple[int, int]] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    info = handle.get_slice(name)
                    numel = 1
                    for dim in info.get_shape():
                        numel *= int(dim)
                    element = torch.empty((), dtype=_DTYPES.get(info.get_dtype(), torch.float32)).element_size()
                    sizes[name] = (numel * element, numel)
                    files.setdefault(name, shard)
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise StreamError(f"{shard}: not a readable safetensors shard ({' '.join(str(exc).split())[:120]})") \
                from None
    absent = [name for name, shard in files.items() if name not in sizes]
    if absent:
        raise StreamError(f"{files[absent[0]]}: the index places {absent[0]} in this shard, but it is not there")
    return Checkpoint(folder, config, files, sizes)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def check_streamable(checkpoint: Any) -> None:
    if checkpoint.model_type not in STREAMABLE:
        raise StreamError(f"{checkpoint.folder}: cannot stream a {checkpoint.model_type!r} model yet (streaming "
                          f"supports decoder-only {', '.join(STREAMABLE)}); use --offload never")
    if checkpoint.blocks <= 0 or not any(n.startswith("model.layers.0.") for n in checkpoint.files):
        raise StreamError(f"{checkpoint.folder}: no decoder blocks model.layers.N in the checkpoint")


class StreamedModel:
    """A causal LM whose decoder blocks are loaded one at a time (see the module docstring)."""

    def __init__(self, base: Path, device: torch.device, dtype: torch.dtype) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        self.checkpoint = open_checkpoint(base)  # a safetensors folder or a .gguf file
        check_streamable(self.checkpoint)
        self.device, self.dtype = device, dtype
        transformers.logging.set_verbosity_error()
        self.model = skeleton(self.checkpoint.transformers_config(), dtype)
        self.blocks = self.model.model.layers
        self.bytes_read = 0
        self.seconds_reading = 0.0
        self._embeddings_loaded = False
        self._head_loaded = False

    # --- weights ------------------------------------------------------------------------------------------

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        """Materialise ``module``'s parameters from the checkpoint (names ``prefix`` + parameter path)."""
        import time

        start = time.perf_counter()
        paths: dict[str, str] = {}
        for path, _ in module.named_parameters():
            key = prefix + path
            if key not in self.checkpoint.files:
                raise StreamError(f"{self.checkpoint.folder}: tensor {key} is not in the checkpoint")
            paths[key] = path
        for key, tensor in self.checkpoint.read(paths):
            owner, leaf = _owner(module, paths[key])
            expected = tuple(owner._parameters[leaf].shape)
            if tuple(tensor.shape) != expected:
                raise StreamError(f"{self.checkpoint.files[key]}: {self.checkpoint.label(key)} has shape "
                                  f"{tuple(tensor.shape)}, the config says {expected}")
            self.bytes_read += tensor.numel() * tensor.element_size()
            # A copy, read now: a tensor left on safetensors' memory map would be read page by page during
            # the block's forward, hiding the reading time (the floor of a streamed run).
            owner._parameters[leaf] = torch.nn.Parameter(tensor.to(self.device, self.dtype, copy=True),
                                                         requires_grad=False)
            del tensor
        self.seconds_reading += time.perf_counter() - start

    def _load_embeddings(self) -> None:
        if not self._embeddings_loaded:
            self._load(self.model.model.embed_tokens, "model.embed_tokens.")
            self._embeddings_loaded = True

    def release_embeddings(self) -> None:
        """Free the embedding matrix once every batch is embedded (reloaded by the next ``embed``): it is the
        largest single tensor of most LLMs (Llama-3-70B: 2.1 GB in bf16) and a run needs it only at the start
        of each pass, and as a tied head at the end."""
        if self._embeddings_loaded and not self._head_loaded:
            self.model.model.embed_tokens.to("meta")
            self._embeddings_loaded = False

    def _tied(self) -> bool:
        return bool(getattr(self.model.config, "tie_word_embeddings", False))

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[torch.nn.Module]:
        """Block ``index`` with its weights loaded; back on the meta device (memory freed) on exit."""
        module = self.blocks[index]
        try:
            self._load(module, f"model.layers.{index}.")
            yield module
        finally:
            module.to("meta")

    @contextlib.contextmanager
    def head(self) -> Iterator[torch.nn.Module]:
        """The final norm and LM head loaded (the head yielded); freed on exit."""
        try:
            self._load_head()
            yield self.model.lm_head
        finally:
            self.release_head()

    def _load_head(self) -> None:
        if not self._head_loaded:
            self._load(self.model.model.norm, "model.norm.")
            if self._tied() and "lm_head.weight" not in self.checkpoint.files:
                self._load_embeddings()
                # Tied embeddings: the head is the (already loaded) embedding matrix, not a second copy.
                self.model.lm_head._parameters["weight"] = self.model.model.embed_tokens.weight
            else:
                self._load(self.model.lm_head, "lm_head.")
            self._head_loaded = True

    # --- forward ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(hidden states entering block 0, the keyword arguments every block gets) for one batch."""
        def catch(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Caught(args, kwargs)

        self._load_embeddings()
        handle = self.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Caught as caught:
            hidden = caught.args[0] if caught.args else caught.kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in caught.kwargs.items() if k != "hidden_states"}
            return hidden, kwargs
        finally:
            handle.remove()
        raise StreamError("the model's forward never reached its first decoder block")

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits for the last block's output."""
        self._load_head()
        return self.model.lm_head(self.model.model.norm(hidden))

    def release_head(self) -> None:
        if self._head_loaded:
            self.model.model.norm.to("meta")
            head = self.model.lm_head
            # Replaced, not moved: a tied head shares its Parameter with the embeddings, which stay loaded.
            head._parameters["weight"] = torch.nn.Parameter(torch.empty(head.weight.shape, device="meta"),
                                                            requires_grad=False)
            if getattr(head, "bias", None) is not None:
                head.to("meta")
            self._head_loaded = False


def run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    output = block(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _owner(module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    *parents, leaf = path.split(".")
    for part in parents:
        module = getattr(module, part)
    return module, leaf
