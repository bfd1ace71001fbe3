"""convert: verified, lossless PEFT <-> kohya <-> diffusers conversion, real pair, round trips, refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_tools.convert.run import VerificationError, convert, plan_conversion, verify
from lora_tools.formats import load_adapter
from tests.conftest import MODEL_FACTORIES, REALDATA, make_peft_adapter, requires_realdata
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft

PAIR = REALDATA / "sd-lora-timohavdk"


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors" if path.is_dir() else path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --- the real pair -------------------------------------------------------------------------------------------


@requires_realdata("sd-lora-timohavdk", "new.safetensors")
def test_real_kohya_copy_converts_to_the_diffusers_original(tmp_path: Path) -> None:
    report = convert(PAIR / "new.safetensors", tmp_path / "d.safetensors", "diffusers")
    assert report["bit_exact_modules"] == report["num_modules"] == 128
    assert_same_tensors(tensors_of(tmp_path / "d.safetensors"), tensors_of(PAIR / "2100-lora.safetensors"))


@requires_realdata("sd-lora-timohavdk", "2100-lora.safetensors")
def test_real_diffusers_original_converts_to_the_kohya_copy(tmp_path: Path) -> None:
    out = tmp_path / "k.safetensors"
    report = convert(PAIR / "2100-lora.safetensors", out, "kohya")
    assert report["max_rel_difference"] == 0.0
    ours, theirs = load_adapter(out), load_adapter(PAIR / "new.safetensors")
    # Both kohya files name the same diffusers modules; every module's factors and scale agree.
    ours_names = {v: k for k, v in plan_conversion(ours, "diffusers").mapping.items()}
    theirs_names = plan_conversion(theirs, "diffusers").mapping
    assert len(theirs_names) == 128
    for kohya_name, diffusers_name in theirs_names.items():
        mine = ours.modules[ours_names[diffusers_name]]
        assert mine.name == "lora_" + diffusers_name.replace(".", "_")  # sd-scripts' lora_unet_... spelling
        assert mine.scale == theirs.modules[kohya_name].scale == 1.0
        for role in ("a_info", "b_info"):
            assert torch.equal(ours.source.get(getattr(mine, role).key),
                               theirs.source.get(getattr(theirs.modules[kohya_name], role).key))
    # ... and the kohya output converts back to exactly the original file.
    convert(out, tmp_path / "back.safetensors", "diffusers")
    back = tensors_of(tmp_path / "back.safetensors")
    original = tensors_of(PAIR / "2100-lora.safetensors")
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert set(back) - set(original) <= {k for k in back if k.endswith(".alpha")}


# --- PEFT -> kohya -> PEFT --------------------------------------------------------------------------------------


def peft_outputs(path: Path, model_name: str, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(MODEL_FACTORIES[model_name](), str(path)).eval()
    messages = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out), messages


@pytest.mark.parametrize(("model_name", "kwargs"), [
    ("llama", {"r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj", "up_proj"],
               "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"up_proj": 3}, "use_rslora": True}),
    ("conv", {"r": 2, "lora_alpha": 4, "target_modules": ["conv", "head"]}),
])
def test_peft_to_kohya_to_peft_reproduces_every_tensor_without_base(tmp_path: Path, model_name: str,
                                                                    kwargs: dict[str, Any]) -> None:
    source, _ = make_peft_adapter(tmp_path, model_name, **kwargs)
    kohya_file = tmp_path / "k.safetensors"
    first = convert(source, kohya_file, "kohya")
    assert first["num_modules"] == len(load_adapter(source).modules)
    kohya = load_adapter(kohya_file)
    assert kohya.metadata["ss_network_dim"] in ("Dynamic", str(kwargs["r"]))
    back = tmp_path / "back"
    report = convert(kohya_file, back, "peft")
    assert report["name_source"].startswith("names recorded by loratools")
    assert_same_tensors(tensors_of(back), tensors_of(source))
    original, again = load_adapter(source), load_adapter(back)
    for name, module in original.modules.items():
        assert again.modules[name].rank == module.rank
        assert again.modules[name].scale == pytest.approx(module.scale, rel=1e-12)
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["use_rslora"] == kwargs.get("use_rslora", False)
    x = torch.randint(0, 100, (1, 5)) if model_name == "llama" else torch.randn(1, 3, 6, 6)
    expected, _ = peft_outputs(source, model_name, x)
    got, messages = peft_outputs(back, model_name, x)
    assert messages == []
    assert torch.allclose(got, expected, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(rank=st.integers(1, 6), alpha=st.floats(0.5, 64, allow_nan=False), rslora=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_round_trip_peft_kohya_peft_property(tmp_path_factory: pytest.TempPathFactory, rank: int, alpha: float,
                                             rslora: bool, dtype: torch.dtype) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    source = write_peft(tmp / "in", lora_tensors({"model.layers.0.q_proj": (6, 5, rank)}, dtype=dtype), r=rank,
                        lora_alpha=alpha, use_rslora=rslora)
    convert(source, tmp / "k.safetensors", "kohya")
    report = convert(tmp / "k.safetensors", tmp / "out", "peft")
    assert report["max_rel_difference"] <= 1e-6
    assert_same_tensors(tensors_of(tmp / "out"), tensors_of(source))
    module = load_adapter(tmp / "out").modules["model.layers.0.q_proj"]
    assert module.scale == pytest.approx(load_adapter(source).modules["model.layers.0.q_proj"].scale, rel=1e-12)


# --- kohya -> diffusers -> kohya ------------------------------------------------------------------------------


def kohya_file(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    tensors = {
        f"{block}_attn1_to_q.lora_down.weight": torch.randn(4, 32, generator=gen),
        f"{block}_attn1_to_q.lora_up.weight": torch.randn(32, 4, generator=gen),
        f"{block}_attn1_to_q.alpha": torch.tensor(2.0, dtype=torch.float16),
        f"{block}_attn1_to_out_0.lora_down.weight": torch.randn(2, 32, generator=gen).half(),
        f"{block}_attn1_to_out_0.lora_up.weight": torch.randn(32, 2, generator=gen).half(),
        f"{block}_attn1_to_out_0.alpha": torch.tensor(2.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(2, 8, 3, 3, generator=gen),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(16, 2, 1, 1, generator=gen),
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_down.weight": torch.randn(3, 16, generator=gen),
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight": torch.randn(64, 3, generator=gen),
        "lora_te_text_model_encoder_layers_3_mlp_fc1.alpha": torch.tensor(1.5),
    }
    save_file(tensors, str(path), metadata={"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    return path


def test_kohya_to_diffusers_to_kohya_reproduces_every_tensor(tmp_path: Path) -> None:
    source = kohya_file(tmp_path / "in.safetensors")
    convert(source, tmp_path / "d.safetensors", "diffusers")
    diffusers = load_adapter(tmp_path / "d.safetensors")
    assert diffusers.format == "diffusers"
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in diffusers.modules
    assert "text_encoder.text_model.encoder.layers.3.mlp.fc1" in diffusers.modules
    convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    original, back = tensors_of(source), tensors_of(tmp_path / "k.safetensors")
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    # The one module without .alpha (kohya: scale 1) gains alpha = rank, which means the same.
    assert set(back) - set(original) == {"lora_unet_down_blocks_0_resnets_0_conv1.alpha"}
    assert float(back["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 2.0


def test_old_attention_processor_naming_converts(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    tensors = {f"{block}.{p}_lora.{r}.weight": torch.randn(*((4, 8) if r == "down" else (8, 4)), generator=gen)
               for p in ("to_q", "to_out") for r in ("down", "up")}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    report = convert(tmp_path / "old.safetensors", tmp_path / "k.safetensors", "kohya")
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert set(report["mapping"].values()) == {f"{flat}_to_q", f"{flat}_to_out_0"}
    convert(tmp_path / "k.safetensors", tmp_path / "new.safetensors", "diffusers")
    new = tensors_of(tmp_path / "new.safetensors")
    assert torch.equal(new["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight"],
                       tensors[f"{block}.to_out_lora.up.weight"])


# --- kohya names resolved against a base model ----------------------------------------------------------------


def llm_kohya(path: Path, extra: bool = False) -> Path:
    gen = torch.Generator().manual_seed(2)
    names = ["model_layers_0_self_attn_q_proj", "model_layers_1_mlp_down_proj"] + (["model_layers_9_nope"] if extra
                                                                                     else [])
    tensors = {}
    for name in names:
        tensors[f"lora_{name}.lora_down.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"lora_{name}.lora_up.weight"] = torch.randn(8, 2, generator=gen)
        tensors[f"lora_{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def base_weights(path: Path) -> Path:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"]
    save_file({f"{n}.weight": torch.zeros(8, 8) for n in names}, str(path))
    return path


def test_kohya_to_peft_with_base_and_partial(tmp_path: Path) -> None:
    base = base_weights(tmp_path / "base.safetensors")
    report = convert(llm_kohya(tmp_path / "k.safetensors"), tmp_path / "p", "peft", base=base)
    assert report["name_source"] == f"base model {base}"
    adapter = load_adapter(tmp_path / "p")
    assert set(adapter.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert all(m.scale == 2.0 for m in adapter.modules.values())
    partial = llm_kohya(tmp_path / "partial.safetensors", extra=True)
    result = run_cli("convert", str(partial), "-o", str(tmp_path / "p2"), "--to", "peft", "--base", str(base))
    assert_one_line_error(result, "1 of 3 kohya module name(s)", "lora_model_layers_9_nope", "--allow-partial")
    assert not (tmp_path / "p2").exists()
    ok = run_cli("convert", str(partial), "-o", str(tmp_path / "p2"), "--to", "peft", "--base", str(base),
                 "--allow-partial", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["num_modules"] == 2 and "dropped" in ok.stdout


def test_unresolvable_names_without_base_are_listed(tmp_path: Path) -> None:
    source = llm_kohya(tmp_path / "k.safetensors")
    result = run_cli("convert", str(source), "-o", str(tmp_path / "p"), "--to", "peft")
    assert_one_line_error(result, "2 of 2", "lora_model_layers_0_self_attn_q_proj", "--base")
    assert not (tmp_path / "p").exists()


# --- refusals and verification --------------------------------------------------------------------------------


def test_existing_output_needs_force_and_gpt2_conv1d_cannot_be_kohya(tmp_path: Path) -> None:
    source, _ = make_peft_adapter(tmp_path, "gpt2", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("convert", str(source), "-o", str(out), "--to", "kohya"), "conv1d", "--to peft")
    assert not out.exists()
    out.write_text("keep")
    assert_one_line_error(run_cli("convert", str(source), "-o", str(out), "--to", "kohya"), "already exists")
    assert out.read_text() == "keep"
    folder = tmp_path / "out_peft"
    folder.mkdir()
    assert_one_line_error(run_cli("convert", str(source), "-o", str(folder), "--to", "peft"), "already exists")
    assert list(folder.iterdir()) == []


def test_verification_catches_a_changed_scale(tmp_path: Path) -> None:
    source = write_peft(tmp_path / "in", lora_tensors({"model.q_proj": (6, 5, 2)}), r=2, lora_alpha=4)
    adapter = load_adapter(source)
    plan = plan_conversion(adapter, "kohya")
    verify(adapter, plan.adapter, plan.mapping)
    plan.adapter.modules["lora_model_q_proj"].scale *= 1.01
    with pytest.raises(VerificationError, match="lora_model_q_proj|model.q_proj"):
        verify(adapter, plan.adapter, plan.mapping)


def test_diffusers_accepts_our_outputs(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    source = kohya_file(tmp_path / "in.safetensors")
    convert(source, tmp_path / "d.safetensors", "diffusers")
    convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    kohya = tensors_of(tmp_path / "k.safetensors")
    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    factors = [k for k in kohya if k.endswith(("lora_down.weight", "lora_up.weight"))]
    assert len(converted) == len(factors)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in converted)
    assert len(network_alphas) == sum(k.endswith(".alpha") for k in kohya)


def test_multi_component_diffusers_to_peft_needs_a_prefix(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name in ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"):
        tensors[f"{name}.lora.down.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"{name}.lora.up.weight"] = torch.randn(8, 2, generator=gen)
    save_file(tensors, str(tmp_path / "both.safetensors"))
    result = run_cli("convert", str(tmp_path / "both.safetensors"), "-o", str(tmp_path / "p"), "--to", "peft")
    assert_one_line_error(result, "several models", "--prefix")
    report = convert(tmp_path / "both.safetensors", tmp_path / "p", "peft", prefix="te")
    assert list(report["mapping"].values()) == ["text_model.encoder.layers.0.self_attn.q_proj"]
    assert any("not converted" in w for w in report["warnings"])
