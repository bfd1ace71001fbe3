"""Module names across formats: one canonical form, (component, module path), and the three spellings of it.

* PEFT: the module path inside one model (``model.layers.0.self_attn.q_proj``, ``down_blocks.0...to_q``).
* diffusers: the path behind a component prefix (``unet.``, ``text_encoder.``, ``text_encoder_2.``); the older
  attention-processor keys are already mapped to module paths by the reader (and belong to the UNet).
* kohya: ``lora_<component>_`` + the path with dots turned into underscores. That is lossy (``to_out.0`` and a
  hypothetical ``to_out_0`` flatten alike), so kohya names are resolved against real module names: the ones
  loratools recorded in the file's metadata, a base model's weight names, or built-in lists of the common
  Stable Diffusion UNet and CLIP text-encoder layouts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lora_tools.errors import BaseModelError, InvalidOptionError

COMPONENTS = ("unet", "te", "te1", "te2", "transformer")
# kohya prefix of each component; the longest match wins when reading ("lora_te1_" before "lora_te_").
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_",
                "transformer": "lora_transformer_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2.",
                    "transformer": "transformer."}
# Sub-folders of a diffusers pipeline folder, by component (for --base).
PIPELINE_FOLDERS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
                    "transformer": "transformer"}

# Metadata keys loratools writes into kohya files so that its own outputs convert back without a base model.
META_NAMES = "loratools_module_names"
META_SOURCE_FORMAT = "loratools_source_format"
META_PEFT_CONFIG = "loratools_peft_config"

_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.",
               "add_embedding.")


@dataclass(frozen=True)
class Canonical:
    component: str | None  # None: a plain model (an LLM's PEFT adapter) or unknown
    path: str


def flatten(path: str) -> str:
    return path.replace(".", "_")


def guess_component(path: str) -> str | None:
    if path.startswith(_UNET_ROOTS):
        return "unet"
    if path.startswith("text_model."):
        return "te"
    return None


def parse_prefix(prefix: str | None) -> str | None:
    if prefix is None:
        return None
    if prefix not in COMPONENTS:
        raise InvalidOptionError(f"unknown --prefix {prefix!r}; choose one of {', '.join(COMPONENTS)}")
    return prefix


def from_diffusers(name: str) -> Canonical:
    for component in ("unet", "te2", "te", "transformer"):
        prefix = DIFFUSERS_PREFIX[component]
        if name.startswith(prefix):
            return Canonical(component, name[len(prefix):])
    # No component prefix: the attention-processor naming and early exports, all UNet.
    return Canonical(guess_component(name) or "unet", name)


def from_peft(name: str, component: str | None) -> Canonical:
    return Canonical(component if component is not None else guess_component(name), name)


def split_kohya(name: str) -> tuple[str | None, str]:
    """(component, flattened rest) of a kohya module name."""
    for component, prefix in sorted(KOHYA_PREFIX.items(), key=lambda item: -len(item[1])):
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None, name[len("lora_"):] if name.startswith("lora_") else name


def to_kohya(canonical: Canonical, has_te2: bool) -> str:
    component = canonical.component
    if component == "te" and has_te2:
        component = "te1"  # SDXL: two text encoders, kohya names them te1 and te2
    prefix = KOHYA_PREFIX[component] if component else "lora_"
    return prefix + flatten(canonical.path)


def to_diffusers(canonical: Canonical) -> str:
    return (DIFFUSERS_PREFIX[canonical.component] if canonical.component else "") + canonical.path


# --- built-in module lists -------------------------------------------------------------------------------------


def _transformer_block(prefix: str, blocks: int) -> list[str]:
    names = [f"{prefix}.proj_in", f"{prefix}.proj_out"]
    for t in range(blocks):
        block = f"{prefix}.transformer_blocks.{t}"
        for attn in ("attn1", "attn2"):
            names += [f"{block}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
    return names


def _resnet(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in ("conv1", "conv2", "time_emb_proj", "conv_shortcut")]


@lru_cache(maxsize=1)
def builtin_unet_modules() -> tuple[str, ...]:
    """A superset of the LoRA-able layers of the SD 1.x/2.x and SDXL UNets (diffusers names)."""
    names = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
             "add_embedding.linear_1", "add_embedding.linear_2"]
    for b in range(4):
        for a in range(2):
            names += _transformer_block(f"down_blocks.{b}.attentions.{a}", 10)
        for r in range(2):
            names += _resnet(f"down_blocks.{b}.resnets.{r}")
        names.append(f"down_blocks.{b}.downsamplers.0.conv")
        for a in range(3):
            names += _transformer_block(f"up_blocks.{b}.attentions.{a}", 10)
        for r in range(3):
            names += _resnet(f"up_blocks.{b}.resnets.{r}")
        names.append(f"up_blocks.{b}.upsamplers.0.conv")
    names += _transformer_block("mid_block.attentions.0", 10)
    for r in range(2):
        names += _resnet(f"mid_block.resnets.{r}")
    return tuple(names)


@lru_cache(maxsize=1)
def builtin_clip_modules() -> tuple[str, ...]:
    """The LoRA-able layers of CLIP text encoders up to 32 layers (CLIP-L, OpenCLIP-H/G), transformers names."""
    names = []
    for i in range(32):
        layer = f"text_model.encoder.layers.{i}"
        names += [f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names += [f"{layer}.mlp.fc1", f"{layer}.mlp.fc2"]
    return tuple(names + ["text_projection"])


# --- resolving kohya names -----------------------------------------------------------------------------------


@dataclass
class NameIndex:
    """Flattened name -> real module paths, per component (None: a base model without components)."""

    by_component: dict[str | None, dict[str, set[str]]] = field(default_factory=dict)
    source: str = "built-in SD UNet / CLIP lists"

    def add(self, component: str | None, paths: Iterable[str]) -> None:
        table = self.by_component.setdefault(component, {})
        for path in paths:
            table.setdefault(flatten(path), set()).add(path)
            if component is not None:
                # Hand conversions that flattened the diffusers name itself: lora_unet_unet_down_blocks_...
                table.setdefault(flatten(DIFFUSERS_PREFIX[component] + path), set()).add(path)

    def resolve(self, component: str | None, flat: str) -> tuple[str | None, str | None]:
        """(path, None) when exactly one real module flattens to ``flat``; (None, why) otherwise."""
        tables = [self.by_component.get(component, {})]
        if component in ("te", "te1"):
            tables += [self.by_component.get("te" if component == "te1" else "te1", {})]
        tables.append(self.by_component.get(None, {}))
        for table in tables:
            found = table.get(flat)
            if found:
                if len(found) > 1:
                    return None, f"ambiguous ({', '.join(sorted(found))})"
                return next(iter(found)), None
        return None, "no such module"


def builtin_index() -> NameIndex:
    index = NameIndex()
    index.add("unet", builtin_unet_modules())
    index.add("transformer", builtin_unet_modules())
    for component in ("te", "te1", "te2"):
        index.add(component, builtin_clip_modules())
    return index


def base_index(base: Path) -> NameIndex:
    """Module names of a base model: a safetensors file listing its weights, a transformers model folder, or a
    diffusers pipeline folder (``unet/``, ``text_encoder/``, ``text_encoder_2/`` sub-folders)."""
    from lora_tools.tensorfile import read_safetensors_header

    if not base.exists():
        raise BaseModelError(f"{base}: --base not found")
    index = NameIndex(source=f"base model {base}")
    files: list[tuple[str | None, Path]] = []
    if base.is_file():
        files.append((None, base))
    else:
        files += [(None, p) for p in sorted(base.glob("*.safetensors"))]
        for component, folder in PIPELINE_FOLDERS.items():
            files += [(component, p) for p in sorted((base / folder).glob("*.safetensors"))]
    if not files:
        raise BaseModelError(f"{base}: no .safetensors weights here to read module names from (expected a "
                             "transformers model folder, a diffusers pipeline folder or a safetensors file)")
    for component, path in files:
        infos, _ = read_safetensors_header(path)
        index.add(component, [k[: -len(".weight")] for k in infos if k.endswith(".weight")])
    return index


def recorded_names(metadata: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """({kohya name: original name}, original format) that loratools recorded when it wrote a kohya file."""
    raw = metadata.get(META_NAMES)
    if not raw:
        return {}, None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        return {}, None
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        return {}, None
    return names, metadata.get(META_SOURCE_FORMAT)


def natural_sort(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
