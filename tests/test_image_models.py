"""Image-model names (SDXL, Flux.1, Wan 2.x) against diffusers' own conversion functions, both directions.

Files are generated with each model's real layer names; widths are tiny except where diffusers hard-codes the
real ones (Flux single-block linear1: 3 x 3072 + 12288 rows, rank 2 keeps that small). Forward: our conversion
of a kohya/ComfyUI/XLabs file must give, layer by layer, the dense update diffusers' function gives. Backward: our
kohya output of a diffusers-named file, put through diffusers' function, must give back every input layer.
Updates are compared in low rank (linalg.products.relative_difference), never densified.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.convert.run import convert
from lora_tools.formats import load_adapter
from lora_tools.formats.diffusers import module_name_of
from lora_tools.linalg.products import relative_difference

conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")

TOLERANCE = 1e-6
FLUX_HIDDEN = 3072  # diffusers' kohya Flux converter splits linear1 at 3072 x 3 + 12288 rows


class Factory:
    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}

    def kohya(self, name: str, out: int, inp: int, rank: int, alpha: float | None = None,
              kernel: tuple[int, ...] = ()) -> None:
        self.tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, *kernel, generator=self.gen)
        self.tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, *((1,) * len(kernel)), generator=self.gen)
        if alpha is not None:
            self.tensors[f"{name}.alpha"] = torch.tensor(float(alpha))

    def peft_style(self, name: str, out: int, inp: int, rank: int, down: str = "lora_A", up: str = "lora_B") -> None:
        self.tensors[f"{name}.{down}.weight"] = torch.randn(rank, inp, generator=self.gen)
        self.tensors[f"{name}.{up}.weight"] = torch.randn(out, rank, generator=self.gen)

    def save(self, path: Path) -> Path:
        save_file(self.tensors, str(path))
        return path


def oracle_modules(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (B, A)} of a diffusers PEFT-style state dict (scales already baked in by diffusers)."""
    modules = {}
    for key, A in state_dict.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            B = state_dict[f"{name}.lora_B.weight"]
            if not name.startswith(("transformer.", "text_encoder")):
                name = "transformer." + name  # diffusers' Flux converter leaves Flux's outer layers unprefixed
            modules[name] = (B.reshape(B.shape[0], -1).double(), A.reshape(A.shape[0], -1).double())
    return modules


def assert_same_updates(ours: Path, expected: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        ignore_zero: bool = False) -> None:
    adapter = load_adapter(ours)
    names = set(adapter.modules)
    if ignore_zero:
        expected = {n: f for n, f in expected.items() if bool(f[0].any())}
    assert names == set(expected), (sorted(names ^ set(expected))[:6])
    for name, (B_ref, A_ref) in expected.items():
        B, A = adapter.factors(name, torch.float64)
        diff = relative_difference(adapter.modules[name].scale * B, A, B_ref, A_ref)
        assert diff < TOLERANCE, (name, diff)


# --- Flux.1 ----------------------------------------------------------------------------------------------------


def flux_kohya(path: Path) -> Path:
    """Double block 0 at hidden 16 (every layer), single blocks 0/1 at the real width; block-diagonal linear1 in
    single block 1 (a file that was once split), the final layer whose halves swap."""
    f, h = Factory(1), 16
    block = "lora_unet_double_blocks_0"
    f.kohya(f"{block}_img_attn_qkv", 3 * h, h, 4, alpha=2)
    f.kohya(f"{block}_txt_attn_qkv", 3 * h, h, 3, alpha=3)  # rank not divisible by 3 parts... 3 is: 1 each
    for leaf, out, inp in (("img_attn_proj", h, h), ("txt_attn_proj", h, h), ("img_mlp_0", 4 * h, h),
                           ("img_mlp_2", h, 4 * h), ("txt_mlp_0", 4 * h, h), ("txt_mlp_2", h, 4 * h),
                           ("img_mod_lin", 6 * h, h), ("txt_mod_lin", 6 * h, h)):
        f.kohya(f"{block}_{leaf}", out, inp, 4, alpha=8)
    big = FLUX_HIDDEN
    f.kohya("lora_unet_single_blocks_0_linear1", 7 * big, big, 2, alpha=1)
    f.kohya("lora_unet_single_blocks_0_linear2", big, 5 * big, 2, alpha=1)
    f.kohya("lora_unet_single_blocks_0_modulation_lin", 3 * h, h, 4, alpha=4)
    # block-diagonal linear1, rank 4 = one column per part
    down = torch.randn(4, big, generator=f.gen)
    up = torch.zeros(7 * big, 4)
    for i, (a, b) in enumerate(((0, big), (big, 2 * big), (2 * big, 3 * big), (3 * big, 7 * big))):
        up[a:b, i] = torch.randn(b - a, generator=f.gen)
    f.tensors["lora_unet_single_blocks_1_linear1.lora_down.weight"] = down
    f.tensors["lora_unet_single_blocks_1_linear1.lora_up.weight"] = up
    f.tensors["lora_unet_single_blocks_1_linear1.alpha"] = torch.tensor(2.0)
    f.kohya("lora_unet_final_layer_adaLN_modulation_1", 2 * h, h, 4, alpha=4)
    f.kohya("lora_unet_final_layer_linear", 64, h, 4, alpha=4)
    f.kohya("lora_unet_img_in", h, 64, 4, alpha=4)
    f.kohya("lora_unet_txt_in", h, 32, 4, alpha=4)
    f.kohya("lora_unet_time_in_in_layer", h, 256, 4, alpha=4)
    f.kohya("lora_unet_vector_in_out_layer", h, h, 4, alpha=4)
    return f.save(path)


def test_flux_kohya_to_diffusers_matches_diffusers(tmp_path: Path) -> None:
    source = flux_kohya(tmp_path / "flux_kohya.safetensors")
    out = tmp_path / "ours.safetensors"
    report = convert(source, out, "diffusers")
    expected = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(load_file(str(source))))
    assert_same_updates(out, expected)
    ours = load_adapter(out)
    # the block-diagonal linear1 split its A: rank 1 per part, not 4
    assert ours.modules["transformer.single_transformer_blocks.1.attn.to_q"].rank == 1
    assert ours.modules["transformer.single_transformer_blocks.0.attn.to_q"].rank == 2
    assert report["max_rel_difference"] < TOLERANCE


def test_flux_kohya_to_peft_and_back_to_kohya(tmp_path: Path) -> None:
    source = flux_kohya(tmp_path / "flux_kohya.safetensors")
    convert(source, tmp_path / "peft", "peft")
    back = tmp_path / "back.safetensors"
    convert(tmp_path / "peft", back, "kohya")
    # both kohya files give diffusers the same updates
    expected = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(load_file(str(source))))
    again = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(load_file(str(back))))
    assert set(again) == set(expected)
    for name, (B_ref, A_ref) in expected.items():
        assert relative_difference(*again[name], B_ref, A_ref) < TOLERANCE, name


def flux_diffusers(path: Path) -> Path:
    """Split (diffusers/ai-toolkit) naming: every projection of double block 0 (hidden 16, q/k/v of different
    ranks), single block 0 at the real width."""
    f, h = Factory(2), 16
    block = "transformer.transformer_blocks.0"
    for leaf, rank in (("attn.to_q", 4), ("attn.to_k", 2), ("attn.to_v", 4), ("attn.add_q_proj", 4),
                       ("attn.add_k_proj", 4), ("attn.add_v_proj", 4)):
        f.peft_style(f"{block}.{leaf}", h, h, rank)
    for leaf, out, inp in (("attn.to_out.0", h, h), ("attn.to_add_out", h, h), ("ff.net.0.proj", 4 * h, h),
                           ("ff.net.2", h, 4 * h), ("norm1.linear", 6 * h, h), ("norm1_context.linear", 6 * h, h)):
        f.peft_style(f"{block}.{leaf}", out, inp, 4)
    big = FLUX_HIDDEN
    single = "transformer.single_transformer_blocks.0"
    for leaf, out in (("attn.to_q", big), ("attn.to_k", big), ("attn.to_v", big), ("proj_mlp", 4 * big)):
        f.peft_style(f"{single}.{leaf}", out, big, 2)
    f.peft_style(f"{single}.proj_out", big, 5 * big, 2)
    f.peft_style("transformer.norm_out.linear", 2 * h, h, 4)
    f.peft_style("transformer.proj_out", 64, h, 4)
    return f.save(path)


def test_flux_diffusers_to_kohya_loads_back_in_diffusers(tmp_path: Path) -> None:
    source = flux_diffusers(tmp_path / "flux_diffusers.safetensors")
    out = tmp_path / "kohya.safetensors"
    report = convert(source, out, "kohya")
    kohya = load_file(str(out))
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (10, 16)  # 4 + 2 + 4
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * FLUX_HIDDEN, 8)
    assert report["max_rel_difference"] < TOLERANCE
    expected = oracle_modules(load_file(str(source)))
    got = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(copy.copy(kohya)))
    assert set(got) == set(expected)
    for name, (B_ref, A_ref) in expected.items():
        assert relative_difference(*got[name], B_ref, A_ref) < TOLERANCE, name


@pytest.mark.parametrize("down", ["lora_down", "lora_A"])
def test_comfyui_flux_names_convert_like_kohya(tmp_path: Path, down: str) -> None:
    """ComfyUI's diffusion_model.<BFL layer> names (its LoRA extract writes lora_down/lora_up, other exports
    lora_A/lora_B): the same layers as kohya's lora_unet_ names."""
    f, h = Factory(3), 16
    up = "lora_up" if down == "lora_down" else "lora_B"
    f.peft_style("diffusion_model.double_blocks.0.img_attn.qkv", 3 * h, h, 4, down, up)
    f.peft_style("diffusion_model.double_blocks.0.img_attn.proj", h, h, 4, down, up)
    source = f.save(tmp_path / "comfy.safetensors")
    out = tmp_path / "ours.safetensors"
    convert(source, out, "diffusers")
    # diffusers reads ComfyUI's lora_down/lora_up spelling; the lora_A one holds the same tensors
    as_comfy = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
                for k, v in load_file(str(source)).items()}
    expected = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(as_comfy))
    assert_same_updates(out, expected)


def xlabs_file(path: Path) -> Path:
    f, h = Factory(4), 16
    for stream in ("1", "2"):
        for proj, out in (("qkv", 3 * h), ("proj", h)):
            name = f"double_blocks.0.processor.{proj}_lora{stream}"
            f.tensors[f"{name}.down.weight"] = torch.randn(4, h, generator=f.gen)
            f.tensors[f"{name}.up.weight"] = torch.randn(out, 4, generator=f.gen)
    big = FLUX_HIDDEN  # diffusers splits our kohya linear1 at the real widths
    f.tensors["single_blocks.0.processor.qkv_lora.down.weight"] = torch.randn(2, big, generator=f.gen)
    f.tensors["single_blocks.0.processor.qkv_lora.up.weight"] = torch.randn(3 * big, 2, generator=f.gen)
    f.tensors["single_blocks.0.processor.proj_lora.down.weight"] = torch.randn(2, 5 * big, generator=f.gen)
    f.tensors["single_blocks.0.processor.proj_lora.up.weight"] = torch.randn(big, 2, generator=f.gen)
    return f.save(path)


def test_xlabs_to_diffusers_matches_diffusers(tmp_path: Path) -> None:
    source = xlabs_file(tmp_path / "xlabs.safetensors")
    out = tmp_path / "ours.safetensors"
    convert(source, out, "diffusers")
    expected = oracle_modules(conversion._convert_xlabs_flux_lora_to_diffusers(load_file(str(source))))
    assert_same_updates(out, expected)


def test_xlabs_to_kohya_needs_allow_partial_for_the_single_block_mlp(tmp_path: Path) -> None:
    from lora_tools.errors import ModuleMismatchError

    source = xlabs_file(tmp_path / "xlabs.safetensors")
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(ModuleMismatchError, match="single_blocks.0.linear1 .*proj_mlp.*--allow-partial"):
        convert(source, out, "kohya")
    assert not out.exists()
    report = convert(source, out, "kohya", allow_partial=True)
    assert any("zero rows" in w for w in report["warnings"])
    kohya = load_file(str(out))
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 16)  # a rename
    # diffusers reads our kohya file as the XLabs layers, and zero for the MLP input the XLabs file never had
    expected = oracle_modules(conversion._convert_xlabs_flux_lora_to_diffusers(load_file(str(source))))
    got = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(kohya))
    for name, (B_ref, A_ref) in expected.items():
        assert relative_difference(*got[name], B_ref, A_ref) < TOLERANCE, name
    mlp_B, _ = got["transformer.single_transformer_blocks.0.proj_mlp"]
    assert not bool(mlp_B.any())


# --- SDXL ------------------------------------------------------------------------------------------------------

SDXL_KOHYA = {  # sgm name: (out, in, kernel)
    "input_blocks_0_0": (8, 4, (3, 3)),
    "input_blocks_1_0_in_layers_2": (8, 8, (3, 3)),
    "input_blocks_1_0_emb_layers_1": (8, 16, ()),
    "input_blocks_3_0_op": (8, 8, (3, 3)),
    "input_blocks_4_0_skip_connection": (16, 8, (1, 1)),
    "input_blocks_4_1_proj_in": (16, 16, ()),
    "input_blocks_4_1_transformer_blocks_1_attn1_to_q": (16, 16, ()),
    "input_blocks_5_1_transformer_blocks_0_attn2_to_k": (16, 2048, ()),
    "input_blocks_5_1_transformer_blocks_0_attn2_to_out_0": (16, 16, ()),
    "input_blocks_7_1_transformer_blocks_9_ff_net_0_proj": (64, 16, ()),
    "input_blocks_8_0_out_layers_3": (16, 16, (3, 3)),
    "middle_block_1_transformer_blocks_3_ff_net_2": (16, 32, ()),
    "middle_block_2_in_layers_2": (16, 16, (3, 3)),
    "output_blocks_0_1_transformer_blocks_9_attn1_to_v": (16, 16, ()),
    "output_blocks_2_2_conv": (16, 16, (3, 3)),
    "output_blocks_4_1_proj_out": (16, 16, ()),
    "output_blocks_5_2_conv": (16, 16, (3, 3)),
    "output_blocks_8_0_skip_connection": (8, 16, (1, 1)),
    "time_embed_0": (16, 8, ()),
    "label_emb_0_2": (16, 16, ()),
    "out_2": (4, 8, (3, 3)),
}


def sdxl_kohya(path: Path) -> Path:
    f = Factory(5)
    for i, (name, (out, inp, kernel)) in enumerate(SDXL_KOHYA.items()):
        f.kohya(f"lora_unet_{name}", out, inp, 2 + i % 3, alpha=1 + i % 4, kernel=kernel)
    f.kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 8, 2, alpha=1)
    f.kohya("lora_te2_text_model_encoder_layers_31_mlp_fc1", 32, 8, 2, alpha=2)
    return f.save(path)


def sdxl_oracle(kohya: dict[str, torch.Tensor], tmp_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers' SDXL path (sgm blocks remapped, then its non-diffusers converter) read with our diffusers reader
    for the names, scales from the kohya alphas: {diffusers module: (scale·B, A)}."""

    class UNetConfig:  # SDXL's UNet2DConditionModel config: the only field the sgm remap reads
        layers_per_block = 2

    state_dict = conversion._maybe_map_sgm_blocks_to_diffusers(dict(kohya), UNetConfig())
    converted, alphas = conversion._convert_non_diffusers_lora_to_diffusers(state_dict)
    path = save_and_read = tmp_path / "oracle.safetensors"
    save_file(converted, str(save_and_read))
    adapter = load_adapter(path)
    # diffusers names an alpha after the module, or after its down key where the module name has no ".lora."
    by_module = {}
    for key, value in alphas.items():
        found = module_name_of(key[: -len(".alpha")])
        by_module[found[0] if found else key[: -len(".alpha")]] = value
    result = {}
    for name in adapter.modules:
        B, A = adapter.factors(name, torch.float64)
        scale = by_module[name] / A.shape[0] if name in by_module else 1.0
        result[name] = (scale * B, A)
    return result


def test_sdxl_kohya_to_diffusers_matches_diffusers(tmp_path: Path) -> None:
    source = sdxl_kohya(tmp_path / "sdxl.safetensors")
    out = tmp_path / "ours.safetensors"
    convert(source, out, "diffusers")
    expected = sdxl_oracle(load_file(str(source)), tmp_path)
    assert_same_updates(out, expected)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q" in expected
    assert "unet.up_blocks.1.upsamplers.0.conv" in expected


def test_sdxl_diffusers_to_kohya_writes_sgm_names_diffusers_reads_back(tmp_path: Path) -> None:
    source = sdxl_kohya(tmp_path / "sdxl.safetensors")
    convert(source, tmp_path / "diffusers.safetensors", "diffusers")
    back = tmp_path / "back.safetensors"
    convert(tmp_path / "diffusers.safetensors", back, "kohya")
    kohya_keys = {k for k in load_file(str(back)) if k.endswith(".lora_down.weight")}
    assert kohya_keys == {k for k in load_file(str(source)) if k.endswith(".lora_down.weight")}
    assert_same_updates(tmp_path / "diffusers.safetensors", sdxl_oracle(load_file(str(back)), tmp_path))


@pytest.mark.parametrize("command", ["truncate", "merge"])
def test_sdxl_truncate_and_merge_to_kohya_write_convert_names(tmp_path: Path, command: str) -> None:
    """truncate/merge --to kohya of a diffusers SDXL file write convert's sgm names (lora_unet_input_blocks_*,
    lora_te1_/lora_te2_), not the flattened diffusers paths (lora_unet_down_blocks_*, which kohya loaders skip),
    and diffusers' own converter reads every layer back (full-rank truncate and a 0.5/0.5 merge keep each ΔW)."""
    from tests.helpers import run_cli

    source = sdxl_kohya(tmp_path / "sdxl.safetensors")
    diffusers_file = tmp_path / "diffusers.safetensors"
    convert(source, diffusers_file, "diffusers")
    out = tmp_path / f"{command}.safetensors"
    inputs = ["--rank", "4"] if command == "truncate" else [str(diffusers_file), "--weights", "0.5,0.5"]
    result = run_cli(command, str(diffusers_file), *inputs, "-o", str(out), "--to", "kohya")
    assert result.exit_code == 0, result.output
    written = {k for k in load_file(str(out)) if k.endswith(".lora_down.weight")}
    assert written == {k for k in load_file(str(source)) if k.endswith(".lora_down.weight")}
    assert_same_updates(diffusers_file, sdxl_oracle(load_file(str(out)), tmp_path))


# --- Wan 2.x ---------------------------------------------------------------------------------------------------

WAN_LAYERS = [*(f"self_attn.{o}" for o in "qkvo"), *(f"cross_attn.{o}" for o in "qkvo"), "cross_attn.k_img",
              "cross_attn.v_img", "ffn.0", "ffn.2"]


def wan_comfy(path: Path) -> Path:
    f, dim = Factory(6), 8
    for block in range(2):
        for leaf in WAN_LAYERS:
            out, inp = {"ffn.0": (4 * dim, dim), "ffn.2": (dim, 4 * dim)}.get(leaf, (dim, dim))
            f.peft_style(f"diffusion_model.blocks.{block}.{leaf}", out, inp, 2)
    f.peft_style("diffusion_model.head.head", 16, dim, 2)
    f.peft_style("diffusion_model.text_embedding.0", dim, 12, 2)
    f.peft_style("diffusion_model.time_projection.1", 6 * dim, dim, 2)
    return f.save(path)


def test_wan_comfyui_to_diffusers_matches_diffusers(tmp_path: Path) -> None:
    source = wan_comfy(tmp_path / "wan.safetensors")
    out = tmp_path / "ours.safetensors"
    convert(source, out, "diffusers")
    expected = oracle_modules(conversion._convert_non_diffusers_wan_lora_to_diffusers(load_file(str(source))))
    assert_same_updates(out, expected)


def test_wan_diffusers_to_kohya_is_musubi_naming_diffusers_reads_back(tmp_path: Path) -> None:
    f, dim = Factory(7), 8
    for block in range(2):
        for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
            out, inp = {"ffn.net.0.proj": (4 * dim, dim), "ffn.net.2": (dim, 4 * dim)}.get(leaf, (dim, dim))
            f.peft_style(f"transformer.blocks.{block}.{leaf}", out, inp, 4)
    source = f.save(tmp_path / "wan_diffusers.safetensors")
    out = tmp_path / "kohya.safetensors"
    convert(source, out, "kohya")
    kohya = load_file(str(out))
    assert "lora_unet_blocks_1_cross_attn_o.lora_down.weight" in kohya
    got = oracle_modules(conversion._convert_musubi_wan_lora_to_diffusers(dict(kohya)))
    expected = oracle_modules(load_file(str(source)))
    assert set(got) == set(expected)
    for name, (B_ref, A_ref) in expected.items():
        assert relative_difference(*got[name], B_ref, A_ref) < TOLERANCE, name


def test_kohya_names_of_diffusers_layers_match_diffusers(tmp_path: Path) -> None:
    """Kohya files that flatten diffusers' layer names (lora_transformer_..., diffusers' 'mixture' format)."""
    f, h = Factory(8), 16
    for leaf, out, inp in (("transformer_blocks_0_attn_to_q", h, h), ("transformer_blocks_0_attn_to_k", h, h),
                           ("transformer_blocks_0_attn_to_v", h, h), ("transformer_blocks_0_attn_to_out_0", h, h),
                           ("single_transformer_blocks_2_attn_to_q", h, h)):  # the layers diffusers maps there
        f.kohya(f"lora_transformer_{leaf}", out, inp, 4, alpha=2)
    source = f.save(tmp_path / "mixture.safetensors")
    out = tmp_path / "ours.safetensors"
    convert(source, out, "diffusers")
    expected = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(load_file(str(source))))
    assert_same_updates(out, expected)
