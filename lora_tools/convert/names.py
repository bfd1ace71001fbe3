"""Module names across formats: one canonical form, (component, module path), and the three spellings of it.

* PEFT: the module path inside one model (``model.layers.0.self_attn.q_proj``, ``down_blocks.0...to_q``).
* diffusers: the path behind a component prefix (``unet.``, ``text_encoder.``, ``text_encoder_2.``). The reader
  names every module with its prefix (``canonical_diffusers_name``): the older attention-processor keys, which
  have none, are mapped to module paths and belong to the UNet, so old and new files name a layer alike.
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

from lora_tools.errors import BaseModelError, InvalidOptionError, ModuleMismatchError, UnsupportedAdapterError

# te3: Flux's T5-XXL text encoder (sd-scripts networks/lora_flux.py LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"; its
# CLIP-L is lora_te1), diffusers' text_encoder_2 of a Flux pipeline (SDXL's text_encoder_2 is CLIP-G: te2).
COMPONENTS = ("unet", "te", "te1", "te2", "te3", "transformer")
# kohya prefix of each component; the longest match wins when reading ("lora_te1_" before "lora_te_").
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_",
                "transformer": "lora_transformer_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2.",
                    "te3": "text_encoder_2.", "transformer": "transformer."}
# A T5 encoder's own layers (transformers T5EncoderModel: encoder.block.N.layer.M...), CLIP's start text_model.
T5_ROOT = "encoder.block."
# Every component prefix a diffusers LoRA file may use ("prior." is Würstchen / Stable Cascade's prior).
DIFFUSERS_COMPONENT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "prior.")
# Sub-folders of a diffusers pipeline folder, by component (for --base).
PIPELINE_FOLDERS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
                    "te3": "text_encoder_2", "transformer": "transformer"}

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


# ComfyUI's prefix of the denoiser's own layer names (Flux BFL, Wan): the kohya "unet" component.
COMFY_PREFIX = "diffusion_model."


def from_diffusers(name: str) -> Canonical:
    if name.startswith(COMFY_PREFIX):
        return Canonical("unet", name[len(COMFY_PREFIX):])
    for component in ("unet", "te2", "te", "transformer"):
        prefix = DIFFUSERS_PREFIX[component]
        if name.startswith(prefix):
            path = name[len(prefix):]
            return Canonical("te3" if component == "te2" and path.startswith(T5_ROOT) else component, path)
    # No component prefix: the attention-processor naming and early exports, all UNet.
    return Canonical(guess_component(name) or "unet", name)


def canonical_diffusers_name(name: str, component: str | None = None) -> str:
    """A diffusers module name with its component prefix: ``unet.<path>`` for the UNet whatever the file's naming.
    A name without a prefix gets ``component``'s (the reader knows the attention-processor naming is the UNet's)
    or the one its path shows (UNet blocks, ``text_model.``); other names stay as they are."""
    if name.startswith(DIFFUSERS_COMPONENT_PREFIXES):
        return name
    component = component or guess_component(name)
    return DIFFUSERS_PREFIX[component] + name if component else name


def from_peft(name: str, component: str | None) -> Canonical:
    return Canonical(component if component is not None else guess_component(name), name)


def split_kohya(name: str) -> tuple[str | None, str]:
    """(component, flattened rest) of a kohya module name."""
    for component, prefix in sorted(KOHYA_PREFIX.items(), key=lambda item: -len(item[1])):
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None, name[len("lora_"):] if name.startswith("lora_") else name


def to_kohya(canonical: Canonical, has_te2: bool) -> str:
    """``has_te2``: the adapter has a second text encoder (SDXL's te2 or Flux's T5 te3)."""
    component = canonical.component
    if component == "te" and has_te2:
        component = "te1"  # SDXL / Flux: two text encoders, kohya names the CLIP-L one te1
    prefix = KOHYA_PREFIX[component] if component else "lora_"
    return prefix + flatten(canonical.path)


def to_diffusers(canonical: Canonical) -> str:
    return (DIFFUSERS_PREFIX[canonical.component] if canonical.component else "") + canonical.path


def canonical_of(name: str, source_format: str) -> Canonical:
    """The canonical form of a PEFT or diffusers module name (kohya names need resolving: ``convert.run``)."""
    if source_format == "diffusers":
        return from_diffusers(name)
    if source_format == "peft":
        return from_peft(name, None)
    raise UnsupportedAdapterError(
        f"module {name}: {source_format} modules carry no layer path (a lora_diffusion file identifies them by "
        "order only), so they cannot be named in another format")


def kohya_names(names: Iterable[str], source_format: str) -> dict[str, str]:
    """Module name -> kohya name for an adapter in ``source_format``: ``lora_<component>_`` + the flattened path,
    the only spelling kohya's loaders (sd-scripts, ComfyUI, A1111) apply. kohya names stay as they are."""
    names = list(names)
    if source_format == "kohya":
        return {n: n for n in names}
    canonical = {n: canonical_of(n, source_format) for n in names}
    has_te2 = any(c.component in ("te2", "te3") for c in canonical.values())
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, found in canonical.items():
        flat = to_kohya(found, has_te2)
        if flat in seen:
            raise ModuleMismatchError(f"modules {seen[flat]} and {name} both become {flat} in kohya naming")
        seen[flat] = name
        mapping[name] = flat
    return mapping


def provenance_metadata(mapping: dict[str, str], source_format: str,
                        peft_config: dict | None = None) -> dict[str, str]:
    """Metadata that lets a kohya file written from another format convert back exactly without a base model:
    the original module names (kohya's are lossy) and, for PEFT input, its config."""
    metadata = {META_NAMES: json.dumps({out: name for name, out in mapping.items()}),
                META_SOURCE_FORMAT: source_format}
    if peft_config:
        metadata[META_PEFT_CONFIG] = json.dumps(peft_config)
    return metadata


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


def builtin_t5_modules() -> tuple[str, ...]:
    """The LoRA-able layers of a T5 v1.1 encoder up to 24 blocks (Flux's T5-XXL), transformers T5EncoderModel
    names: self-attention q/k/v/o and the gated feed-forward wi_0/wi_1/wo (what sd-scripts' lora_flux targets)."""
    names = []
    for i in range(24):
        names += [f"encoder.block.{i}.layer.0.SelfAttention.{p}" for p in "qkvo"]
        names += [f"encoder.block.{i}.layer.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo")]
    return tuple(names)


# --- resolving kohya names -----------------------------------------------------------------------------------


@dataclass
class NameIndex:
    """Flattened name -> real module paths, per component (None: a base model without components)."""

    by_component: dict[str | None, dict[str, set[str]]] = field(default_factory=dict)
    source: str = "built-in SD UNet / CLIP lists"  # also SDXL (sgm), Flux and Wan layer names

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
    from lora_tools.convert.image_models import original_paths, split_paths

    index = NameIndex()
    index.add("unet", builtin_unet_modules())
    index.add("unet", original_paths("unet"))  # sgm SDXL, BFL Flux and Wan names, as kohya/ComfyUI spell them
    index.add("transformer", builtin_unet_modules())
    index.add("transformer", split_paths("transformer"))
    for component in ("te", "te1", "te2"):
        index.add(component, builtin_clip_modules())
    index.add("te3", builtin_t5_modules())
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
