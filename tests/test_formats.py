"""kohya and diffusers readers on files built in code, and format detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_tools.errors import AdapterFormatError, LoraToolsError, UnsupportedAdapterError
from lora_tools.formats import detect, load_adapter


def factors(out: int, inp: int, rank: int, seed: int = 0, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if conv:
        return (torch.randn(rank, inp, 3, 3, generator=gen), torch.randn(out, rank, 1, 1, generator=gen))
    return torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)


def test_kohya_alpha_conv_dora_and_metadata(tmp_path: Path) -> None:
    down, up = factors(32, 16, 4)
    cdown, cup = factors(8, 4, 2, conv=True)
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": up,
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0, dtype=torch.float16),
        "lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.ones(1, 16),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": cdown,
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": cup,
    }
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "2",
                                            "ss_sd_model_name": "sd15.safetensors"})
    assert detect(path) == "kohya"
    adapter = load_adapter(path)
    linear = adapter.modules["lora_unet_mid_block_attentions_0_proj_in"]
    assert (linear.rank, linear.alpha, linear.scale, linear.kind) == (4, 2.0, 0.5, "linear")
    assert "dora" in linear.flags
    conv = adapter.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv.kind, conv.alpha, conv.scale, conv.weight_shape) == ("conv", 2.0, 1.0, (8, 4, 3, 3))
    expected = (cup.flatten(1) @ cdown.flatten(1)).reshape(8, 4, 3, 3)
    torch.testing.assert_close(adapter.delta_weight(conv.name), expected)
    assert adapter.base_model == "sd15.safetensors"
    assert any("no .alpha" in w for w in adapter.warnings)


def test_kohya_alpha_without_up_is_an_error(tmp_path: Path) -> None:
    down, _ = factors(8, 8, 2)
    path = tmp_path / "k.safetensors"
    save_file({"lora_te_x.lora_down.weight": down, "lora_te_x.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(LoraToolsError, match="lora_te_x has a LoRA down factor but no up factor"):
        load_adapter(path)


def test_diffusers_processor_and_text_encoder_namings(tmp_path: Path) -> None:
    down, up = factors(320, 320, 4)
    tdown, tup = factors(768, 768, 8, seed=1)
    tensors = {
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": tdown,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": tup,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    assert detect(tmp_path) == "diffusers"
    adapter = load_adapter(tmp_path)
    assert set(adapter.modules) == {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                                    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    te = adapter.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert (te.rank, te.alpha, te.scale) == (8, 4.0, 0.5)


def test_diffusers_two_namings_for_one_module_is_an_error(tmp_path: Path) -> None:
    down, up = factors(8, 8, 2)
    tensors = {"blk.processor.to_q_lora.down.weight": down, "blk.processor.to_q_lora.up.weight": up,
               "blk.to_q.lora.down.weight": down.clone(), "blk.to_q.lora.up.weight": up.clone()}
    path = tmp_path / "dup.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(AdapterFormatError, match="two naming schemes"):
        load_adapter(path)


def test_diffusers_peft_style_with_adapter_metadata(tmp_path: Path) -> None:
    down, up = factors(64, 32, 4)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": False})}
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": down,
               "transformer.blocks.0.attn.to_q.lora_B.weight": up}, str(path), metadata=meta)
    adapter = load_adapter(path)
    assert adapter.format == "diffusers"
    assert adapter.modules["transformer.blocks.0.attn.to_q"].scale == 2.0


# LoHa, LoKr, LoCon-Tucker, full diffs and AdaLoRA are read now (tests/test_lycoris.py, tests/test_adalora.py);
# a lone lora_E outside a PEFT AdaLoRA folder is still refused (its scale lives in the config).
@pytest.mark.parametrize(("key", "kind"), [
    ("base_model.model.x.ia3_l", "IA3"), ("lora_unet_x.on_input", "IA3"), ("base_model.model.x.lora_E", "AdaLoRA"),
    ("base_model.model.x.oft_r", "OFT"), ("base_model.model.x.boft_R", "BOFT"),
    ("base_model.model.x.vera_lambda_b", "VeRA"), ("base_model.model.x.glora_A", "GLoRA"),
    ("lora_unet_x.a1.weight", "GLoRA"), ("base_model.model.x.unilora_theta_d", "UniLoRA"),
])
def test_non_lora_kinds_are_refused(tmp_path: Path, key: str, kind: str) -> None:
    path = tmp_path / "other.safetensors"
    save_file({key: torch.ones(2, 2)}, str(path))
    with pytest.raises(UnsupportedAdapterError, match=kind):
        load_adapter(path)


def test_format_override_and_unknown_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"some.weight": torch.ones(2, 2)}, str(path))
    with pytest.raises(AdapterFormatError, match="not a recognised LoRA adapter"):
        load_adapter(path)
    down, up = factors(8, 8, 2)
    save_file({"lora_te_a.lora_down.weight": down, "lora_te_a.lora_up.weight": up}, str(path))
    assert load_adapter(path, format="kohya").format == "kohya"


def test_peft_weights_without_config_warn_and_assume_unit_scale(tmp_path: Path) -> None:
    down, up = factors(8, 8, 2)
    path = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.q.lora_A.weight": down, "base_model.model.q.lora_B.weight": up}, str(path))
    adapter = load_adapter(path)
    assert adapter.modules["q"].scale == 1.0
    assert any("no adapter_config.json" in w for w in adapter.warnings)


def test_paths_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    down, up = factors(8, 8, 2)
    folder = tmp_path / "my adaptér ✓"
    folder.mkdir()
    save_file({"lora_te_a.lora_down.weight": down, "lora_te_a.lora_up.weight": up}, str(folder / "ü.safetensors"))
    assert len(load_adapter(folder).modules) == 1


def test_symlinked_input(tmp_path: Path) -> None:
    down, up = factors(8, 8, 2)
    real = tmp_path / "real.safetensors"
    save_file({"lora_te_a.lora_down.weight": down, "lora_te_a.lora_up.weight": up}, str(real))
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert load_adapter(link).modules["lora_te_a"].rank == 2


def test_peft_named_factors_with_stored_alphas(tmp_path: Path) -> None:
    """ComfyUI/ai-toolkit style: PEFT names without base_model.model., a kohya-style scalar alpha per module."""
    down, up = factors(64, 32, 4)
    path = tmp_path / "flux_lora.safetensors"
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_A.weight": down,
               "diffusion_model.blocks.0.attn.qkv.lora_B.weight": up,
               "diffusion_model.blocks.0.attn.qkv.alpha": torch.tensor(2.0)}, str(path))
    adapter = load_adapter(path)
    module = adapter.modules["diffusion_model.blocks.0.attn.qkv"]
    assert (module.rank, module.alpha, module.scale) == (4, 2.0, 0.5)
    assert adapter.extra_tensors == []
