"""Our diffusers outputs loaded by diffusers itself into tiny Flux and Wan transformers: every adapted layer's ΔW
(PEFT's get_delta_weight after diffusers' loader) must equal the update we wrote, scales included.

Also the files diffusers writes: a pipeline's prefixed ``lora_adapter_metadata`` gives each module its scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.convert.run import convert
from lora_tools.formats import load_adapter, save_adapter

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-6


def kohya(path: Path, modules: dict[str, tuple[int, int, float | None]], rank: int = 4) -> Path:
    """{kohya name: (out, in, alpha or None)}."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def assert_loaded_updates(model: torch.nn.Module, ours: Path) -> None:
    adapter = load_adapter(ours)
    assert adapter.modules
    for name in adapter.modules:
        layer = model.get_submodule(name.removeprefix("transformer."))
        loaded = layer.get_delta_weight(layer.active_adapters[0]).detach().double()
        expected = adapter.delta_weight(name, torch.float64)
        assert float((loaded - expected).norm() / expected.norm()) < TOLERANCE, name


def test_flux_kohya_converted_to_diffusers_loads_exactly(tmp_path: Path) -> None:
    h = 16  # inner dim of the tiny model: 2 heads x 8
    source = kohya(tmp_path / "flux.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * h, h, 2.0),
        "lora_unet_double_blocks_0_txt_attn_proj": (h, h, 8.0),
        "lora_unet_single_blocks_0_linear1": (7 * h, h, 3.0),
        "lora_unet_final_layer_adaLN_modulation_1": (2 * h, h, None)})  # no alpha: scale 1 among others
    out = tmp_path / "diffusers.safetensors"
    convert(source, out, "diffusers")
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4))
    pipeline = diffusers.FluxPipeline
    state_dict, alphas, metadata = pipeline.lora_state_dict(str(out), return_alphas=True, return_lora_metadata=True)
    pipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=model, metadata=metadata)
    assert_loaded_updates(model, out)


@pytest.mark.parametrize("route", ["convert", "save_adapter"])
def test_wan_kohya_converted_to_diffusers_loads_exactly(tmp_path: Path, route: str) -> None:
    """diffusers' Wan loader ignores .alpha tensors: scales must reach it through lora_adapter_metadata, from
    convert and from the writer behind truncate/merge --to diffusers alike."""
    modules = {}
    for block, alpha in ((0, 8.0), (1, 2.0)):
        modules[f"lora_unet_blocks_{block}_self_attn_q"] = (16, 16, alpha)
        modules[f"lora_unet_blocks_{block}_cross_attn_o"] = (16, 16, alpha)
        modules[f"lora_unet_blocks_{block}_ffn_0"] = (32, 16, alpha)
        modules[f"lora_unet_blocks_{block}_ffn_2"] = (16, 32, None)
    source = kohya(tmp_path / "wan.safetensors", modules)
    out = tmp_path / "diffusers.safetensors"
    if route == "convert":
        convert(source, out, "diffusers")
    else:
        save_adapter(load_adapter(source), out, "diffusers")
    assert not any(k.endswith(".alpha") for k in load_file(str(out)))
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    state_dict, metadata = diffusers.WanPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    diffusers.WanPipeline.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)
    assert_loaded_updates(model, out)


def test_pipeline_metadata_with_component_prefixes_gives_the_scales(tmp_path: Path) -> None:
    """save_lora_weights packs each component's LoraConfig under its prefix ("transformer.lora_alpha"); reading
    that as no config at all gave every module scale 1."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for leaf, rank in (("to_q", 4), ("to_k", 2)):
        tensors[f"transformer.blocks.0.attn1.{leaf}.lora_A.weight"] = torch.randn(rank, 8, generator=gen)
        tensors[f"transformer.blocks.0.attn1.{leaf}.lora_B.weight"] = torch.randn(8, rank, generator=gen)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.rank_pattern": {"to_k": 2},
            "transformer.alpha_pattern": {"to_k": 6}}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    adapter = load_adapter(path)
    assert adapter.modules["transformer.blocks.0.attn1.to_q"].scale == 2.0
    assert adapter.modules["transformer.blocks.0.attn1.to_k"].scale == 3.0
    # written back in the same prefixed form, scales unchanged
    out = save_adapter(adapter, tmp_path / "again.safetensors")
    again = load_adapter(out)
    assert {n: m.scale for n, m in again.modules.items()} == {n: m.scale for n, m in adapter.modules.items()}
    with open(out, "rb") as handle:  # the metadata is prefixed again
        assert b"transformer.lora_alpha" in handle.read(4096)


def test_foreign_adapter_written_as_diffusers_has_an_alpha_on_every_module(tmp_path: Path) -> None:
    """diffusers gives a module without .alpha the file's most common alpha, not scale 1."""
    source = kohya(tmp_path / "sd.safetensors", {"lora_unet_down_blocks_0_resnets_0_time_emb_proj": (8, 16, 2.0),
                                                 "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8, None)})
    out = save_adapter(load_adapter(source), tmp_path / "d.safetensors", "diffusers")
    written = load_file(str(out))
    assert float(written["unet.down_blocks.0.attentions.0.proj_in.alpha"]) == 4.0  # = rank: scale 1
    assert float(written["unet.down_blocks.0.resnets.0.time_emb_proj.alpha"]) == 2.0


def test_writers_refuse_what_only_convert_can_split(tmp_path: Path) -> None:
    """truncate/merge --to rename tensors only: a Flux fused layer bound for diffusers naming is refused with a
    pointer to convert (before, the BFL path was written under a diffusers prefix no loader knows)."""
    from lora_tools.errors import UnsupportedAdapterError

    source = kohya(tmp_path / "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16, 4.0)})
    with pytest.raises(UnsupportedAdapterError, match="img_attn_qkv is split .* run `loratools convert --to peft`"):
        save_adapter(load_adapter(source), tmp_path / "peft", "peft")
