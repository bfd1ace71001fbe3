"""The tensors of a fine-tune that a LoRA extraction does not cover: norms, biases, embeddings, heads.

``extract`` factors the change of every linear weight; anything else that changed is listed here with its relative
change ‖T_ft − T_0‖ / ‖T_0‖, and, on request, carried the way PEFT carries ``modules_to_save``. How PEFT does it
(peft/utils/other.py ``_set_trainable`` and ``ModulesToSaveWrapper``, save_and_load.py
``set_peft_model_state_dict``; checked on the installed PEFT):

- every module whose name *ends with* an entry of the config's ``modules_to_save`` (a plain ``str.endswith``, no
  dot boundary) is wrapped, the wrapper holding a copy of the module;
- loading looks up every tensor of that copy's ``state_dict()`` under ``base_model.model.<module>.<tensor>``; a
  missing one is a KeyError. So a module is saved whole (a LayerNorm whose bias alone changed: weight and bias) or
  not at all, and a module with sub-modules would take all of them along;
- the copy is a new module: a weight tied to another (GPT-2's ``lm_head`` to ``wte``) is untied by wrapping one
  side, so both modules must be saved to keep the fine-tuned model.

The bias of a layer that gets LoRA factors cannot go to ``modules_to_save`` (the layer is already wrapped); PEFT's
``lora_bias=True`` (PEFT >= 0.14) stores it as ``lora_B.bias``, added to the layer output times the scale (1 here),
but for every adapted layer, so it is used only when all of them have a bias in the base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.formats.peft import PREFIX as PEFT_PREFIX
from lora_tools.formats.peft import natural_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLayout:
    """What a model's architecture says about its checkpoint (built from config.json on the meta device)."""

    kinds: dict[str, str]  # module -> "linear" | "conv1d": the layers LoRA factors can describe
    state_keys: frozenset[str]  # every persistent tensor key of the model's state_dict (tied names included)
    tied: dict[str, tuple[str, ...]]  # key -> the other keys of the same parameter
    module_names: tuple[str, ...]  # named_modules(remove_duplicate=False): what PEFT matches names against

    def keys_of(self, module: str) -> list[str]:
        return sorted(k for k in self.state_keys if k.startswith(module + "."))


def model_layout(model_dir: Path) -> ModelLayout | None:
    """The layout of the model in ``model_dir``; None when the folder has no usable config.json."""
    config_path = model_dir / "config.json" if model_dir.is_dir() else None
    if config_path is None or not config_path.is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        architecture = getattr(transformers, (config.architectures or ["AutoModel"])[0])
        with torch.device("meta"):
            model = (architecture.from_config(config) if architecture.__name__.startswith("Auto")
                     else architecture(config))
    except Exception as exc:  # an unknown architecture: fall back to treating 2-D weights as linear
        logger.warning("cannot build %s from its config (%s); treating every 2-D weight as linear", model_dir, exc)
        return None
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif type(module).__name__ == "Conv1D":
            kinds[name] = "conv1d"
    owners: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        owners.setdefault(id(tensor), []).append(name)
    tied = {name: tuple(n for n in names if n != name)
            for names in owners.values() if len(names) > 1 for name in names}
    return ModelLayout(kinds=kinds, state_keys=frozenset(model.state_dict()), tied=tied,
                       module_names=tuple(n for n, _ in model.named_modules(remove_duplicate=False)))


@torch.no_grad()
def tensor_change(base: torch.Tensor, finetuned: torch.Tensor) -> tuple[float, float | None]:
    """(‖T_ft − T_0‖, ‖T_ft − T_0‖ / ‖T_0‖) in float64; the relative change is None when T_0 is zero."""
    difference = float(torch.linalg.vector_norm(finetuned.double() - base.double()))
    size = float(torch.linalg.vector_norm(base.double()))
    return difference, (difference / size if size > 0 else None)


def change_row(key: str, shape: list[int], abs_change: float | None = None, rel_change: float | None = None,
               note: str | None = None) -> dict[str, Any]:
    return {"name": key, "module": key.rsplit(".", 1)[0], "shape": shape, "rel_change": rel_change,
            "abs_change": abs_change, "saved_as": None, "saved": False, "note": note}


@dataclass
class OtherPlan:
    """Rows for the report plus what to write: modules_to_save (module -> {state key: fine-tuned file key}) and
    the LoRA modules whose bias change goes to ``lora_B.bias``."""

    rows: list[dict[str, Any]]
    modules_to_save: dict[str, dict[str, str]] = field(default_factory=dict)
    lora_biases: dict[str, str] = field(default_factory=dict)  # module -> fine-tuned bias key


def plan_other(rows: list[dict[str, Any]], *, lora_modules: dict[str, str], layout: ModelLayout | None,
               ft_keys: set[str], base_keys: set[str], include: bool) -> OtherPlan:
    """Decide, for each changed tensor in ``rows`` (rows with a ``note`` already cannot be saved), how PEFT could
    carry it and whether it is carried (``include``); rows of tied tensors absent from the files are added."""
    blocked = {row["name"]: row["note"] for row in rows if row["note"]}
    plan = OtherPlan(rows=[])
    biased = [m for m in lora_modules if f"{m}.bias" in base_keys and f"{m}.bias" in ft_keys]
    for row in rows:
        plan.rows.append(row)
        if row["note"]:
            continue
        module = row["module"]
        if module in lora_modules:
            _plan_lora_part(row, module, lora_modules, biased, plan, include)
            continue
        group, why = _save_group(module, layout, lora_modules, ft_keys, blocked)
        if why is not None:
            row["note"] = why
            continue
        row["saved_as"], row["saved"] = "modules_to_save", include
        for alias_key, owner_key in group.pop("", {}).items():
            if any(r["name"] == alias_key for r in plan.rows):
                continue
            plan.rows.append({**row, "name": alias_key, "module": alias_key.rsplit(".", 1)[0],
                              "note": f"tied to {owner_key}"})
        if include:
            plan.modules_to_save.update(group)
    plan.rows.sort(key=lambda r: natural_key(r["name"]))
    return plan


def _plan_lora_part(row: dict[str, Any], module: str, lora_modules: dict[str, str], biased: list[str],
                    plan: OtherPlan, include: bool) -> None:
    if row["name"] != f"{module}.bias":
        row["note"] = f"{module} gets LoRA factors; PEFT cannot also save it whole"
        return
    missing = [m for m in lora_modules if m not in biased]
    if missing:
        row["note"] = (f"bias of the LoRA layer {module}: PEFT's lora_bias adds a bias to every adapted layer and "
                       f"{len(missing)} have none (e.g. {missing[0]})")
        return
    row["saved_as"], row["saved"] = "lora_B.bias", include
    if include:
        plan.lora_biases[module] = row["name"]


def _save_group(module: str, layout: ModelLayout | None, lora_modules: dict[str, str], ft_keys: set[str],
                blocked: dict[str, str]) -> tuple[dict[str, dict[str, str]], str | None]:
    """The modules to save together for ``module`` (itself and the modules of tied tensors absent from the files)
    as {module: {state key: file key}}, with "" mapping each tied key to its owner's key; or why it cannot be."""
    keys, why = _whole_module(module, layout, ft_keys, blocked)
    if why is not None or layout is None:
        return {}, why
    group = {module: keys}
    ties: dict[str, str] = {}
    for key, source in keys.items():
        for alias in layout.tied.get(key, ()):
            owner = alias.rsplit(".", 1)[0]
            if alias in ft_keys or owner == module or owner in group:
                continue  # in the files: compared (and planned) on its own
            if owner in lora_modules:
                return {}, f"tied to {alias}, which gets LoRA factors"
            alias_keys, alias_why = _whole_module(owner, layout, ft_keys, blocked)
            if alias_why is not None:
                return {}, f"tied to {alias}, which cannot be saved: {alias_why}"
            group[owner] = alias_keys
            ties[alias] = source
    return {**group, "": ties}, None


def _whole_module(module: str, layout: ModelLayout | None, ft_keys: set[str],
                  blocked: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """{state key: fine-tuned file key} of every tensor PEFT's copy of ``module`` holds, or why there is none."""
    if layout is None:
        return {}, "no usable config.json: which tensors form the module is unknown"
    keys = layout.keys_of(module)
    if not keys:
        return {}, f"no module {module} in the architecture of config.json"
    nested = [k for k in keys if "." in k[len(module) + 1:]]
    if nested:
        return {}, f"{module} holds sub-modules (e.g. {nested[0]}); modules_to_save would copy them all"
    sources: dict[str, str] = {}
    for key in keys:
        if key in blocked:
            return {}, f"{key}: {blocked[key]}"
        source = key if key in ft_keys else next((a for a in layout.tied.get(key, ()) if a in ft_keys), None)
        if source is None:
            return {}, f"{key} is not in the fine-tuned files"
        sources[key] = source
    # PEFT wraps every module whose name ends with the entry (older PEFT matches on "base_model.model.<name>").
    clashes = [n for n in layout.module_names
               if n != module and (n.endswith(module) or (PEFT_PREFIX + n).endswith(module))]
    if clashes:
        return {}, f"PEFT matches modules_to_save by suffix and {module!r} would also match {clashes[0]!r}"
    return sources, None
