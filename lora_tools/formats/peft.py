"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or legacy ``adapter_model.bin``).

Scales follow PEFT's own rules (peft/tuners/lora): ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``; per-module ``rank_pattern``/``alpha_pattern`` resolved like PEFT >= 0.15's ``get_pattern_key``: the
first pattern key, in order, for which ``re.match(rf"(.*\\.)?({key})$", module_name)`` matches. Written patterns are
plain dotted names that every PEFT from 0.10 on resolves alike (formats/peft_patterns.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import AdapterFormatError, LoraToolsError, UnsupportedAdapterError
from lora_tools.formats.common import (
    factor_tensor,
    format_number,
    make_module,
    pair_factors,
    refuse_mixed_schemes,
    refuse_non_lora,
    write_safetensors,
)
from lora_tools.formats.peft_patterns import choose_patterns, get_pattern_key
from lora_tools.tensorfile import TensorInfo, TensorSource, open_tensor_file

log = logging.getLogger(__name__)

NAME = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# PEFT's default when a config omits lora_alpha (LoraConfig.lora_alpha = 8).
DEFAULT_LORA_ALPHA = 8

# <module>.lora_A[.<adapter>].weight, <module>.lora_embedding_A[.<adapter>], <module>.lora_B[.<adapter>].bias, ...
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))??(?:\.(?P<param>weight|bias))?$"
)
# GPT-2 family layers that are transformers' Conv1D (weight stored (in, out)).
_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
_LINEAR_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "query", "key", "value", "dense", "fc1", "fc2", "out_proj", "to_q", "to_k", "to_v"})


def sniff(path: Path) -> bool:
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    return path.name in WEIGHT_NAMES or (path.parent / CONFIG_NAME).is_file() and path.suffix in (
        ".safetensors", ".bin")


def sniff_keys(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) and _KEY.match(k) for k in keys)


def find_files(path: Path) -> tuple[Path | None, Path]:
    """(config path or None, weights path) for a PEFT folder or weights file."""
    if path.is_dir():
        config = path / CONFIG_NAME
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return (config if config.is_file() else None), path / name
        if not config.is_file():
            raise not_a_peft_adapter(path)
        raise AdapterFormatError(
            f"{path}: folder has {CONFIG_NAME} but no adapter weights ({' or '.join(WEIGHT_NAMES)})"
        )
    config = path.parent / CONFIG_NAME
    return (config if config.is_file() else None), path


def not_a_peft_adapter(path: Path, keys: list[str] | None = None) -> AdapterFormatError:
    """The error for reading as PEFT something with no config and no PEFT names: say what it looks like."""
    from lora_tools.formats import FORMATS, resolve  # the registry imports this module

    try:
        if keys is None:  # a folder: the registry picks its weight file and sniffs it
            target, detected = resolve(path)
            found = f" ({target.name})" if target != path else ""
        else:
            found = ""
            detected = next(name for name, fmt in FORMATS.items() if name != NAME and fmt.sniff_keys(keys))
    except (LoraToolsError, StopIteration) as exc:
        detail = f"; {str(exc).removeprefix(f'{path}: ')}" if isinstance(exc, LoraToolsError) else ""
        what = "no PEFT-named tensors (base_model.model.*.lora_A/lora_B)" if keys is not None else \
            f"no {' or '.join(WEIGHT_NAMES)}"
        return AdapterFormatError(f"{path}: not a PEFT adapter: no {CONFIG_NAME} and {what}{detail}")
    if detected == NAME:
        return AdapterFormatError(f"{path}: no {CONFIG_NAME}, only PEFT-named weights without a config{found}: "
                                  "pass that file to read it with its scales unknown (1 assumed)")
    return AdapterFormatError(
        f"{path}: not a PEFT adapter: no {CONFIG_NAME} and no PEFT-named weights; this looks like a {detected} "
        f"adapter{found}: read it as {detected} (the format is detected when none is given)"
    )


def load_config(config_path: Path) -> dict[str, Any]:
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{config_path}: cannot read the config: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    return config


class ScaleRule:
    """Rank and alpha per module from a PEFT LoraConfig dict."""

    def __init__(self, config: dict[str, Any], origin: Path | str, warnings: list[str]):
        self.origin = origin
        self.r = _positive_int(config.get("r", 8), "r", origin)
        alpha = config.get("lora_alpha")
        if alpha is None:
            warnings.append(f"{origin}: lora_alpha missing; using PEFT's default lora_alpha={DEFAULT_LORA_ALPHA}")
            alpha = DEFAULT_LORA_ALPHA
        self.alpha = _number(alpha, "lora_alpha", origin)
        self.use_rslora = bool(config.get("use_rslora") or False)
        self.rank_pattern = _pattern(config.get("rank_pattern"), "rank_pattern", origin)
        self.alpha_pattern = _pattern(config.get("alpha_pattern"), "alpha_pattern", origin)
        for key, value in self.rank_pattern.items():
            _positive_int(value, f"rank_pattern[{key!r}]", origin)
        for key, value in self.alpha_pattern.items():
            _number(value, f"alpha_pattern[{key!r}]", origin)

    @property
    def description(self) -> str:
        return "lora_alpha/sqrt(r) (rsLoRA)" if self.use_rslora else "lora_alpha/r"

    def rank_and_alpha(self, module_name: str) -> tuple[int, float, str]:
        key = get_pattern_key(list(self.rank_pattern), module_name)
        rank = int(self.rank_pattern[key]) if key is not None else self.r
        source = f"rank_pattern[{key!r}]" if key is not None else f"{self.origin} (r)"
        akey = get_pattern_key(list(self.alpha_pattern), module_name)
        alpha = float(self.alpha_pattern[akey]) if akey is not None else self.alpha
        return rank, alpha, source

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _positive_int(value: Any, what: str, origin: Path | str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{origin}: {what} must be a positive integer, found {value!r}")
    return value


def _number(value: Any, what: str, origin: Path | str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{origin}: {what} must be a finite number, found {value!r}")
    return float(value)


def _pattern(value: Any, what: str, origin: Path | str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{origin}: {what} must be an object, found {type(value).__name__}")
    return value


def parse_lora_keys(path: Path, infos: dict[str, TensorInfo], prefix: str = PREFIX) -> tuple[
        dict[str, dict[str, TensorInfo]], list[TensorInfo]]:
    """Group PEFT-style keys by module: {module: {role: info}}; everything else is an extra tensor."""
    refuse_non_lora(path, infos)
    groups: dict[str, dict[str, TensorInfo]] = {}
    extras: list[TensorInfo] = []
    for key, info in infos.items():
        bare = key[len(prefix):] if key.startswith(prefix) else key
        match = _KEY.match(bare)
        if not match:
            extras.append(info)
            continue
        role, param = match["role"], match["param"]
        if role == "lora_B" and param == "bias":
            role = "bias"
        elif role == "lora_magnitude_vector":
            role = "magnitude"
        slot = groups.setdefault(match["module"], {})
        if role in slot:
            raise AdapterFormatError(
                f"{path}: module {match['module']} has two {role} tensors ({slot[role].key!r} and {key!r}); "
                "files holding several adapters are not supported"
            )
        slot[role] = info
    refuse_mixed_schemes(path, extras, "PEFT")
    return groups, extras


def build_modules(path: Path, groups: dict[str, dict[str, TensorInfo]], rule: ScaleRule | None,
                  fan_in_fan_out: bool | None, warnings: list[str]) -> dict[str, LoraModule]:
    """LoraModules from grouped keys; ``fan_in_fan_out`` None means no config says (kinds then follow names)."""
    downs = {m: g.get("lora_A") or g.get("lora_embedding_A") for m, g in groups.items()}
    ups = {m: g.get("lora_B") or g.get("lora_embedding_B") for m, g in groups.items()}
    downs = {m: i for m, i in downs.items() if i is not None}
    ups = {m: i for m, i in ups.items() if i is not None}
    stray = sorted(m for m in groups if m not in downs and m not in ups)
    if stray:
        raise AdapterFormatError(f"{path}: module {stray[0]} has a bias or DoRA magnitude but no LoRA factors")
    modules: dict[str, LoraModule] = {}
    corrected: list[str] = []
    for name in sorted(pair_factors(path, downs, ups), key=natural_key):
        group = groups[name]
        a_info, b_info = downs[name], ups[name]
        if "lora_embedding_A" in group:
            kind = "embedding"
        elif len(a_info.shape) > 2:
            kind = "conv"
        elif fan_in_fan_out is None:
            kind = "conv1d" if name.rsplit(".", 1)[-1] in _CONV1D_NAMES else "linear"
        else:
            kind = "conv1d" if fan_in_fan_out else "linear"
        if rule is not None:
            rank, alpha, source = rule.rank_and_alpha(name)
            scale = rule.scale(rank, alpha)
        else:
            rank, source = a_info.shape[0], "tensor"
            alpha, scale = float(rank), 1.0
        module = make_module(path, name, a_info, b_info, alpha=alpha, scale=scale, kind=kind,
                             expected_rank=rank, rank_source=source,
                             bias_key=group["bias"].key if "bias" in group else None,
                             magnitude_key=group["magnitude"].key if "magnitude" in group else None)
        if fan_in_fan_out is not None and _corrects_fan_in_fan_out(module):
            corrected.append(name)
        if module.magnitude_key:
            module.flags.append("dora")
        modules[name] = module
    if corrected:
        warnings.append(_fan_in_fan_out_warning(path, bool(fan_in_fan_out), corrected))
    elif fan_in_fan_out is None:
        conv1d = [name for name, module in modules.items() if module.kind == "conv1d"]
        if conv1d:
            warnings.append(f"{path}: no config gives fan_in_fan_out; {len(conv1d)} module(s) named like GPT-2 "
                            f"Conv1D layers (e.g. {conv1d[0]}) taken as Conv1D, as PEFT would")
    return modules


def _corrects_fan_in_fan_out(module: LoraModule) -> bool:
    """Set the kind PEFT uses when the config's fan_in_fan_out disagrees with the layer; True when it did."""
    leaf = module.name.rsplit(".", 1)[-1]
    if module.kind == "linear" and leaf in _CONV1D_NAMES:
        # PEFT notices a Conv1D target at load time, warns and applies ΔW transposed anyway.
        module.kind = "conv1d"
    elif module.kind == "conv1d" and leaf in _LINEAR_NAMES:
        module.kind = "linear"  # PEFT ignores fan_in_fan_out for nn.Linear
    else:
        return False
    module.flags.append("fifo_mismatch")
    return True


def _fan_in_fan_out_warning(path: Path, fan_in_fan_out: bool, corrected: list[str]) -> str:
    """One line per adapter, however many modules disagree with the config."""
    count, example = len(corrected), corrected[0]
    if fan_in_fan_out:
        return (f"{path}: config says fan_in_fan_out=true but {count} module(s) look like nn.Linear (e.g. "
                f"{example}); PEFT ignores fan_in_fan_out for Linear layers")
    return (f"{path}: config says fan_in_fan_out=false but {count} module(s) look like GPT-2 Conv1D layers "
            f"(e.g. {example}); PEFT transposes the update for Conv1D regardless")


def natural_key(name: str) -> list[Any]:
    """Sort layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read(path: Path) -> Adapter:
    config_path, weights_path = find_files(path)
    warnings: list[str] = []
    config: dict[str, Any] = load_config(config_path) if config_path else {}
    origin = config_path or weights_path
    if config:
        peft_type = config.get("peft_type")
        if peft_type is None:
            warnings.append(f"{config_path}: no peft_type; assuming LORA")
        elif not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise UnsupportedAdapterError(
                f"{config_path}: peft_type is {peft_type!r}, not LORA; loratools handles LoRA adapters only"
            )
    source: TensorSource = open_tensor_file(weights_path)
    if config_path is None and not sniff_keys(list(source.infos())):
        raise not_a_peft_adapter(path, list(source.infos()))
    groups, extras = parse_lora_keys(weights_path, source.infos())
    if not groups:
        raise AdapterFormatError(f"{weights_path}: no LoRA tensors (lora_A/lora_B) found")
    if config:
        rule: ScaleRule | None = ScaleRule(config, origin, warnings)
    else:
        rule = None
        warnings.append(f"{weights_path}: no {CONFIG_NAME} beside the weights; alpha unknown, assuming "
                        "lora_alpha = r (scale 1)")
    fan_in_fan_out = bool(config.get("fan_in_fan_out") or False) if config_path else None
    modules = build_modules(weights_path, groups, rule, fan_in_fan_out, warnings)
    if any("dora" in m.flags for m in modules.values()):
        warnings.append("DoRA adapter: singular values describe s·B·A only; the magnitude vector rescales "
                        "columns of W0+s·B·A and needs the base weights")
    return Adapter(
        path=path, format=NAME, modules=modules, source=source, config=config, metadata=source.metadata,
        extra_tensors=extras, warnings=warnings, base_model=config.get("base_model_name_or_path"),
        scale_rule=rule.description if rule else "unknown (no config): scale 1 assumed",
        weights_path=weights_path,
    )


# --- writing -------------------------------------------------------------------------------------------------


def config_for(adapter: Adapter, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A LoraConfig dict whose scale rule gives every module of ``adapter`` exactly its rank and scale.

    ``rank_pattern``/``alpha_pattern`` hold plain dotted names, collapsed where one covers many layers
    (``down_proj: 2``), checked module by module against the rule of each PEFT from 0.10 on (peft_patterns.py).
    Patterns of the input are replaced, not merged: they described the old ranks. Other fields of ``base`` are
    kept.
    """
    config = dict(base or {})
    if not adapter.modules:
        return config
    rslora = bool(config.get("use_rslora") or False)
    # alpha such that the loader's alpha/r (or alpha/sqrt(r)) is the module's scale.
    targets = {n: (int(m.rank), m.scale * math.sqrt(m.rank) if rslora else m.scale * m.rank)
               for n, m in adapter.modules.items()}
    patterns = choose_patterns(targets)
    if patterns.old_peft_mismatches:
        log.warning("%s: PEFT older than 0.15 would load %d module(s) with the wrong rank or alpha (%s): their "
                    "names end one another's at a dot, which no pattern tells apart under the old rule; PEFT "
                    ">= 0.15 loads them right", adapter.path, len(patterns.old_peft_mismatches),
                    patterns.old_peft_mismatches[0])
    config["r"] = patterns.r
    config["lora_alpha"] = format_number(patterns.lora_alpha)
    config["rank_pattern"] = dict(patterns.rank_pattern)
    config["alpha_pattern"] = {key: format_number(value) for key, value in patterns.alpha_pattern.items()}
    return config


def _default_config(adapter: Adapter) -> dict[str, Any]:
    kinds = {m.kind for m in adapter.modules.values()}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": adapter.base_model,
        "task_type": None,
        "target_modules": sorted(adapter.modules, key=natural_key),
        "fan_in_fan_out": "conv1d" in kinds,
        "use_rslora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
    }


def state_dict_for(adapter: Adapter, prefix: str = PREFIX) -> dict[str, Any]:
    """Tensors under PEFT's key names; tensors that are not LoRA factors keep their keys."""
    tensors: dict[str, Any] = {}
    for name, module in adapter.modules.items():
        if module.kind == "embedding":
            a_key, b_key = f"{prefix}{name}.lora_embedding_A", f"{prefix}{name}.lora_embedding_B"
        else:
            a_key, b_key = f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"
        tensors[a_key] = factor_tensor(adapter.source, module.a_info)
        tensors[b_key] = factor_tensor(adapter.source, module.b_info)
        if module.bias_key:
            tensors[f"{prefix}{name}.lora_B.bias"] = adapter.source.get(module.bias_key)
        if module.magnitude_key:
            if adapter.format not in ("peft", "diffusers"):
                raise UnsupportedAdapterError(
                    f"{adapter.path}: module {name}: writing a {adapter.format} DoRA magnitude as PEFT is not "
                    "supported (the layouts differ); keep the input format")
            tensors[f"{prefix}{name}.lora_magnitude_vector"] = adapter.source.get(module.magnitude_key)
    for info in adapter.extra_tensors:
        tensors[info.key] = adapter.source.get(info.key)
    return tensors


def _with_peft_names(adapter: Adapter) -> Adapter:
    """Another format's adapter (truncate/merge ``--to peft``) under the module paths PEFT wraps: kohya's flattened
    names resolved and diffusers' component prefix handled exactly as ``convert`` does; names that cannot be
    resolved are refused there, never written as nonsense PEFT keys."""
    if adapter.format == NAME:
        return adapter
    import dataclasses

    from lora_tools.convert.run import foreign_names  # convert.run imports the format registry

    names = foreign_names(adapter, NAME)
    if all(names[n] == n for n in adapter.modules):
        return adapter
    modules = {names[n]: dataclasses.replace(m, name=names[n]) for n, m in adapter.modules.items()}
    return dataclasses.replace(adapter, modules=modules)


def write(adapter: Adapter, path: Path, *, force: bool = False) -> Path:
    """Write ``adapter`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), atomically."""
    from lora_tools.atomic import atomic_dir

    adapter = _with_peft_names(adapter)
    base = adapter.config if adapter.format == NAME and adapter.config else _default_config(adapter)
    config = config_for(adapter, base)
    tensors = state_dict_for(adapter)
    metadata = dict(adapter.metadata) if adapter.format == NAME else {}
    metadata.setdefault("format", "pt")
    with atomic_dir(path, force) as tmp:
        write_safetensors(tensors, tmp / WEIGHT_NAMES[0], metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
