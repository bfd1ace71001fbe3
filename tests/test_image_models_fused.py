"""Fused <-> split LoRA factors (convert/fused.py) and the bad inputs of the image-model conversions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_tools.convert.fused import block_columns, fuse_parts, split_fused, swap_halves
from lora_tools.convert.image_models import families, find_layer, sdxl_pairs
from lora_tools.convert.run import convert
from lora_tools.errors import ModuleMismatchError
from lora_tools.formats import load_adapter
from tests.helpers import assert_one_line_error, run_cli


def dense(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * B.double() @ A.double()


@settings(max_examples=40, deadline=None)
@given(ranks=st.lists(st.integers(1, 4), min_size=2, max_size=4), width=st.integers(1, 6),
       scales=st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.3]), min_size=4, max_size=4), seed=st.integers(0, 99))
def test_fuse_then_split_is_exact_and_keeps_the_smaller_ranks(ranks: list[int], width: int, scales: list[float],
                                                              seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = [width * (i + 1) for i in range(len(ranks))]
    parts = [(torch.randn(size, r, generator=gen, dtype=torch.float64),
              torch.randn(r, 5, generator=gen, dtype=torch.float64), scales[i])
             for i, (size, r) in enumerate(zip(sizes, ranks, strict=True))]
    B, A, scale = fuse_parts(parts, sizes, 5)
    assert B.shape == (sum(sizes), sum(ranks)) and A.shape == (sum(ranks), 5)
    fused = dense(B, A, scale)
    assert torch.allclose(fused, torch.cat([dense(b, a, s) for b, a, s in parts]), rtol=1e-12, atol=1e-12)
    back = split_fused(B, A, sizes)
    for (b, a, s), got in zip(parts, back, strict=True):
        assert got is not None and got[1].shape[0] == b.shape[1]  # block-diagonal: each part's own rank
        assert torch.allclose(dense(*got, scale), dense(b, a, s), rtol=1e-12, atol=1e-12)


def test_dense_fused_b_splits_by_rows_with_a_shared() -> None:
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(12, 3, generator=gen), torch.randn(3, 4, generator=gen)
    parts = split_fused(B, A, [4, 4, 4])
    assert all(p is not None and p[1] is A and p[0].shape == (4, 3) for p in parts)
    assert block_columns(B, [4, 4, 4]) is None


def test_absent_part_is_zero_rows_and_drops_out_on_the_way_back() -> None:
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(2, 2, generator=gen), torch.randn(2, 2, generator=gen), 1.0)
    B, A, _ = fuse_parts([q, None], [2, 8], 2)
    assert not bool(B[2:].any())
    back = split_fused(B, A, [2, 8])
    assert back[1] is None and torch.equal(back[0][0], q[0]) and torch.equal(back[0][1], q[1])


def test_swap_halves_is_its_own_inverse() -> None:
    B = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(swap_halves(swap_halves(B)), B) and torch.equal(swap_halves(B)[0], B[2])


def test_tables_follow_the_model_definitions() -> None:
    """Counts from the model code: Flux.1 19 double + 38 single blocks; SDXL's LoRA-able UNet layers; no
    diffusers layer belongs to two fused layers."""
    flux = next(f for f in families() if f.name == "flux")
    bfl = flux.namings["bfl"]
    assert sum(p.startswith("double_blocks.") and p.endswith("img_attn.qkv") for p in bfl) == 19
    assert sum(p.startswith("single_blocks.") and p.endswith("linear1") for p in bfl) == 38
    assert bfl["single_blocks.0.linear1"].widths == (1, 1, 1, 4)
    atoms = [a for layer in bfl.values() for a in layer.atoms]
    assert len(atoms) == len(set(atoms))
    pairs = sdxl_pairs()
    assert len({d for d, _ in pairs}) == len(pairs) == len({s for _, s in pairs})
    assert ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k") in pairs
    assert find_layer("blocks.39.cross_attn.v_img")[0].name == "wan"


# --- bad inputs ------------------------------------------------------------------------------------------------


def kohya_file(path: Path, modules: dict[str, tuple[int, int, int]]) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp, rank) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def test_fused_sizes_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    # linear1 of hidden 16 must have 3 x 16 + 64 = 112 rows
    source = kohya_file(tmp_path / "bad.safetensors", {"lora_unet_single_blocks_0_linear1": (100, 16, 4)})
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", str(source), "-o", str(out), "--to", "diffusers")
    assert_one_line_error(result, "bad.safetensors", "lora_unet_single_blocks_0_linear1", "100 output rows",
                          "= 112")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]


def test_split_parts_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for leaf, out in (("to_q", 16), ("to_k", 16), ("to_v", 12)):
        tensors[f"transformer.transformer_blocks.0.attn.{leaf}.lora_A.weight"] = torch.randn(2, 16, generator=gen)
        tensors[f"transformer.transformer_blocks.0.attn.{leaf}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    save_file(tensors, str(tmp_path / "split.safetensors"))
    with pytest.raises(ModuleMismatchError, match="attn.to_v has 12 output rows .* must have 16"):
        convert(tmp_path / "split.safetensors", tmp_path / "out.safetensors", "kohya")


def test_missing_fused_part_needs_allow_partial(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for leaf in ("attn.to_q", "attn.to_k", "attn.to_v"):  # no proj_mlp: linear1 is q, k, v and the MLP input
        tensors[f"transformer.single_transformer_blocks.3.{leaf}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"transformer.single_transformer_blocks.3.{leaf}.lora_B.weight"] = torch.randn(8, 2, generator=gen)
    source = tmp_path / "attn_only.safetensors"
    save_file(tensors, str(source))
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", str(source), "-o", str(out), "--to", "kohya")
    assert_one_line_error(result, "attn_only.safetensors", "single_blocks.3.linear1",
                          "single_transformer_blocks.3.proj_mlp", "--allow-partial")
    assert not out.exists()
    result = run_cli("convert", str(source), "-o", str(out), "--to", "kohya", "--allow-partial", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_rel_difference"] < 1e-12
    kohya = load_file(str(out))
    up = kohya["lora_unet_single_blocks_3_linear1.lora_up.weight"]
    assert up.shape == (3 * 8 + 32, 6) and not bool(up[24:].any())
    # and back: the absent MLP part stays absent, q/k/v come back at rank 2
    back = tmp_path / "back.safetensors"
    convert(out, back, "diffusers")
    adapter = load_adapter(back)
    assert sorted(adapter.modules) == sorted(n.removesuffix(".lora_A.weight") for n in tensors if "lora_A" in n)
    assert {m.rank for m in adapter.modules.values()} == {2}


def test_layers_of_two_models_in_one_file_are_refused(tmp_path: Path) -> None:
    source = kohya_file(tmp_path / "mixed.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": (8, 8, 2),
                                                         "lora_unet_blocks_0_self_attn_q": (8, 8, 2)})
    with pytest.raises(ModuleMismatchError, match="several models \\(flux, wan\\)"):
        convert(source, tmp_path / "out.safetensors", "diffusers")


def test_peft_default_adapter_infix_converts(tmp_path: Path) -> None:
    """PEFT keys with the adapter name left in (lora_A.default.weight), as some trainers save them."""
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path / "peft"
    folder.mkdir()
    tensors = {}
    for leaf in ("to_q", "to_k", "to_v"):
        tensors[f"base_model.model.transformer_blocks.0.attn.{leaf}.lora_A.default.weight"] = \
            torch.randn(4, 16, generator=gen)
        tensors[f"base_model.model.transformer_blocks.0.attn.{leaf}.lora_B.default.weight"] = \
            torch.randn(16, 4, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["to_q", "to_k", "to_v"]}))
    report = convert(folder, tmp_path / "k.safetensors", "kohya")
    kohya = load_file(str(tmp_path / "k.safetensors"))
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (48, 12)
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 24.0  # scale 2 kept at rank 12
    assert report["max_rel_difference"] < 1e-12
    convert(folder, tmp_path / "d.safetensors", "diffusers")
    assert "transformer.transformer_blocks.0.attn.to_q" in load_adapter(tmp_path / "d.safetensors").modules


def test_verification_catches_a_wrong_row_block(tmp_path: Path) -> None:
    """A split whose written part differs from the input's rows is refused, whether it differs in its factors
    (the low-rank comparison) or only in its scale (the copied-factor shortcut)."""
    from lora_tools.convert.run import plan_conversion
    from lora_tools.convert.verify import VerificationError, verify
    from lora_tools.formats import FORMATS

    source = kohya_file(tmp_path / "qkv.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (24, 8, 2)})
    adapter = load_adapter(source)
    plan = plan_conversion(adapter, "diffusers")
    out = tmp_path / "out.safetensors"
    FORMATS["diffusers"].write(plan.adapter, out)
    assert verify(adapter, load_adapter(out), plan.mapping, plan.groups)["max_rel_difference"] == 0.0
    tensors = load_file(str(out))
    key = "transformer.transformer_blocks.0.attn.to_k.lora_B.weight"
    for tamper, alpha in ((lambda t: t.flip(0), 2), (lambda t: t, 2.02)):
        changed = dict(tensors, **{key: tamper(tensors[key]).contiguous()})
        save_file(changed, str(tmp_path / "bad.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
            {"transformer.r": 2, "transformer.lora_alpha": alpha})})
        with pytest.raises(VerificationError, match="double_blocks_0_img_attn_qkv"):
            verify(adapter, load_adapter(tmp_path / "bad.safetensors"), plan.mapping, plan.groups)


@pytest.mark.parametrize(("context_width", "expected"), [
    (2048, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"),  # SDXL: kohya uses sgm names
    (768, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")])  # SD 1.x: diffusers names
def test_sdxl_is_told_from_sd1_by_its_cross_attention_width(tmp_path: Path, context_width: int,
                                                             expected: str) -> None:
    gen = torch.Generator().manual_seed(0)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({f"base_model.model.{name}.lora_A.weight": torch.randn(2, context_width, generator=gen),
               f"base_model.model.{name}.lora_B.weight": torch.randn(640, 2, generator=gen)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["to_k"]}))
    report = convert(folder, tmp_path / "k.safetensors", "kohya")
    assert report["mapping"] == {name: expected}


def test_within_one_format_names_and_factors_stay(tmp_path: Path) -> None:
    source = kohya_file(tmp_path / "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (24, 8, 2),
                                                        "lora_unet_single_blocks_0_linear1": (56, 8, 2)})
    report = convert(source, tmp_path / "same.safetensors", "kohya")
    assert report["layer_groups"] == {"split": 0, "fuse": 0, "swap": 0}
    original, again = load_file(str(source)), load_file(str(tmp_path / "same.safetensors"))
    assert set(original) == set(again) and all(torch.equal(original[k], again[k]) for k in original)


def test_convert_report_says_which_layers_were_regrouped() -> None:
    from lora_tools.report.merge import render_convert_report

    report = {"input": "a", "input_format": "kohya", "output": "b", "output_format": "diffusers", "num_modules": 9,
              "name_source": "built-in Flux layer table", "bit_exact_modules": 1, "max_rel_difference": 0.0,
              "layer_groups": {"split": 2, "fuse": 0, "swap": 1}, "warnings": []}
    text = render_convert_report(report)
    assert "1 of 9 module(s) bit-exact" in text and "re-grouped" in text and "2 split, 1 swap" in text
    report["layer_groups"] = {"split": 0, "fuse": 0, "swap": 0}
    assert "re-grouped" not in render_convert_report(report)
