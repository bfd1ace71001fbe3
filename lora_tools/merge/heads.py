"""What a merge does with the tensors adapters carry whole: PEFT ``modules_to_save`` copies (a classification
``score``/``classifier`` head, a saved embedding layer) and any other non-LoRA tensor.

They are not updates, so Σ w_i·ΔW_i does not apply to them, and dropping them while the config keeps its
``task_type`` made PEFT load the base's untrained head without a word. The rule:

* no input carries any: nothing to do;
* one input, or inputs carrying the same tensors (same keys, equal values): kept as they are;
* otherwise the user chooses (``--heads``), and without a choice the merge is refused:
  ``first`` keeps the first adapter's tensors, ``average`` their element-wise mean (every input must carry the same
  keys and shapes; unweighted: ``--weights`` scale updates, a head is not an update), ``drop`` none.

When none are kept the config is made consistent: ``modules_to_save`` removed, and a ``task_type`` whose PEFT model
class wraps heads by itself (SEQ_CLS and TOKEN_CLS add ``classifier``/``score``, QUESTION_ANS ``qa_outputs``: see
``PeftModelForSequenceClassification.__init__`` in peft/peft_model.py) cleared, so that loading the merged adapter
does not present a copy of the base's head as a trained one; the report warns either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.builder import widest_dtype
from lora_tools.errors import InvalidOptionError, ModuleMismatchError

HEAD_POLICIES = ("first", "average", "drop")
# PEFT task types whose model class adds classifier heads to modules_to_save on load.
HEAD_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})


@dataclass
class HeadsChoice:
    """The non-LoRA tensors the merged adapter carries, and what the report says about them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> tensor, as stored by the first input
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse_heads(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in HEAD_POLICIES:
        raise InvalidOptionError(f"unknown --heads {value!r}; choose {', '.join(HEAD_POLICIES)}")
    return value


def _keys(adapter: Adapter) -> list[str]:
    return [info.key for info in adapter.extra_tensors]


def _tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {key: adapter.source.get(key) for key in _keys(adapter)}


def _difference(adapters: Sequence[Adapter]) -> str | None:
    """How the inputs' non-LoRA tensors differ (None: the same keys with equal values)."""
    first = adapters[0]
    first_keys = set(_keys(first))
    reference: dict[str, torch.Tensor] | None = None
    for other in adapters[1:]:
        other_keys = set(_keys(other))
        if other_keys != first_keys:
            only_first, only_other = sorted(first_keys - other_keys), sorted(other_keys - first_keys)
            if only_first:
                return f"{first.path} has {only_first[0]} but {other.path} has not"
            return f"{other.path} has {only_other[0]} but {first.path} has not"
        reference = _tensors(first) if reference is None else reference
        for key, tensor in reference.items():
            value = other.source.get(key)
            if value.shape != tensor.shape or value.dtype != tensor.dtype or not torch.equal(value, tensor):
                return f"{key} differs between {first.path} and {other.path}"
    return None


def _average(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    reason = None
    keys = _keys(adapters[0])
    for other in adapters[1:]:
        if set(_keys(other)) != set(keys):
            reason = f"{adapters[0].path} and {other.path} carry different tensors"
    if reason:
        raise ModuleMismatchError(f"--heads average needs the same non-LoRA tensors in every input: {reason}; "
                                  "use --heads first or drop")
    averaged = {}
    for key in keys:
        values = [adapter.source.get(key) for adapter in adapters]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ModuleMismatchError(f"--heads average: tensor {key} has shapes "
                                      f"{' and '.join(str(list(s)) for s in sorted(shapes))} in the inputs")
        if not all(v.is_floating_point() for v in values):
            raise ModuleMismatchError(f"--heads average: tensor {key} is not floating point; use --heads first")
        dtype = widest_dtype([info.dtype for adapter in adapters for info in adapter.extra_tensors
                              if info.key == key])
        averaged[key] = torch.stack([v.to(torch.float64) for v in values]).mean(dim=0).to(dtype)
    return averaged


def choose_heads(adapters: Sequence[Adapter], policy: str | None) -> HeadsChoice:
    """Apply the rule above; raise ``ModuleMismatchError`` when the inputs differ and no ``policy`` is given."""
    holders = [a for a in adapters if a.extra_tensors]
    if not holders:
        return HeadsChoice(report={"policy": "none", "kept": [], "dropped": []})
    all_keys = sorted({key for a in adapters for key in _keys(a)})
    difference = None if len(adapters) == 1 else _difference(adapters)
    if policy == "drop":
        choice = HeadsChoice(report={"policy": "drop", "kept": [], "dropped": all_keys})
    elif difference is None:
        choice = HeadsChoice(_tensors(adapters[0]), {"policy": "single input" if len(adapters) == 1 else
                                                     "identical in every input", "kept": all_keys, "dropped": []})
    elif policy is None:
        raise ModuleMismatchError(
            f"the adapters carry different non-LoRA tensors (modules_to_save copies such as a classification "
            f"head): {difference}; they cannot be added like LoRA updates: choose --heads first, average or drop")
    elif policy == "first":
        tensors = _tensors(adapters[0])
        choice = HeadsChoice(tensors, {"policy": "first", "kept": sorted(tensors),
                                       "dropped": [k for k in all_keys if k not in tensors]})
    else:
        tensors = _average(adapters)
        choice = HeadsChoice(tensors, {"policy": "average", "kept": sorted(tensors), "dropped": []})
    for key, tensor in choice.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModuleMismatchError(f"non-LoRA tensor {key} contains NaN or Inf; refusing to merge")
    if choice.report["dropped"]:
        choice.warnings.append(
            f"{len(choice.report['dropped'])} non-LoRA tensor(s) dropped (--heads {choice.report['policy']}; e.g. "
            f"{choice.report['dropped'][0]}): the merged adapter has no trained copy of them, and a model with a "
            "task head gets its base's untrained head")
    return choice


def output_config(config: dict[str, Any], choice: HeadsChoice) -> list[str]:
    """Make ``config`` (the merged PEFT config, edited in place) agree with the tensors kept; returns warnings."""
    if choice.tensors:
        return []
    warnings = []
    if config.get("modules_to_save"):
        warnings.append(f"modules_to_save {config['modules_to_save']} removed from the config: no copy is kept")
    config["modules_to_save"] = None
    task_type = config.get("task_type")
    if isinstance(task_type, str) and task_type.upper() in HEAD_TASK_TYPES and choice.report["dropped"]:
        config["task_type"] = None
        warnings.append(f"task_type {task_type} cleared: PEFT would otherwise wrap the base's untrained head as "
                        "if it were the adapter's")
    return warnings
