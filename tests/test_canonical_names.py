"""One canonical module name per layer, whatever the source naming (issue 14, defect 2).

Old diffusers files (attention-processor keys, no component prefix) and new ones (``unet.<module>.lora.*``) name a
UNet layer alike (``unet.<path>``), so they merge into a sum, compare module by module, and write kohya files with
the ``lora_unet_`` prefix kohya's loaders apply; ``convert`` reads those back to the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_tools.convert.names import META_NAMES, kohya_names
from lora_tools.convert.run import alignment_keys, convert
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.merge.run import merge_adapters
from lora_tools.similarity import similarity
from lora_tools.truncate import truncate
from tests.conftest import REALDATA, requires_realdata
from tests.helpers import lora_tensors, run_cli, write_peft

# Real SD-1.5 UNet block paths (so that kohya names also resolve against the built-in lists), small widths.
BLOCKS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn2",
          "up_blocks.1.attentions.2.transformer_blocks.0.attn1")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
WIDTH, RANK = 12, 3
OLD = "pytorch_lora_weights.safetensors"


def module_path(block: str, proj: str) -> str:
    return f"{block}.{'to_out.0' if proj == 'to_out' else proj}"


def old_naming_file(path: Path, seed: int = 0) -> Path:
    """diffusers' attention-processor naming: ``<block>.processor.to_q_lora.down.weight``, no ``unet.``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in BLOCKS:
        for proj in PROJECTIONS:
            tensors[f"{block}.processor.{proj}_lora.down.weight"] = torch.randn(RANK, WIDTH, generator=gen)
            tensors[f"{block}.processor.{proj}_lora.up.weight"] = torch.randn(WIDTH, RANK, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def new_naming_file(path: Path, seed: int = 1, blocks: tuple[str, ...] = BLOCKS) -> Path:
    """The newer naming: ``unet.<module>.lora.down.weight``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in blocks:
        for proj in PROJECTIONS:
            name = module_path(block, proj)
            tensors[f"unet.{name}.lora.down.weight"] = torch.randn(RANK, WIDTH, generator=gen)
            tensors[f"unet.{name}.lora.up.weight"] = torch.randn(WIDTH, RANK, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def expected_names() -> set[str]:
    return {f"unet.{module_path(b, p)}" for b in BLOCKS for p in PROJECTIONS}


def kohya_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


# --- synthetic files (always run) ----------------------------------------------------------------------------


def test_old_and_new_diffusers_namings_give_the_same_module_names(tmp_path: Path) -> None:
    old = load_adapter(old_naming_file(tmp_path / "old" / OLD))
    new = load_adapter(new_naming_file(tmp_path / "new.safetensors"))
    assert old.format == new.format == "diffusers"
    assert set(old.modules) == set(new.modules) == expected_names()
    assert alignment_keys(old) == alignment_keys(new)


def test_old_and_new_files_merge_into_a_sum_not_a_union(tmp_path: Path) -> None:
    old = load_adapter(old_naming_file(tmp_path / "old" / OLD))
    new = load_adapter(new_naming_file(tmp_path / "new.safetensors"))
    result = merge_adapters([old, new], "cat")
    count = len(BLOCKS) * len(PROJECTIONS)
    assert result.report["num_modules"] == count == len(result.adapter.modules)
    assert all(row["ranks_in"] == [RANK, RANK] for row in result.report["modules"])
    name = f"unet.{module_path(BLOCKS[1], 'to_out')}"
    expected = old.delta_weight(name, torch.float64) + new.delta_weight(name, torch.float64)
    assert rel(result.adapter.delta_weight(name, torch.float64), expected) < 1e-6


def test_similarity_of_old_and_new_files_finds_every_module(tmp_path: Path) -> None:
    old = load_adapter(old_naming_file(tmp_path / "old" / OLD))
    new = load_adapter(new_naming_file(tmp_path / "new.safetensors", seed=0))
    report = similarity(old, new, grids=False)
    assert report["num_common"] == len(BLOCKS) * len(PROJECTIONS)
    assert report["only_in_a"] == report["only_in_b"] == 0
    # seed 0 draws the same factors in the same order: the updates are identical
    assert all(row["cosine"] == pytest.approx(1.0) for row in report["modules"])


def test_truncate_to_kohya_writes_lora_unet_keys_that_convert_reads_back(tmp_path: Path) -> None:
    source = old_naming_file(tmp_path / "old" / OLD)
    out = tmp_path / "k.safetensors"
    result = run_cli("truncate", str(source), "--rank", "2", "--to", "kohya", "-o", str(out))
    assert result.exit_code == 0, result.output
    keys = kohya_keys(out)
    assert len(keys) == 3 * len(BLOCKS) * len(PROJECTIONS)
    assert all(k.startswith("lora_unet_") for k in keys), keys[:3]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    back = tmp_path / "back.safetensors"
    report = convert(out, back, "diffusers")
    assert report["bit_exact_modules"] == report["num_modules"] == len(BLOCKS) * len(PROJECTIONS)
    kohya, diffusers = load_file(str(out)), load_file(str(back))
    for block in BLOCKS:
        for proj in PROJECTIONS:
            name = module_path(block, proj)
            flat = "lora_unet_" + name.replace(".", "_")
            for role in ("down", "up"):
                assert torch.equal(diffusers[f"unet.{name}.lora.{role}.weight"], kohya[f"{flat}.lora_{role}.weight"])


def test_kohya_output_resolves_without_the_recorded_names(tmp_path: Path) -> None:
    """A kohya loader knows nothing of loratools' metadata: the names alone must be kohya's (lora_unet_...)."""
    adapter = load_adapter(old_naming_file(tmp_path / "old" / OLD))
    out = save_adapter(truncate(adapter, rank=2).adapter, tmp_path / "k.safetensors", "kohya")
    tensors = load_file(str(out))
    stripped = tmp_path / "plain.safetensors"
    save_file(tensors, str(stripped))  # no metadata at all, as after a third-party tool
    report = convert(stripped, tmp_path / "d.safetensors", "diffusers")
    assert report["name_source"] == "built-in SD UNet / CLIP lists"
    assert set(report["mapping"].values()) == expected_names()


def test_merge_to_kohya_of_old_naming_writes_lora_unet_keys(tmp_path: Path) -> None:
    source = old_naming_file(tmp_path / "old" / OLD)
    other = new_naming_file(tmp_path / "new.safetensors")
    out = tmp_path / "m.safetensors"
    result = run_cli("merge", str(source), str(other), "--to", "kohya", "-o", str(out))
    assert result.exit_code == 0, result.output
    keys = kohya_keys(out)
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    merged = load_adapter(out)
    assert merged.format == "kohya" and len(merged.modules) == len(BLOCKS) * len(PROJECTIONS)


def test_kohya_and_old_diffusers_files_align_across_formats(tmp_path: Path) -> None:
    old = load_adapter(old_naming_file(tmp_path / "old" / OLD))
    kohya_path = save_adapter(old, tmp_path / "k.safetensors", "kohya")
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(kohya_path)), str(plain))  # names only: resolved against the built-in SD lists
    kohya = load_adapter(plain)
    assert kohya.format == "kohya" and all(n.startswith("lora_unet_") for n in kohya.modules)
    assert sorted(alignment_keys(kohya).values()) == sorted(alignment_keys(old).values())
    result = merge_adapters([old, kohya], "cat", weights=[0.5, 0.5])
    assert result.report["num_modules"] == len(BLOCKS) * len(PROJECTIONS)
    assert all(row["ranks_in"] == [RANK, RANK] for row in result.report["modules"])


def test_old_naming_written_back_as_diffusers_stays_loadable(tmp_path: Path) -> None:
    """Written in its own format, an old file keeps its processor keys (diffusers' loaders still read them);
    a merge writes the newer unet.<path>.lora.* keys. Either way the module names read back are the same."""
    source = old_naming_file(tmp_path / "old" / OLD)
    adapter = load_adapter(source)
    truncated = save_adapter(truncate(adapter, rank=2).adapter, tmp_path / "t.safetensors")
    assert set(load_file(str(truncated))) == {k for k in load_file(str(source))}
    assert set(load_adapter(truncated).modules) == expected_names()
    merged = save_adapter(merge_adapters([adapter], "cat").adapter, tmp_path / "m.safetensors", "diffusers")
    keys = set(load_file(str(merged)))
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert set(load_adapter(merged).modules) == expected_names()
    report = convert(source, tmp_path / "c.safetensors", "diffusers")
    assert report["bit_exact_modules"] == len(BLOCKS) * len(PROJECTIONS)


def test_old_text_encoder_naming_maps_to_clip_projections(tmp_path: Path) -> None:
    """diffusers <= 0.16 text-encoder keys (``self_attn.to_q_lora``) name CLIP's q_proj/k_proj/v_proj/out_proj."""
    gen = torch.Generator().manual_seed(3)
    layer = "text_encoder.text_model.encoder.layers.0.self_attn"
    tensors = {f"{layer}.{p}_lora.{r}.weight": torch.randn(*((2, 8) if r == "down" else (8, 2)), generator=gen)
               for p in PROJECTIONS for r in ("down", "up")}
    path = tmp_path / OLD
    save_file(tensors, str(path))
    adapter = load_adapter(path)
    assert set(adapter.modules) == {f"{layer}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    out = save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    assert {k for k in kohya_keys(out) if k.endswith(".lora_down.weight")} == {
        f"lora_te_text_model_encoder_layers_0_self_attn_{p}.lora_down.weight"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def test_kohya_names_follow_the_component() -> None:
    mapping = kohya_names(["unet.down_blocks.0.resnets.0.conv1", "text_encoder.text_model.encoder.layers.0.mlp.fc1",
                           "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"], "diffusers")
    assert list(mapping.values()) == ["lora_unet_down_blocks_0_resnets_0_conv1",
                                      "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                      "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    # PEFT adapters: a UNet's paths get lora_unet_, an LLM's keep the bare lora_ prefix kohya uses for them.
    assert kohya_names(["down_blocks.0.attentions.0.proj_in", "model.layers.0.self_attn.q_proj"], "peft") == {
        "down_blocks.0.attentions.0.proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
        "model.layers.0.self_attn.q_proj": "lora_model_layers_0_self_attn_q_proj"}


def test_peft_to_kohya_through_truncate_converts_back_without_a_base(tmp_path: Path) -> None:
    """kohya names are lossy: truncate/merge --to kohya record the originals, as convert does."""
    folder = write_peft(tmp_path / "in", lora_tensors({"model.layers.0.self_attn.q_proj": (8, 8, 4),
                                                       "model.layers.0.mlp.down_proj": (8, 16, 4)}),
                        target_modules=["q_proj", "down_proj"])
    out = tmp_path / "k.safetensors"
    assert run_cli("truncate", str(folder), "--rank", "2", "--to", "kohya", "-o", str(out)).exit_code == 0
    with safe_open(str(out), "pt") as handle:
        assert META_NAMES in handle.metadata()
    report = convert(out, tmp_path / "p", "peft")
    assert set(report["mapping"].values()) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}


# --- the real SD-1.5 files (skip without ../shared/realdata) -------------------------------------------------

CAT = REALDATA / "diffusers-sd15-catundchat" / OLD
FLOWER = REALDATA / "diffusers-sd15-flower" / OLD


@requires_realdata("diffusers-sd15-catundchat", OLD)
@requires_realdata("diffusers-sd15-flower", OLD)
def test_real_old_and_new_sd15_files_merge_into_the_shared_modules() -> None:
    old, new = load_adapter(CAT), load_adapter(FLOWER)
    assert set(old.modules) == set(new.modules) and len(old.modules) == 128
    result = merge_adapters([old, new], "cat")
    assert result.report["num_modules"] == 128  # was a 256-module union
    assert all(row["ranks_in"] == [4, 4] for row in result.report["modules"])
    report = similarity(old, new, grids=False)
    assert report["num_common"] == 128 and report["only_in_a"] == report["only_in_b"] == 0


@requires_realdata("diffusers-sd15-catundchat", OLD)
def test_real_old_file_truncated_and_merged_to_kohya_reads_back(tmp_path: Path) -> None:
    truncated = tmp_path / "t.safetensors"
    assert run_cli("truncate", str(CAT), "--rank", "2", "--to", "kohya", "-o", str(truncated)).exit_code == 0
    merged = tmp_path / "m.safetensors"
    assert run_cli("merge", str(CAT), str(CAT), "--to", "kohya", "-o", str(merged)).exit_code == 0
    for out in (truncated, merged):
        keys = kohya_keys(out)
        assert len(keys) == 3 * 128 and all(k.startswith("lora_unet_") for k in keys)
        back = tmp_path / f"{out.stem}-back.safetensors"
        report = convert(out, back, "diffusers")
        assert report["bit_exact_modules"] == 128
        kohya, diffusers = load_file(str(out)), load_file(str(back))
        for flat, name in report["mapping"].items():
            assert name.startswith("unet.")
            for role in ("down", "up"):
                assert torch.equal(diffusers[f"{name}.lora.{role}.weight"], kohya[f"{flat}.lora_{role}.weight"])


def test_truncate_kohya_to_peft_writes_module_paths_not_flattened_names(tmp_path: Path) -> None:
    """A kohya file written --to peft used to keep its flattened names as PEFT module paths
    (base_model.model.lora_unet_down_blocks_...): keys no PEFT model has, written with exit 0."""
    kohya_file = save_adapter(truncate(load_adapter(old_naming_file(tmp_path / "old" / OLD)), rank=2).adapter,
                              tmp_path / "k.safetensors", "kohya")
    bare = tmp_path / "bare.safetensors"  # the same tensors without loratools' recorded names: names resolved
    save_file(load_file(str(kohya_file)), str(bare))
    out = tmp_path / "p"
    result = run_cli("truncate", str(bare), "--rank", "1", "--to", "peft", "-o", str(out))
    assert result.exit_code == 0, result.output
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    name = module_path(BLOCKS[0], "to_out")
    assert f"base_model.model.{name}.lora_A.weight" in keys, keys[:3]
    assert not any("lora_unet_" in k for k in keys)


def test_order_named_modules_are_not_written_as_peft(tmp_path: Path) -> None:
    from tests.test_lora_diffusion import lora_diffusion_file

    source = lora_diffusion_file(tmp_path / "ld.safetensors", conv=False, embed=False)
    result = run_cli("truncate", str(source), "--rank", "1", "--to", "peft", "-o", str(tmp_path / "p"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and not (tmp_path / "p").exists()
