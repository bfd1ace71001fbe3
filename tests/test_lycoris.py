"""LyCORIS files read as exact LoRA: ΔW against LyCORIS' own modules, spectra against a dense SVD, the real LoKr
files, conversions back to plain LoRA, and the bad inputs of issue 10."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.analysis import inspect_adapter
from lora_tools.errors import (
    AdapterFormatError,
    LoraToolsError,
    ModuleMismatchError,
    UnsupportedAdapterError,
)
from lora_tools.formats import load_adapter, save_adapter
from tests.conftest import REALDATA, requires_realdata
from tests.helpers import assert_one_line_error, run_cli

LOKR_DIR = REALDATA / "lycoris-lokr-smart-falcon"
LOKR_FILES = ("smart_falcon_4_lokr", "smart_falcon_8_lokr", "smart_falcon_16_lokr")


class Net(torch.nn.Module):
    """Linear and conv layers of several shapes (3x3 conv for Tucker cores, 1x1 conv without)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(64, 96)
        self.lin1 = torch.nn.Linear(96, 40)
        self.conv = torch.nn.Conv2d(8, 12, 3)
        self.conv1 = torch.nn.Conv2d(12, 16, 1)


# LyCORIS wrapper name -> the kohya name the file gets, and the PEFT module path it converts to
PATHS = {"lycoris_lin0": "down_blocks.0.attentions.0.proj_in", "lycoris_lin1": "down_blocks.0.attentions.0.proj_out",
         "lycoris_conv": "down_blocks.0.resnets.0.conv1", "lycoris_conv1": "down_blocks.1.resnets.0.conv_shortcut"}
KOHYA = {k: "lora_unet_" + v.replace(".", "_") for k, v in PATHS.items()}
PEFT_NAME = {KOHYA[k]: v for k, v in PATHS.items()}
LIN0, CONV = KOHYA["lycoris_lin0"], KOHYA["lycoris_conv"]

# (algo, dim, alpha, extra create_lycoris kwargs)
CONFIGS = {
    "loha-tucker": ("loha", 4, 2.0, {"use_tucker": True}),
    "loha-rank1": ("loha", 1, 3.0, {}),
    "loha-dora": ("loha", 3, 1.5, {"dora_wd": True}),
    "lokr-both-factored": ("lokr", 2, 3.0, {"decompose_both": True, "factor": 8}),
    "lokr-full-w1": ("lokr", 2, 4.0, {"factor": 8}),
    "lokr-tucker": ("lokr", 2, 1.0, {"factor": 4, "use_tucker": True, "conv_dim": 2}),
    "lokr-rank1": ("lokr", 1, 0.5, {"decompose_both": True, "factor": 8}),
    "lokr-full-both": ("lokr", 100000, 100000.0, {"full_matrix": True}),
    "locon-tucker": ("locon", 4, 3.0, {"use_tucker": True}),
    "full": ("full", 4, 1.0, {}),
}


def lycoris_file(tmp: Path, config: str, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor], object]:
    """A file saved by LyCORIS' own network on Net, every parameter random; with the forward-pass ΔW of each
    module (float64), as LyCORIS' modules compute it."""
    lycoris = pytest.importorskip("lycoris")
    algo, dim, alpha, kwargs = CONFIGS[config]
    torch.manual_seed(seed)
    model = Net()
    network = lycoris.create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kwargs)
    network.apply_to()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.5)
    path = tmp / f"{config}-{seed}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    # kohya names of SD UNet layers instead of the wrapper's "lycoris_<attr>" (as sd-scripts' lycoris.kohya names
    # modules), so that PEFT/diffusers writers can resolve them
    save_file({KOHYA[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in load_file(str(path)).items()},
              str(path))
    deltas = {}
    with torch.no_grad():
        for module in network.loras:
            module.to(torch.float64)
            if algo in ("loha", "lokr"):
                # The forward pass: get_weight applies alpha/r once (get_diff_weight would apply it twice).
                delta = module.get_weight(module.shape) * module.scalar
            elif algo == "locon":
                delta = module.make_weight() * module.scale
            else:
                delta = module.get_diff_weight(1)[0]
            deltas[KOHYA[module.lora_name]] = delta.double()
    return path, deltas, network


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_delta_weight_matches_lycoris_modules(tmp_path: Path, config: str) -> None:
    path, deltas, _ = lycoris_file(tmp_path, config)
    adapter = load_adapter(path)
    assert adapter.format == "kohya" and sorted(adapter.modules) == sorted(deltas)
    expected_kind = {"locon": "locon-tucker"}.get(CONFIGS[config][0], CONFIGS[config][0])
    for name, reference in deltas.items():
        module = adapter.modules[name]
        ours = adapter.delta_weight(name, torch.float64).reshape(reference.shape)
        assert rel(ours, reference) <= 1e-6, (name, rel(ours, reference))
        B, A = adapter.factors(name, torch.float64)
        assert B.shape[1] == A.shape[0] == module.rank <= min(B.shape[0], A.shape[1])
        if expected_kind == "locon-tucker" and name != CONV:
            assert module.update_kind == "lora"  # LoCon without a core is plain LoRA
        else:
            assert module.update_kind == expected_kind


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_spectra_match_dense_svd(tmp_path: Path, config: str) -> None:
    path, deltas, _ = lycoris_file(tmp_path, config)
    adapter = load_adapter(path)
    report = inspect_adapter(adapter)
    for row in report["modules"]:
        ours = torch.tensor(row["singular_values"], dtype=torch.float64)
        assert ours.numel() == row["rank"]
        # against a dense float64 SVD of ΔW (the exactness of the spectrum path) ...
        dense = adapter.delta_weight(row["name"], torch.float64)
        S = torch.linalg.svdvals(dense.reshape(dense.shape[0], -1))
        k = min(ours.numel(), S.numel())
        assert torch.allclose(ours[:k], S[:k], rtol=0, atol=1e-9 * float(S[0])), row["name"]
        # ... and against LyCORIS' own ΔW (float32 parameters, hence 1e-6)
        reference = deltas[row["name"]]
        S_ref = torch.linalg.svdvals(reference.reshape(reference.shape[0], -1))
        assert torch.allclose(ours[:k], S_ref[:k], rtol=0, atol=1e-6 * float(S_ref[0])), row["name"]


def test_forward_pass_not_merge_path_sets_the_scale(tmp_path: Path) -> None:
    """LyCORIS' get_diff_weight (its merge path) scales LoHa by alpha/r twice; its forward pass once. We follow
    the forward pass: an input through the LyCORIS module changes by exactly x·ΔWᵀ."""
    path, _, network = lycoris_file(tmp_path, "loha-rank1")  # alpha 3, r 1: the two paths differ by 3x
    module = next(m for m in network.loras if m.lora_name == "lycoris_lin0")  # LIN0 in the file
    module.to(torch.float32)
    adapter = load_adapter(path)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        change = (module(x) - module.org_forward(x)).double()
        merge_delta = module.get_diff_weight(1)[0].double()
    ours = adapter.delta_weight(LIN0, torch.float64)
    assert rel(x.double() @ ours.T, change) <= 1e-5
    assert rel(merge_delta, ours * 3.0) <= 1e-6  # the merge path's extra alpha/r


def test_full_both_lokr_ignores_placeholder_alpha(tmp_path: Path) -> None:
    path, _, _ = lycoris_file(tmp_path, "lokr-full-both")
    adapter = load_adapter(path)
    assert all(m.scale == 1.0 for m in adapter.modules.values())
    assert any("placeholder" in w and "100000" in w for w in adapter.warnings)


def test_dora_scale_layout_is_read_from_its_shape(tmp_path: Path) -> None:
    path, _, _ = lycoris_file(tmp_path, "loha-dora")
    adapter = load_adapter(path)
    assert all("dora" in m.flags and "dora_out" in m.flags for m in adapter.modules.values())
    tensors = load_file(str(path))
    tensors[f"{LIN0}.dora_scale"] = torch.ones(1, 64)  # wd_on_out=False: (1, in)
    save_file(tensors, str(tmp_path / "in.safetensors"))
    assert "dora_in" in load_adapter(tmp_path / "in.safetensors").modules[LIN0].flags


@pytest.mark.parametrize("config", ["loha-tucker", "lokr-both-factored", "lokr-tucker", "locon-tucker", "full"])
@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_written_as_plain_lora_gives_the_same_delta(tmp_path: Path, config: str, to: str) -> None:
    path, deltas, _ = lycoris_file(tmp_path, config)
    adapter = load_adapter(path)
    out = save_adapter(adapter, tmp_path / ("out" if to == "peft" else "out.safetensors"), to)
    back = load_adapter(out)
    assert back.format == to and {m.update_kind for m in back.modules.values()} == {"lora"}
    for name, reference in deltas.items():
        out_name = PEFT_NAME[name] if to == "peft" else name
        assert back.modules[out_name].rank == adapter.modules[name].rank
        assert rel(back.delta_weight(out_name, torch.float64).reshape(reference.shape), reference) <= 1e-6


def test_truncate_at_full_rank_is_exact_and_lower_rank_is_eckart_young(tmp_path: Path) -> None:
    from lora_tools.truncate import truncate

    path, deltas, _ = lycoris_file(tmp_path, "loha-tucker")
    adapter = load_adapter(path)
    full = truncate(adapter, rank=10_000)
    for name, reference in deltas.items():
        assert rel(full.adapter.delta_weight(name, torch.float64).reshape(reference.shape), reference) <= 1e-6
    cut = truncate(adapter, rank=2)
    for name, reference in deltas.items():
        S = torch.linalg.svdvals(reference.reshape(reference.shape[0], -1))
        error = (cut.adapter.delta_weight(name, torch.float64).reshape(reference.shape) - reference).norm()
        assert float(error) == pytest.approx(float(S[2:].square().sum().sqrt()), rel=1e-6)


def test_cli_merge_similarity_and_truncate_accept_lycoris(tmp_path: Path) -> None:
    loha, loha_deltas, _ = lycoris_file(tmp_path, "loha-tucker")
    other, other_deltas, _ = lycoris_file(tmp_path, "loha-tucker", seed=5)
    lokr, _, _ = lycoris_file(tmp_path, "lokr-both-factored")
    result = run_cli("merge", str(loha), str(other), "-o", str(tmp_path / "m.safetensors"))
    assert result.exit_code == 0, result.output
    merged = load_adapter(tmp_path / "m.safetensors")
    for name in loha_deltas:
        expected = loha_deltas[name] + other_deltas[name]
        assert rel(merged.delta_weight(name, torch.float64).reshape(expected.shape), expected) <= 1e-6
    result = run_cli("similarity", str(loha), str(loha), "--json")
    assert result.exit_code == 0, result.output
    assert all(row["cosine"] == pytest.approx(1.0) for row in json.loads(result.stdout)["modules"])
    result = run_cli("truncate", str(lokr), "-o", str(tmp_path / "t.safetensors"), "--rank", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert {m.rank for m in load_adapter(tmp_path / "t.safetensors").modules.values()} == {2}
    result = run_cli("inspect", str(loha), "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["updates"] == {"loha": 4} and report["modules"][0]["update_detail"]["file_alpha"] == 2.0


def test_writing_lycoris_and_kohya_reader_refuse_with_a_pointer(tmp_path: Path) -> None:
    from lora_tools.formats import kohya

    path, _, _ = lycoris_file(tmp_path, "loha-rank1")
    with pytest.raises(UnsupportedAdapterError, match="convert --to kohya"):
        save_adapter(load_adapter(path), tmp_path / "x.safetensors", "lycoris")
    with pytest.raises(UnsupportedAdapterError, match="without --format"):
        kohya.read(path)


# --- real files -----------------------------------------------------------------------------------------------


def _kron_reference(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW by ComfyUI's rule, written out independently: kron(W1, W2)·alpha/dim."""
    t = {k[len(name) + 1:]: v.double() for k, v in tensors.items() if k.startswith(name + ".")}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0]
    return torch.kron(w1, w2.flatten(1)) * float(t["alpha"]) / dim


@requires_realdata("lycoris-lokr-smart-falcon")
@pytest.mark.parametrize("stem", LOKR_FILES)
def test_real_lokr_files(stem: str) -> None:
    path = LOKR_DIR / f"{stem}.safetensors"
    adapter = load_adapter(path)
    tensors = load_file(str(path))
    dim = int(stem.split("_")[2])
    assert adapter.format == "kohya" and len(adapter.modules) == 350
    assert {m.update_kind for m in adapter.modules.values()} == {"lokr"}
    report = inspect_adapter(adapter)
    rows = {row["name"]: row for row in report["modules"]}
    # every kind of layer, kept to those whose dense SVD is quick (the 1280 x 11520 convs take seconds each)
    small = [n for n, m in adapter.modules.items() if m.out_features * m.in_features <= 1_000_000]
    assert len(small) > 100
    for name in small[::12]:
        module = adapter.modules[name]
        reference = _kron_reference(tensors, name)
        assert module.rank == dim * dim  # rank(W1)·rank(W2), both sides factored at rank dim
        assert rel(adapter.delta_weight(name, torch.float64).reshape(reference.shape), reference) <= 1e-6
        S = torch.linalg.svdvals(reference)
        ours = torch.tensor(rows[name]["singular_values"], dtype=torch.float64)
        assert torch.allclose(ours, S[: ours.numel()], rtol=0, atol=1e-9 * float(S[0]))


@requires_realdata("lycoris-lokr-smart-falcon")
def test_real_lokr_converts_to_peft_lora_exactly(tmp_path: Path) -> None:
    from lora_tools.convert.run import convert

    source = LOKR_DIR / "smart_falcon_4_lokr.safetensors"
    report = convert(source, tmp_path / "te", "peft", prefix="te")
    assert report["max_rel_difference"] <= 1e-6
    original, converted = load_adapter(source), load_adapter(tmp_path / "te")
    assert {m.update_kind for m in converted.modules.values()} == {"lora"}
    for name, out_name in list(report["mapping"].items())[::10]:
        expected = original.delta_weight(name, torch.float64)
        assert rel(converted.delta_weight(out_name, torch.float64), expected) <= 1e-6


# --- bad inputs -----------------------------------------------------------------------------------------------


def _file(tmp: Path, tensors: dict[str, torch.Tensor], name: str = "bad.safetensors") -> Path:
    save_file({f"lora_unet_x.{k}": v for k, v in tensors.items()}, str(tmp / name))
    return tmp / name


R = torch.randn
BAD = {
    "loha-chain": ({"hada_w1_a": R(8, 2), "hada_w1_b": R(3, 6), "hada_w2_a": R(8, 2), "hada_w2_b": R(2, 6)},
                   ModuleMismatchError, ("hada_w1_a", "do not chain")),
    "loha-half": ({"hada_w1_a": R(8, 2), "hada_w1_b": R(2, 6), "hada_w2_a": R(8, 2)},
                  AdapterFormatError, ("LoHa", "hada_w2_b", "half a pair")),
    "loha-tucker-rank": ({"hada_w1_a": R(2, 8), "hada_w1_b": R(2, 4), "hada_w2_a": R(2, 8), "hada_w2_b": R(2, 4),
                          "hada_t1": R(3, 2, 3, 3), "hada_t2": R(2, 2, 3, 3)},
                         ModuleMismatchError, ("hada_t1", "Tucker core")),
    "lokr-w1-3d": ({"lokr_w1": R(2, 2, 2), "lokr_w2": R(4, 3)}, AdapterFormatError, ("lokr_w1", "2-D")),
    "lokr-half": ({"lokr_w1": R(2, 2)}, AdapterFormatError, ("LoKr", "lokr_w2", "half a Kronecker pair")),
    "lokr-half-factor": ({"lokr_w1_a": R(2, 1), "lokr_w2": R(4, 3)}, AdapterFormatError, ("lokr_w1_b",)),
    "lokr-chain": ({"lokr_w1": R(2, 2), "lokr_w2_a": R(4, 2), "lokr_w2_b": R(3, 6)},
                   ModuleMismatchError, ("lokr_w2_a", "do not chain")),
    "lokr-not-the-layer": ({"lokr_w1": R(2, 2), "lokr_w2": R(4, 3), "dora_scale": R(6, 1)},
                           ModuleMismatchError, ("dora_scale", "8 x 6")),
    "locon-mid-rank": ({"lora_down.weight": R(4, 8, 1, 1), "lora_up.weight": R(12, 4, 1, 1),
                        "lora_mid.weight": R(3, 4, 3, 3)}, ModuleMismatchError, ("lora_mid", "wrong rank")),
    "mixed": ({"lora_down.weight": R(2, 6), "lora_up.weight": R(8, 2), "hada_w1_a": R(8, 2), "hada_w1_b": R(2, 6),
               "hada_w2_a": R(8, 2), "hada_w2_b": R(2, 6)}, AdapterFormatError, ("mixes", "LoHa", "LoRA")),
    "alpha-zero": ({"hada_w1_a": R(8, 2), "hada_w1_b": R(2, 6), "hada_w2_a": R(8, 2), "hada_w2_b": R(2, 6),
                    "alpha": torch.tensor(0.0)}, AdapterFormatError, ("alpha is 0", "positive")),
    "alpha-negative": ({"lokr_w1_a": R(2, 1), "lokr_w1_b": R(1, 2), "lokr_w2": R(4, 3), "alpha": torch.tensor(-2.0)},
                       AdapterFormatError, ("alpha is -2",)),
    "lokr-t1": ({"lokr_w1": R(2, 2), "lokr_w2": R(4, 3), "lokr_t1": R(2, 2, 1, 1)}, UnsupportedAdapterError,
                ("lokr_t1",)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lycoris_files(tmp_path: Path, case: str) -> None:
    tensors, error, fragments = BAD[case]
    path = _file(tmp_path, tensors)
    with pytest.raises(error) as caught:
        load_adapter(path)
    message = str(caught.value)
    assert str(path) in message and "lora_unet_x" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", ["loha-half", "lokr-not-the-layer", "mixed"])
def test_bad_lycoris_files_through_the_cli(tmp_path: Path, case: str) -> None:
    path = _file(tmp_path, BAD[case][0])
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("truncate", str(path), "-o", str(out), "--rank", "1"), "bad.safetensors")
    assert not out.exists()


def test_nan_factors_are_flagged_and_refused(tmp_path: Path) -> None:
    w1a = R(3072, 2)
    w1a[1, 1] = float("nan")
    path = tmp_path / "bad.safetensors"  # a CLIP module name, so that convert resolves it
    save_file({f"lora_te_text_model_encoder_layers_0_mlp_fc1.{k}": v for k, v in
               {"hada_w1_a": w1a, "hada_w1_b": R(2, 768), "hada_w2_a": R(3072, 2), "hada_w2_b": R(2, 768)}.items()},
              str(path))
    row = inspect_adapter(load_adapter(path))["modules"][0]
    assert "nonfinite" in row["flags"] and row["singular_values"] == [None] * row["rank"]
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("truncate", str(path), "-o", str(out), "--rank", "1"), "NaN")
    assert not out.exists()
    result = run_cli("convert", str(path), "-o", str(tmp_path / "c.safetensors"), "--to", "kohya")
    assert result.exit_code == 1 and "NaN" in result.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_still_refused_kinds_name_what_was_found(tmp_path: Path) -> None:
    for key, kind in (("oft_blocks", "OFT"), ("on_input", "IA3"), ("a1.weight", "GLoRA")):
        path = _file(tmp_path, {key: R(4, 4), "hada_w1_a": R(8, 2)}, f"{kind}.safetensors")
        with pytest.raises(LoraToolsError, match=kind):
            load_adapter(path)


# --- PEFT LoHa / LoKr folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-tucker"])
def test_peft_loha_lokr_folders_match_peft_delta_weight(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("peft")
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    torch.manual_seed(0)
    model = Net()
    targets = ["lin0", "lin1", "conv"]
    if kind == "loha":
        config = LoHaConfig(r=4, alpha=3, target_modules=targets, init_weights=False, use_effective_conv2d=True,
                            rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 5})
    else:
        config = LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, decompose_both=True,
                            decompose_factor=4, use_effective_conv2d=kind == "lokr-tucker")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / kind)
    adapter = load_adapter(tmp_path / kind)
    assert adapter.format == "peft" and adapter.config["peft_type"] == "LORA"
    assert adapter.source_config["peft_type"] == config.peft_type.value
    with torch.no_grad():
        for name in targets:
            expected = getattr(peft_model.base_model.model, name).get_delta_weight("default").double()
            ours = adapter.delta_weight(name, torch.float64).reshape(expected.shape)
            assert adapter.modules[name].update_kind == kind.split("-")[0]
            assert rel(ours, expected) <= 1e-6, name
    back = load_adapter(save_adapter(adapter, tmp_path / "lora"))  # a PEFT LoRA folder now
    for name in targets:
        expected = adapter.delta_weight(name, torch.float64)
        assert back.modules[name].update_kind == "lora"
        assert rel(back.delta_weight(name, torch.float64), expected) <= 1e-6


def test_peft_loha_rank_pattern_disagreeing_with_tensors_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "loha"
    folder.mkdir()
    save_file({f"base_model.model.q.{k}": v for k, v in
               {"hada_w1_a": R(8, 2), "hada_w1_b": R(2, 6), "hada_w2_a": R(8, 2), "hada_w2_b": R(2, 6)}.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4, "alpha": 4}))
    with pytest.raises(ModuleMismatchError, match="says rank 4 but the tensors have rank 2"):
        load_adapter(folder)


@pytest.mark.parametrize("layout", ["out", "in"])
def test_fold_applies_lycoris_dora_scale_on_its_own_axis(tmp_path: Path, layout: str) -> None:
    """A (1, in) dora_scale normalises columns, a (out, 1) one rows: LyCORIS' own weight_decompose is the
    reference (a square layer makes the wrong axis a silent error)."""
    general = pytest.importorskip("lycoris.functional.general")
    from lora_tools.fold import folded_weight

    path, _, _ = lycoris_file(tmp_path, "loha-dora")
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(7)
    # lin0 is 96 x 64: give it a scale of the chosen layout
    tensors[f"{LIN0}.dora_scale"] = (torch.rand(96, 1, generator=gen) + 0.5 if layout == "out"
                                     else torch.rand(1, 64, generator=gen) + 0.5)
    save_file(tensors, str(tmp_path / "d.safetensors"))
    adapter = load_adapter(tmp_path / "d.safetensors")
    module = adapter.modules[LIN0]
    assert f"dora_{layout}" in module.flags
    W0 = torch.randn(96, 64, generator=gen)
    ours = folded_weight(adapter, module, W0)
    reference = general._weight_decompose(W0 + adapter.delta_weight(LIN0, torch.float32),
                                          tensors[f"{LIN0}.dora_scale"], 1, layout == "out")
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_compare_quant_says_structured_updates_are_compared_as_exact_lora(tmp_path: Path) -> None:
    path, _, _ = lycoris_file(tmp_path, "loha-tucker")
    result = run_cli("compare-quant", str(path), "--calib", "random", "--max-tokens", "400", "--json")
    assert result.exit_code == 0, result.output
    note = json.loads(result.stdout)["update_note"]
    assert "loha" in note and "exact LoRA form" in note and "note: " in result.stderr
