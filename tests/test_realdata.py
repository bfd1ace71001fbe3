"""Real third-party adapters (../shared/realdata, see its SOURCES.md): read right, or refused clearly."""

from __future__ import annotations

import pytest
import torch

from lora_tools.analysis import inspect_adapter
from lora_tools.errors import UnsupportedAdapterError
from lora_tools.formats import load_adapter
from tests.conftest import REALDATA

pytestmark = pytest.mark.skipif(not REALDATA.exists(), reason="../shared/realdata not present")

# folder -> (format, modules, rank, alpha, scale, dtype, first module, its [out, in], kind)
LORA = {
    "peft-tiny-gpt2-ironhack": ("peft", 6, 4, 1.0, 0.25, "F32", "transformer.h.0.attn.c_attn", [6, 2], "conv1d"),
    "peft-gpt2-r4-cattn-ironhack": ("peft", 12, 4, 1.0, 0.25, "F32", "transformer.h.0.attn.c_attn", [2304, 768],
                                    "conv1d"),
    "peft-opt125m-qv": ("peft", 24, 16, 32.0, 2.0, "BF16", "model.decoder.layers.0.self_attn.q_proj",
                        [768, 768], "linear"),
    "peft-flan-t5-small-qv": ("peft", 48, 16, 32.0, 2.0, "F32", "decoder.block.0.layer.0.SelfAttention.q",
                              [384, 512], "linear"),
    "peft-regression/lora_mlp/0.6.1": ("peft", 1, 8, 8.0, 1.0, "F32", "lin0", [20, 10], "linear"),
    "peft-regression/lora_conv2d/0.6.1": ("peft", 1, 8, 8.0, 1.0, "F32", "conv2d", [10, 45], "conv"),
    "peft-regression/lora_emb_conv1d/0.6.1": ("peft", 2, 8, 8.0, 1.0, "F32", "conv1d", [1, 5], "conv1d"),
    "peft-regression/lora_opt-350m/0.6.1": ("peft", 48, 8, 8.0, 1.0, "F32",
                                            "model.decoder.layers.0.self_attn.q_proj", [1024, 1024], "linear"),
    "diffusers-sd15-flower": ("diffusers", 128, 4, 4.0, 1.0, "F32",
                              "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", [320, 320],
                              "linear"),
    # old attention-processor naming without a component prefix: named unet.<path> like the newer files
    "diffusers-sd15-catundchat": ("diffusers", 128, 4, 4.0, 1.0, "F32",
                                  "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", [320, 320],
                                  "linear"),
    "diffusers-sd15-catundchat/pytorch_lora_weights.bin": (
        "diffusers", 128, 4, 4.0, 1.0, "F32", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
        [320, 320], "linear"),
    "sd-lora-timohavdk/2100-lora.safetensors": (
        "diffusers", 128, 4, 4.0, 1.0, "F32", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
        [320, 320], "linear"),
    "sd-lora-timohavdk/new.safetensors": (
        "kohya", 128, 4, 4.0, 1.0, "F32", "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
        [320, 320], "linear"),
}

NOT_LORA = {
    "peft-ia3-mt0-large": "IA3",
    "peft-regression/ia3_mlp/0.6.1": "IA3",
    "peft-regression/ia3_conv2d/0.6.1": "IA3",
    # AdaLoRA and LyCORIS LoKr are read now: tests/test_adalora.py, tests/test_lycoris.py
}


@pytest.mark.parametrize("folder", sorted(LORA))
def test_real_lora_adapters_read_right(folder: str) -> None:
    fmt, count, rank, alpha, scale, dtype, first, shape, kind = LORA[folder]
    adapter = load_adapter(REALDATA / folder)
    assert adapter.format == fmt
    assert len(adapter.modules) == count
    module = adapter.modules[first]
    assert (module.rank, module.alpha, module.scale, module.dtype, module.kind) == (rank, alpha, scale, dtype, kind)
    assert [module.out_features, module.in_features] == shape
    report = inspect_adapter(adapter)
    assert report["num_modules"] == count
    for row in report["modules"]:
        assert len(row["singular_values"]) == row["rank"]
        assert row["sigma_max"] > 0


def test_catundchat_old_processor_names_map_to_module_paths() -> None:
    adapter = load_adapter(REALDATA / "diffusers-sd15-catundchat")
    names = set(adapter.modules)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert not any("processor" in n or n.endswith("_lora") for n in names)


def test_kohya_copy_holds_the_same_updates_as_the_diffusers_file() -> None:
    diffusers = load_adapter(REALDATA / "sd-lora-timohavdk/2100-lora.safetensors")
    kohya = load_adapter(REALDATA / "sd-lora-timohavdk/new.safetensors")
    flat = {"lora_unet_" + name.replace(".", "_"): name for name in diffusers.modules}
    assert set(flat) == set(kohya.modules)
    for kohya_name, diffusers_name in list(flat.items())[:16]:
        torch.testing.assert_close(kohya.delta_weight(kohya_name), diffusers.delta_weight(diffusers_name),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("folder", sorted(NOT_LORA))
def test_non_lora_adapters_are_refused_by_name(folder: str) -> None:
    with pytest.raises(UnsupportedAdapterError, match=NOT_LORA[folder]):
        load_adapter(REALDATA / folder)


def test_modules_to_save_are_listed_as_extra_tensors() -> None:
    adapter = load_adapter(REALDATA / "peft-regression/lora_mlp_modules_to_save/0.6.1")
    assert sorted(i.key for i in adapter.extra_tensors) == ["base_model.model.lin1.bias",
                                                            "base_model.model.lin1.weight"]


def test_old_config_with_legacy_keys_loads() -> None:
    adapter = load_adapter(REALDATA / "peft-flan-t5-small-qv")
    assert "enable_lora" in adapter.config or "merge_weights" in adapter.config


def test_regression_mlp_merge_reproduces_peft_recorded_output() -> None:
    """PEFT's maintainers recorded this model's output; merging our ΔW into the rebuilt base must reproduce it."""
    folder = REALDATA / "peft-regression/lora_mlp/0.6.1"
    torch.manual_seed(0)
    lin0, lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
    adapter = load_adapter(folder)
    with torch.no_grad():
        lin0.weight += adapter.delta_weight("lin0")
        x = torch.arange(90).reshape(9, 10).float()
        output = torch.log_softmax(lin1(torch.relu(lin0(x))), dim=-1)
    expected = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_regression_conv2d_merge_reproduces_peft_recorded_output() -> None:
    folder = REALDATA / "peft-regression/lora_conv2d/0.6.1"
    torch.manual_seed(0)
    conv, lin = torch.nn.Conv2d(5, 10, 3), torch.nn.Linear(10, 2)
    adapter = load_adapter(folder)
    with torch.no_grad():
        conv.weight += adapter.delta_weight("conv2d")
        x = torch.arange(90).reshape(9, 10).float().reshape(2, 5, 3, 3)
        output = torch.log_softmax(lin(torch.relu(conv(x)).flatten(1)), dim=-1)
    expected = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
