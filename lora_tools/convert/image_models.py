"""Layer tables of the image models whose LoRA files travel under two namings: SDXL, Flux.1 and Wan 2.x.

Each model has a *split* naming, diffusers' module paths (one layer per projection), and one or more *original*
namings: the model's reference code, which kohya/ComfyUI files use (SDXL's sgm UNet, Black Forest Labs' Flux,
Wan's own model), and XLabs' Flux processor names. Every layer of an original naming is an ordered list of
diffusers layers ("atoms") whose outputs it stacks by rows: ``single_blocks.N.linear1`` is q, k, v and the MLP
input. The row count of each atom is a multiple of the fused layer's input width (Flux: hidden, or 4·hidden for
the MLP, FluxParams.mlp_ratio = 4), so tiny test models and the real one share one table.

Sources of the tables (facts only, no code copied):
* SDXL: diffusers ``UNet2DConditionModel`` with SDXL's config (block_out_channels 320/640/1280, layers_per_block 2,
  transformer_layers_per_block 1/2/10, DownBlock2D first, UpBlock2D last) against Stability AI's sgm
  ``openaimodel.UNetModel`` (input_blocks / middle_block / output_blocks; ResBlock in_layers.2, emb_layers.1,
  out_layers.3, skip_connection; Downsample ``op``, Upsample ``conv``; time_embed, label_emb, out.2).
* Flux.1: black-forest-labs/flux ``model.Flux`` and ``modules/layers.py`` (DoubleStreamBlock img_mod.lin,
  img_attn.qkv, img_attn.proj, img_mlp.0/2 and txt_*; SingleStreamBlock linear1 = 3·hidden + mlp, linear2,
  modulation.lin; img_in, txt_in, time_in, vector_in, guidance_in, final_layer), 19 double and 38 single blocks,
  against diffusers ``FluxTransformer2DModel`` (transformer_blocks / single_transformer_blocks). diffusers'
  ``AdaLayerNormContinuous`` (norm_out) orders its output (scale, shift) where BFL's final_layer.adaLN_modulation
  gives (shift, scale): the two halves of B's rows swap.
* XLabs-AI/x-flux ``DoubleStreamBlockLoraProcessor`` (qkv_lora1/proj_lora1 on the image stream, qkv_lora2/
  proj_lora2 on the text stream) and ``SingleStreamBlockLoraProcessor`` (qkv_lora: q, k, v only; proj_lora on
  linear2's 15360 = 3072 + 12288 inputs).
* Wan 2.x: Wan-Video/Wan2.1 ``modules/model.py`` WanModel (blocks.N.self_attn.q/k/v/o, cross_attn.q/k/v/o and
  k_img/v_img for i2v, ffn.0/2, text_embedding.0/2, time_embedding.0/2, time_projection.1, head.head,
  img_emb.proj.1/3) against diffusers ``WanTransformer3DModel`` (attn1, attn2, add_k_proj/add_v_proj, ffn.net,
  condition_embedder, proj_out); no fused layers, 40 blocks at most (14B).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Layer:
    """One layer of an original naming: the diffusers layers it stacks, in row order."""

    path: str
    atoms: tuple[str, ...]
    widths: tuple[int, ...] = ()  # rows of each atom = width · in_features; () when not fused
    swap_halves: bool = False  # B's row halves swap between the namings (Flux final_layer / norm_out)

    @property
    def fused(self) -> bool:
        return len(self.atoms) > 1


@dataclass(frozen=True, eq=False)  # hashed by identity (lru_cache); the tables are dicts
class Family:
    """One model: its original namings (name -> path -> Layer) over diffusers' split layers."""

    name: str
    namings: dict[str, dict[str, Layer]]
    diffusers_paths: frozenset[str]
    kohya_naming: str  # the original naming kohya/ComfyUI files use
    split_component: str  # diffusers component prefix: unet or transformer

    def layer(self, naming: str, path: str) -> Layer:
        if naming == "diffusers":
            return Layer(path, (path,))
        return self.namings[naming][path]

    @property
    def atom_owner(self) -> dict[str, Layer]:
        """diffusers path -> the kohya-naming layer holding it."""
        return _atom_owner(self)


@lru_cache(maxsize=8)
def _atom_owner(family: Family) -> dict[str, Layer]:
    return {atom: layer for layer in family.namings[family.kohya_naming].values() for atom in layer.atoms}


# --- SDXL ------------------------------------------------------------------------------------------------------

_RESNET = (("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"), ("conv2", "out_layers.3"),
           ("conv_shortcut", "skip_connection"))


def _attention(diff: str, sgm: str, blocks: int) -> list[tuple[str, str]]:
    pairs = [(f"{diff}.proj_in", f"{sgm}.proj_in"), (f"{diff}.proj_out", f"{sgm}.proj_out")]
    for t in range(blocks):
        leaves = [f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
        leaves += ["ff.net.0.proj", "ff.net.2"]
        pairs += [(f"{diff}.transformer_blocks.{t}.{leaf}", f"{sgm}.transformer_blocks.{t}.{leaf}")
                  for leaf in leaves]
    return pairs


def _resnet(diff: str, sgm: str) -> list[tuple[str, str]]:
    return [(f"{diff}.{d}", f"{sgm}.{s}") for d, s in _RESNET]


@lru_cache(maxsize=1)
def sdxl_pairs() -> tuple[tuple[str, str], ...]:
    """(diffusers path, sgm path) of every LoRA-able layer of the SDXL UNet."""
    pairs = [("conv_in", "input_blocks.0.0"), ("conv_out", "out.2"), ("time_embedding.linear_1", "time_embed.0"),
             ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
             ("add_embedding.linear_2", "label_emb.0.2")]
    down_transformers = (0, 2, 10)  # per down block; block 0 is a DownBlock2D without attention
    for b, blocks in enumerate(down_transformers):
        for layer in range(2):
            sgm = f"input_blocks.{3 * b + layer + 1}"
            pairs += _resnet(f"down_blocks.{b}.resnets.{layer}", f"{sgm}.0")
            if blocks:
                pairs += _attention(f"down_blocks.{b}.attentions.{layer}", f"{sgm}.1", blocks)
        if b < 2:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{3 * b + 3}.0.op"))
    pairs += _resnet("mid_block.resnets.0", "middle_block.0")
    pairs += _attention("mid_block.attentions.0", "middle_block.1", 10)
    pairs += _resnet("mid_block.resnets.1", "middle_block.2")
    up_transformers = (10, 2, 0)
    for b, blocks in enumerate(up_transformers):
        for layer in range(3):
            sgm = f"output_blocks.{3 * b + layer}"
            pairs += _resnet(f"up_blocks.{b}.resnets.{layer}", f"{sgm}.0")
            if blocks:
                pairs += _attention(f"up_blocks.{b}.attentions.{layer}", f"{sgm}.1", blocks)
        if b < 2:
            pairs.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{3 * b + 2}.2.conv"))
    return tuple(pairs)


# --- Flux.1 ----------------------------------------------------------------------------------------------------

FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
FLUX_MLP_RATIO = 4  # FluxParams.mlp_ratio


def _flux_layers() -> tuple[dict[str, Layer], dict[str, Layer]]:
    bfl: dict[str, Layer] = {}
    xlabs: dict[str, Layer] = {}

    def add(table: dict[str, Layer], path: str, atoms: Iterable[str], widths: tuple[int, ...] = (),
            swap: bool = False) -> None:
        table[path] = Layer(path, tuple(atoms), widths, swap)

    for i in range(FLUX_DOUBLE_BLOCKS):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        img_qkv = [f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v"]
        txt_qkv = [f"{dst}.attn.add_q_proj", f"{dst}.attn.add_k_proj", f"{dst}.attn.add_v_proj"]
        add(bfl, f"{src}.img_attn.qkv", img_qkv, (1, 1, 1))
        add(bfl, f"{src}.txt_attn.qkv", txt_qkv, (1, 1, 1))
        for original, split in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                                ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                                ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
            add(bfl, f"{src}.{original}", [f"{dst}.{split}"])
        add(xlabs, f"{src}.processor.qkv_lora1", img_qkv, (1, 1, 1))
        add(xlabs, f"{src}.processor.qkv_lora2", txt_qkv, (1, 1, 1))
        add(xlabs, f"{src}.processor.proj_lora1", [f"{dst}.attn.to_out.0"])
        add(xlabs, f"{src}.processor.proj_lora2", [f"{dst}.attn.to_add_out"])
    for i in range(FLUX_SINGLE_BLOCKS):
        src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv = [f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v"]
        add(bfl, f"{src}.linear1", [*qkv, f"{dst}.proj_mlp"], (1, 1, 1, FLUX_MLP_RATIO))
        add(bfl, f"{src}.linear2", [f"{dst}.proj_out"])
        add(bfl, f"{src}.modulation.lin", [f"{dst}.norm.linear"])
        add(xlabs, f"{src}.processor.qkv_lora", qkv, (1, 1, 1))
        add(xlabs, f"{src}.processor.proj_lora", [f"{dst}.proj_out"])
    for original, split in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                            ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                            ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                            ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                            ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
                            ("final_layer.linear", "proj_out")):
        add(bfl, original, [split])
    add(bfl, "final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True)
    return bfl, xlabs


# --- Wan 2.x ---------------------------------------------------------------------------------------------------

WAN_MAX_BLOCKS = 40


def _wan_layers() -> dict[str, Layer]:
    table: dict[str, Layer] = {}
    for i in range(WAN_MAX_BLOCKS):
        pairs = [(f"self_attn.{o}", f"attn1.{c}") for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)]
        pairs += [(f"cross_attn.{o}", f"attn2.{c}") for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)]
        pairs += [("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
                  ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]
        for original, split in pairs:
            table[f"blocks.{i}.{original}"] = Layer(f"blocks.{i}.{original}", (f"blocks.{i}.{split}",))
    for original, split in (("patch_embedding", "patch_embedding"),
                            ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
                            ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
                            ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
                            ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
                            ("time_projection.1", "condition_embedder.time_proj"), ("head.head", "proj_out"),
                            ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
                            ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2")):
        table[original] = Layer(original, (split,))
    return table


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    sgm = {s: Layer(s, (d,)) for d, s in sdxl_pairs()}
    bfl, xlabs = _flux_layers()
    wan = _wan_layers()

    def split_paths(*tables: dict[str, Layer]) -> frozenset[str]:
        return frozenset(atom for table in tables for layer in table.values() for atom in layer.atoms)

    return (Family("sdxl", {"sgm": sgm}, split_paths(sgm), "sgm", "unet"),
            Family("flux", {"bfl": bfl, "xlabs": xlabs}, split_paths(bfl, xlabs), "bfl", "transformer"),
            Family("wan", {"wan": wan}, split_paths(wan), "wan", "transformer"))


def family_named(name: str) -> Family:
    return next(f for f in families() if f.name == name)


def find_layer(path: str) -> tuple[Family, str] | None:
    """(family, naming) of an original-naming path (sgm, BFL, XLabs, Wan), or None."""
    for family in families():
        for naming, table in family.namings.items():
            if path in table:
                return family, naming
    return None


def original_paths(component: str) -> list[str]:
    """Original-naming paths kohya files may flatten under ``lora_<component>_`` (for resolving kohya names)."""
    if component != "unet":
        return []
    return [path for family in families() for path in family.namings[family.kohya_naming]]


def split_paths(component: str) -> list[str]:
    """diffusers paths of the transformer models (``lora_transformer_`` kohya names of diffusers layers)."""
    if component != "transformer":
        return []
    return sorted(family_named("flux").diffusers_paths | family_named("wan").diffusers_paths)
