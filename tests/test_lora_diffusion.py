"""cloneofsimo lora_diffusion files: the safetensors form is read (modules by order), the pickled list refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_tools.convert.run import alignment_keys, convert
from lora_tools.errors import (
    AdapterFormatError,
    ModuleMismatchError,
    UnsafeFileError,
    UnsupportedAdapterError,
)
from lora_tools.formats import detect, load_adapter, save_adapter
from tests.helpers import assert_one_line_error, run_cli

UNET_TARGETS = ["CrossAttention", "Attention", "GEGLU"]
# (out, in, rank) per unet module, then one 3x3 conv (the extended targets patch ResnetBlock2D convs too).
UNET = [(16, 8, 4), (16, 8, 4), (8, 16, 2)]


def lora_diffusion_file(path: Path, *, drop: str | None = None, metadata: dict[str, str] | None = None,
                        conv: bool = True, embed: bool = True) -> Path:
    """The layout of lora_diffusion's save_safeloras_with_embeds: <model>:<i>:up/down, ranks and targets in
    the metadata, embeddings flagged "<embed>"."""
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    meta = {"unet": json.dumps(UNET_TARGETS + (["ResnetBlock2D"] if conv else [])),
            "text_encoder": json.dumps(["CLIPAttention"])}
    for i, (out, inp, rank) in enumerate(UNET):
        tensors[f"unet:{i}:up"] = torch.randn(out, rank, generator=gen).half()  # fp16, as lora_diffusion saves
        tensors[f"unet:{i}:down"] = torch.randn(rank, inp, generator=gen).half()
        meta[f"unet:{i}:rank"] = str(rank)
    if conv:
        i = len(UNET)
        tensors[f"unet:{i}:up"] = torch.randn(6, 2, 1, 1, generator=gen).half()
        tensors[f"unet:{i}:down"] = torch.randn(2, 4, 3, 3, generator=gen).half()
        meta[f"unet:{i}:rank"] = "2"
    tensors["text_encoder:0:up"] = torch.randn(8, 1, generator=gen)
    tensors["text_encoder:0:down"] = torch.randn(1, 8, generator=gen)
    meta["text_encoder:0:rank"] = "1"
    if embed:
        tensors["<krk>"] = torch.randn(768, generator=gen)
        meta["<krk>"] = "<embed>"
    if drop:
        tensors.pop(drop, None)
        meta.pop(drop, None)
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return path


def parse_like_lora_diffusion(path: Path) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]]:
    """An independent reading of the layout (per model: (up, down, rank) in index order), to check our writes."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for key in handle.keys():
            if metadata.get(key) == "<embed>":
                continue
            model, index, direction = key.split(":")
            assert json.loads(metadata[model])  # target classes present
            found.setdefault(model, {}).setdefault(int(index), {})[direction] = handle.get_tensor(key)
    result = {}
    for model, entries in found.items():
        assert sorted(entries) == list(range(len(entries)))
        result[model] = [(entries[i]["up"], entries[i]["down"], int(metadata[f"{model}:{i}:rank"]))
                         for i in range(len(entries))]
    return result


def test_safetensors_form_reads_modules_by_order(tmp_path: Path) -> None:
    path = lora_diffusion_file(tmp_path / "lora.safetensors")
    assert detect(path) == "lora_diffusion"
    adapter = load_adapter(path)
    assert adapter.format == "lora_diffusion"
    assert list(adapter.modules) == ["text_encoder:0", "unet:0", "unet:1", "unet:2", "unet:3"]
    assert [adapter.modules[f"unet:{i}"].rank for i in range(4)] == [4, 4, 2, 2]
    assert adapter.modules["unet:3"].kind == "conv" and adapter.modules["unet:3"].weight_shape == (6, 4, 3, 3)
    assert all(m.scale == 1.0 for m in adapter.modules.values())
    with safe_open(str(path), "pt") as handle:
        up, down = handle.get_tensor("unet:1:up"), handle.get_tensor("unet:1:down")
    torch.testing.assert_close(adapter.delta_weight("unet:1", torch.float64),
                               up.double() @ down.double(), rtol=0, atol=0)
    assert [info.key for info in adapter.extra_tensors] == ["<krk>"]
    assert any("identified by order" in w and "CrossAttention" in w for w in adapter.warnings)
    assert any("textual-inversion" in w for w in adapter.warnings)


def test_inspect_says_modules_are_identified_by_order(tmp_path: Path) -> None:
    path = lora_diffusion_file(tmp_path / "lora.safetensors")
    result = run_cli("inspect", str(path))
    assert result.exit_code == 0, result.output
    assert "lora_diffusion" in result.stdout and "identified by order" in result.output
    assert "unet:3" in result.stdout
    report = json.loads(run_cli("inspect", str(path), "--json").stdout)
    assert report["num_modules"] == 5
    assert "scale 1" in report["scale_rule"]


@pytest.mark.parametrize(("change", "error", "fragment"), [
    ({"metadata": {"unet:1:rank": "8"}}, ModuleMismatchError, "metadata unet:1:rank says rank 8"),
    ({"metadata": {"unet:1:rank": "four"}}, AdapterFormatError, "not an integer rank"),
    ({"drop": "unet"}, AdapterFormatError, "no metadata entry 'unet'"),
    ({"metadata": {"unet": "CrossAttention"}}, AdapterFormatError, "JSON list of class names"),
    ({"drop": "unet:1:up"}, ModuleMismatchError, "unet:1 has a LoRA down factor but no up factor"),
])
def test_inconsistent_files_are_refused(tmp_path: Path, change: dict, error: type, fragment: str) -> None:
    path = lora_diffusion_file(tmp_path / "lora.safetensors", **change)
    with pytest.raises(error, match=fragment):
        load_adapter(path)


def test_a_gap_in_the_order_is_refused(tmp_path: Path) -> None:
    path = lora_diffusion_file(tmp_path / "lora.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    del tensors["unet:1:up"], tensors["unet:1:down"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AdapterFormatError, match="index 1 is missing"):
        load_adapter(path)


def test_missing_rank_metadata_is_a_warning(tmp_path: Path) -> None:
    path = lora_diffusion_file(tmp_path / "lora.safetensors", drop="unet:0:rank")
    adapter = load_adapter(path)
    assert adapter.modules["unet:0"].rank == 4
    assert any("no <model>:<i>:rank" in w for w in adapter.warnings)


def test_pickled_list_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "lora_weight.pt"
    torch.save([torch.randn(8, 4).half(), torch.randn(4, 8).half()], path)  # save_lora_weight's layout
    with pytest.raises(UnsupportedAdapterError, match="cloneofsimo lora_diffusion pickled list of 2 tensors"):
        load_adapter(path)
    assert_one_line_error(run_cli("inspect", str(path)), "lora_diffusion pickled list", "re-save it as safetensors")
    folder = tmp_path / "run"
    folder.mkdir()
    path.rename(folder / "lora_weight.pt")
    assert_one_line_error(run_cli("inspect", str(folder)), "lora_diffusion pickled list")


class _Hostile:
    """Unpickling this calls open(marker, 'w'): weights_only loading must refuse it before anything runs."""

    marker = ""

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_pickle_with_objects_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = _Hostile()
    hostile.marker = str(marker)
    path = tmp_path / "lora_weight.pt"
    torch.save([torch.randn(8, 4), hostile], path)
    with pytest.raises(UnsafeFileError):
        load_adapter(path)
    assert not marker.exists()


def test_truncate_writes_the_layout_back_with_new_ranks(tmp_path: Path) -> None:
    source = lora_diffusion_file(tmp_path / "lora.safetensors")
    adapter = load_adapter(source)
    out = tmp_path / "small.safetensors"
    result = run_cli("truncate", str(source), "--rank", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    parsed = parse_like_lora_diffusion(out)
    assert [len(parsed["unet"]), len(parsed["text_encoder"])] == [4, 1]
    for model, entries in parsed.items():
        for i, (up, down, rank) in enumerate(entries):
            assert rank == down.shape[0] == up.shape[1] == 1
            name = f"{model}:{i}"
            svd = torch.linalg.svd(adapter.delta_weight(name, torch.float64).reshape(up.shape[0], -1))
            best = svd.S[0] * torch.outer(svd.U[:, 0], svd.Vh[0])
            got = up.double().reshape(up.shape[0], -1) @ down.double().reshape(1, -1)
            assert float((got - best).norm() / best.norm()) < 2e-3  # fp16 factors
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
        assert "<krk>" in handle.keys() and metadata["<krk>"] == "<embed>"
    assert json.loads(metadata["unet"])[:3] == UNET_TARGETS


def test_a_scale_other_than_one_is_folded_into_up(tmp_path: Path) -> None:
    adapter = load_adapter(lora_diffusion_file(tmp_path / "lora.safetensors", conv=False, embed=False))
    expected = adapter.delta_weight("unet:0", torch.float64) * 0.5
    adapter.modules["unet:0"].scale = 0.5
    out = save_adapter(adapter, tmp_path / "half.safetensors")
    written = load_adapter(out)
    assert written.modules["unet:0"].scale == 1.0
    assert float((written.delta_weight("unet:0", torch.float64) - expected).norm() / expected.norm()) < 1e-3


def test_other_formats_cannot_name_or_write_order_identified_modules(tmp_path: Path) -> None:
    source = lora_diffusion_file(tmp_path / "lora.safetensors")
    adapter = load_adapter(source)
    with pytest.raises(UnsupportedAdapterError, match="identified by their order"):
        convert(source, tmp_path / "k.safetensors", "kohya")
    assert_one_line_error(run_cli("truncate", str(source), "--rank", "1", "--to", "kohya", "-o",
                                  str(tmp_path / "k.safetensors")), "identifies them by order")
    assert not (tmp_path / "k.safetensors").exists()
    assert set(alignment_keys(adapter).values()) == {f"lora_diffusion:{n}" for n in adapter.modules}
    peft_like = load_adapter(lora_diffusion_file(tmp_path / "other.safetensors"))
    peft_like.format = "peft"
    with pytest.raises(UnsupportedAdapterError, match="writing a peft adapter as lora_diffusion"):
        save_adapter(peft_like, tmp_path / "x.safetensors", "lora_diffusion")
    adapter.metadata = {}
    with pytest.raises(UnsupportedAdapterError, match="no target class list"):
        save_adapter(adapter, tmp_path / "y.safetensors")
