"""merge / similarity across a kohya (BFL-named) Flux file and a diffusers Flux file of the same model
(convert/align.py): layers match in diffusers' naming; a layer fused in one file and split in the other is
refused in one line with the command that makes the namings agree, never matched row-misaligned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.convert.run import convert
from lora_tools.formats import load_adapter
from lora_tools.linalg.products import relative_difference
from lora_tools.similarity import common_modules
from tests.helpers import assert_one_line_error, run_cli
from tests.test_image_models import flux_kohya

pytest.importorskip("diffusers")
FUSED = ("qkv", "linear1", "adaLN")  # fused in BFL naming, or halves swapped (the final layer)


def one_to_one(tmp_path: Path) -> tuple[Path, Path]:
    """(a kohya Flux file of one-to-one layers only, its diffusers conversion)."""
    tensors = load_file(str(flux_kohya(tmp_path / "full.safetensors")))
    kohya = tmp_path / "kohya.safetensors"
    save_file({k: v for k, v in tensors.items() if not any(f in k for f in FUSED)}, str(kohya))
    convert(kohya, tmp_path / "diffusers.safetensors", "diffusers")
    return kohya, tmp_path / "diffusers.safetensors"


def test_similarity_matches_every_layer(tmp_path: Path) -> None:
    kohya, diffusers_file = one_to_one(tmp_path)
    a, b = load_adapter(kohya), load_adapter(diffusers_file)
    pairs, only_a, only_b = common_modules(a, b)
    assert len(pairs) == len(a.modules) == len(b.modules) == 15 and not only_a and not only_b
    assert ("lora_unet_double_blocks_0_img_attn_proj", "transformer.transformer_blocks.0.attn.to_out.0") in pairs
    result = run_cli("similarity", str(kohya), str(diffusers_file))
    assert result.exit_code == 0, result.output


def test_merge_across_namings_is_exact(tmp_path: Path) -> None:
    kohya, diffusers_file = one_to_one(tmp_path)
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", str(kohya), str(diffusers_file), "-o", str(out), "--weights", "0.5,0.5")
    assert result.exit_code == 0, result.output
    original, merged = load_adapter(kohya), load_adapter(out)
    assert set(merged.modules) == set(original.modules)
    for name, module in original.modules.items():
        B, A = original.factors(name, torch.float64)
        B2, A2 = merged.factors(name, torch.float64)
        assert relative_difference(merged.modules[name].scale * B2, A2, module.scale * B, A) < 1e-6, name


@pytest.mark.parametrize("command", ["similarity", "merge"])
def test_fused_against_split_is_refused(tmp_path: Path, command: str) -> None:
    kohya = flux_kohya(tmp_path / "kohya.safetensors")
    diffusers_file = tmp_path / "diffusers.safetensors"
    convert(kohya, diffusers_file, "diffusers")
    out = tmp_path / "merged.safetensors"
    args = ["-o", str(out)] if command == "merge" else []
    result = run_cli(command, str(kohya), str(diffusers_file), *args)
    assert_one_line_error(result, "is one fused layer where")
    assert "lora_unet_double_blocks_0_img_attn_qkv" in result.output or "linear1" in result.output
    assert f"loratools convert {kohya} --to diffusers" in result.output
    assert not out.exists()
