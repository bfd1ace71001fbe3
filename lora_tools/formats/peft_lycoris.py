"""PEFT folders of LoHa, LoKr (``peft_type: LOHA``/``LOKR``) and AdaLoRA (``ADALORA``), read as exact LoRA.

Keys are ``base_model.model.<module>.<role>`` with LyCORIS' role names for LoHa/LoKr (PEFT's loha/lokr layers
copy LyCORIS' layouts) and ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r) for AdaLoRA.

Scales are PEFT's own (peft/tuners/{loha,lokr}/layer.py ``update_layer``; adalora/layer.py):

- LoHa, LoKr: ``alpha / r`` with r and alpha per module from ``rank_pattern``/``alpha_pattern`` (PEFT's
  ``get_pattern_key``), also for a LoKr whose sides are both full (PEFT, unlike LyCORIS, does not switch to 1).
- AdaLoRA: ``scaling / (ranknum + 1e-5)`` with scaling = lora_alpha (init_r when lora_alpha <= 0) and
  ranknum = init_r: PEFT creates every layer with init_r and keeps that ranknum when a rank_pattern prunes it.
  ΔW = B · diag(E) · A, and the entries of E that AdaLoRA pruned to zero are dropped: a smaller exact LoRA.

The adapter reads as format ``peft`` with a LoRA ``config`` (the one read is in ``source_config``), so a PEFT
write of it is a LoRA folder holding the exact factors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import AdapterFormatError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.formats import peft
from lora_tools.formats.common import refuse_mixed_schemes, refuse_non_lora
from lora_tools.formats.lycoris import build_structured
from lora_tools.formats.lycoris_keys import (
    LOHA_ROLES,
    LOKR_ROLES,
    _check,
    build_loha,
    build_lokr,
    check_alpha,
    family,
)
from lora_tools.tensorfile import TensorInfo, TensorSource, open_tensor_file
from lora_tools.updates import AdaLoRA, ExactFactorSource

NAME = "peft_lycoris"
PEFT_TYPES = ("LOHA", "LOKR", "ADALORA")
_ROLES = "|".join(LOHA_ROLES + LOKR_ROLES + ("lora_A", "lora_B", "lora_E"))
_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{_ROLES})(?:\.weight)?$")
# PEFT's defaults when a config omits them (LoHaConfig/LoKrConfig r=8, alpha=8; AdaLoraConfig init_r=12,
# lora_alpha=8).
DEFAULTS = {"LOHA": {"r": 8, "alpha": 8}, "LOKR": {"r": 8, "alpha": 8}, "ADALORA": {"init_r": 12, "lora_alpha": 8}}
# Config fields of a LoraConfig that mean the same in these configs; the rest is specific to LoHa/LoKr/AdaLoRA.
_SHARED_FIELDS = ("base_model_name_or_path", "revision", "task_type", "target_modules", "exclude_modules",
                  "modules_to_save", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "inference_mode",
                  "bias", "auto_mapping")


def peft_type_of(path: Path) -> str | None:
    """LOHA/LOKR/ADALORA when ``path`` is a PEFT folder (or weights beside a config) of one of those kinds."""
    config_path = path / peft.CONFIG_NAME if path.is_dir() else path.parent / peft.CONFIG_NAME
    if not config_path.is_file():
        return None
    try:
        config = peft.load_config(config_path)
    except AdapterFormatError:
        return None  # peft.read reports a broken config
    kind = config.get("peft_type")
    return kind.upper() if isinstance(kind, str) and kind.upper() in PEFT_TYPES else None


def sniff(path: Path) -> bool:
    return peft.sniff(path) and peft_type_of(path) is not None


def sniff_keys(keys: list[str]) -> bool:
    return False  # only a config says LOHA/LOKR/ADALORA and gives the scale: found by sniff(path)


def _lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """The LoraConfig that describes the same layers; r/alpha/patterns are filled in by the PEFT writer."""
    shared = {k: config[k] for k in _SHARED_FIELDS if k in config}
    return {"peft_type": "LORA", "use_rslora": False, "lora_dropout": 0.0, **shared}


def read(path: Path) -> Adapter:
    config_path, weights_path = peft.find_files(path)
    if config_path is None:
        raise AdapterFormatError(f"{weights_path}: PEFT LoHa/LoKr/AdaLoRA weights need their {peft.CONFIG_NAME} "
                                 "(it holds the scale)")
    config = peft.load_config(config_path)
    kind = config.get("peft_type")
    kind = kind.upper() if isinstance(kind, str) else kind
    if kind not in PEFT_TYPES:
        raise UnsupportedAdapterError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected one of "
                                      f"{', '.join(PEFT_TYPES)}")
    inner = open_tensor_file(weights_path)
    infos = inner.infos()
    refuse_non_lora(weights_path, infos, allow=("adalora",) if kind == "ADALORA" else ("lycoris",))
    groups, extras = _group(weights_path, infos)
    refuse_mixed_schemes(weights_path, extras, f"PEFT {kind}")
    if not groups:
        raise AdapterFormatError(f"{weights_path}: no {kind} tensors found")
    source = ExactFactorSource(inner)
    warnings: list[str] = []
    fan_in_fan_out = bool(config.get("fan_in_fan_out") or False)
    if kind == "ADALORA":
        modules, rule = _adalora(weights_path, config_path, config, groups, source, fan_in_fan_out)
    else:
        modules, rule = _lycoris(weights_path, config_path, config, kind, groups, source, warnings)
    return Adapter(path=path, format=peft.NAME, modules=modules, source=source, config=_lora_config(config),
                   metadata=inner.metadata, extra_tensors=extras, warnings=warnings,
                   base_model=config.get("base_model_name_or_path"), scale_rule=rule, weights_path=weights_path,
                   source_config=config)


def _group(path: Path, infos: dict[str, TensorInfo]) -> tuple[dict[str, dict[str, TensorInfo]], list[TensorInfo]]:
    groups: dict[str, dict[str, TensorInfo]] = {}
    extras: list[TensorInfo] = []
    for key, info in infos.items():
        bare = key[len(peft.PREFIX):] if key.startswith(peft.PREFIX) else key
        match = _KEY.match(bare)
        if not match:
            extras.append(info)
            continue
        slot = groups.setdefault(match["module"], {})
        if match["role"] in slot:
            raise AdapterFormatError(f"{path}: module {match['module']} has two {match['role']} tensors "
                                     f"({slot[match['role']].key!r} and {key!r})")
        slot[match["role"]] = info
    return groups, extras


def _lycoris(path: Path, config_path: Path, config: dict[str, Any], kind: str,
             groups: dict[str, dict[str, TensorInfo]], source: ExactFactorSource,
             warnings: list[str]) -> tuple[dict[str, LoraModule], str]:
    defaults = DEFAULTS[kind]
    # PEFT's LoHa/LoKr config calls alpha "alpha"; ScaleRule reads r / lora_alpha / the patterns.
    rule = peft.ScaleRule({"r": config.get("r", defaults["r"]), "lora_alpha": config.get("alpha", defaults["alpha"]),
                           "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")},
                          config_path, warnings)
    modules: dict[str, LoraModule] = {}
    for name in sorted(groups, key=peft.natural_key):
        roles = groups[name]
        found = family(path, name, roles)
        if found != kind.lower():
            raise AdapterFormatError(f"{path}: module {name} holds {found} tensors but the config says {kind}")
        if kind == "LOHA":
            update, stored_rank = build_loha(path, name, roles)
        else:
            update, stored_rank = build_lokr(path, name, roles)
        rank, alpha, origin = rule.rank_and_alpha(name)
        if stored_rank is not None and stored_rank != rank:
            raise ModuleMismatchError(f"{path}: module {name}: {origin} says rank {rank} but the tensors have rank "
                                      f"{stored_rank}")
        check_alpha(path, name, alpha, f"PEFT {kind}")
        modules[name] = build_structured(source, name, update, scale=alpha / rank, file_alpha=alpha)
    return modules, f"alpha/r (PEFT {kind})"


def _adalora(path: Path, config_path: Path, config: dict[str, Any], groups: dict[str, dict[str, TensorInfo]],
             source: ExactFactorSource, fan_in_fan_out: bool) -> tuple[dict[str, LoraModule], str]:
    init_r = config.get("init_r", DEFAULTS["ADALORA"]["init_r"])
    lora_alpha = config.get("lora_alpha", DEFAULTS["ADALORA"]["lora_alpha"])
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 0:
        raise AdapterFormatError(f"{config_path}: init_r must be a non-negative integer, found {init_r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha != lora_alpha \
            or abs(lora_alpha) == float("inf"):
        raise AdapterFormatError(f"{config_path}: lora_alpha must be a finite number, found {lora_alpha!r}")
    scaling = float(lora_alpha) if lora_alpha > 0 else float(init_r)
    scale = scaling / (init_r + 1e-5)  # PEFT: scaling / (ranknum + 1e-5), ranknum = init_r
    pruned_by_pattern = bool(config.get("rank_pattern"))
    modules: dict[str, LoraModule] = {}
    for name in sorted(groups, key=peft.natural_key):
        roles = groups[name]
        absent = [r for r in ("lora_A", "lora_B", "lora_E") if r not in roles]
        if absent or any(r in roles for r in LOHA_ROLES + LOKR_ROLES):
            what = f"no {', '.join(absent)}" if absent else "LyCORIS tensors"
            raise AdapterFormatError(f"{path}: module {name}: AdaLoRA needs lora_A, lora_E and lora_B; found {what}")
        a, b, e = roles["lora_A"], roles["lora_B"], roles["lora_E"]
        for role, info in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
            _check(path, name, role, info, 1 if role == "lora_E" else 2, 2)
        stored = a.shape[0]
        if b.shape[1] != stored or e.shape[0] != stored or (len(e.shape) == 2 and e.shape[1] != 1):
            raise ModuleMismatchError(f"{path}: module {name}: AdaLoRA factors do not chain: lora_A "
                                      f"{list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)}; expected "
                                      f"({stored}, in), ({stored}, 1), (out, {stored})")
        if not pruned_by_pattern and stored != init_r:
            raise ModuleMismatchError(f"{path}: module {name}: init_r is {init_r} (and no rank_pattern) but lora_A "
                                      f"has {stored} rows")
        keep = _kept(source.inner, e)
        rank = min(len(keep), b.shape[0], a.shape[1])  # init_r may exceed the layer (PEFT's fixture: 12 > 10)
        update = AdaLoRA(b.shape[0], a.shape[1], (), rank, a, b, e, keep)
        modules[name] = build_structured(source, name, update, scale=scale, file_alpha=float(lora_alpha),
                                         kind="conv1d" if fan_in_fan_out else "linear")
    rule = f"lora_alpha/(init_r + 1e-5) = {scaling:g}/({init_r} + 1e-5) (PEFT AdaLoRA)"
    return modules, rule


def _kept(source: TensorSource, e: TensorInfo) -> tuple[int, ...]:
    """Indices of E's non-zero entries (NaN counts as kept: it is flagged later, not hidden); one if none."""
    values = source.get(e.key).reshape(-1)
    keep = tuple(int(i) for i in (values != 0).nonzero().reshape(-1))
    return keep or (0,)
