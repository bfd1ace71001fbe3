"""PEFT AdaLoRA folders (peft_type ADALORA): ΔW = B·diag(E)·A · lora_alpha/(init_r + 1e-5), pruned E dropped.

References: PEFT's own regression fixture (its maintainers' recorded model output) and adapters saved here by
the installed PEFT, whose ``get_delta_weight`` is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_tools.analysis import inspect_adapter
from lora_tools.errors import AdapterFormatError, LoraToolsError, ModuleMismatchError
from lora_tools.formats import load_adapter, save_adapter
from tests.conftest import REALDATA, requires_realdata

FIXTURE = REALDATA / "peft-regression/adalora_mlp/0.6.1"


def adalora_folder(folder: Path, E: torch.Tensor, *, out: int = 7, inp: int = 5, seed: int = 0,
                   **config: object) -> Path:
    gen = torch.Generator().manual_seed(seed)
    r = E.shape[0]
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"base_model.model.lin0.lora_A": torch.randn(r, inp, generator=gen),
               "base_model.model.lin0.lora_B": torch.randn(out, r, generator=gen),
               "base_model.model.lin0.lora_E": E.reshape(r, 1).float()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ADALORA", "init_r": r, "lora_alpha": 8, "target_modules": ["lin0"], **config}))
    return folder


def dense(folder: Path, init_r: int, lora_alpha: float) -> torch.Tensor:
    from safetensors.torch import load_file

    t = {k.split(".")[-1]: v.double() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    return t["lora_B"] @ (t["lora_A"] * t["lora_E"]) * lora_alpha / (init_r + 1e-5)


@requires_realdata("peft-regression", "adalora_mlp", "0.6.1")
def test_peft_fixture_reproduces_the_recorded_output() -> None:
    """The MLP of PEFT's regression test rebuilt under seed 0, our ΔW merged into lin0: PEFT's recorded output."""
    adapter = load_adapter(FIXTURE)
    module = adapter.modules["lin0"]
    assert (adapter.format, module.update_kind, module.rank) == ("peft", "adalora", 10)  # init_r 12 > in 10
    assert module.scale == pytest.approx(8 / (12 + 1e-5), rel=1e-15)
    torch.manual_seed(0)
    lin0, lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
    x = torch.arange(90).reshape(9, 10).double()
    weight = lin0.weight.double() + adapter.delta_weight("lin0", torch.float64)
    hidden = torch.relu(x @ weight.T + lin0.bias.double())
    output = torch.log_softmax(hidden @ lin1.weight.double().T + lin1.bias.double(), dim=-1)
    expected = torch.load(FIXTURE / "output.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(output.float(), expected, rtol=1e-6, atol=1e-5)  # float32 logits ~1e2
    # Without PEFT's + 1e-5 in the denominator the update would be off by 8e-7 relative: tell them apart.
    assert "1e-5" in adapter.scale_rule


@requires_realdata("peft-regression", "adalora_mlp", "0.6.1")
def test_peft_fixture_spectrum_matches_dense_svd() -> None:
    adapter = load_adapter(FIXTURE)
    row = inspect_adapter(adapter)["modules"][0]
    S = torch.linalg.svdvals(adapter.delta_weight("lin0", torch.float64))
    ours = torch.tensor(row["singular_values"], dtype=torch.float64)
    assert row["update"] == "adalora"
    assert torch.allclose(ours, S[: ours.numel()], rtol=0, atol=1e-12 * float(S[0]))


def test_against_peft_get_delta_weight(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin0", torch.nn.Linear(12, 20))
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=5, target_modules=["lin0"], init_lora_weights=False,
                           total_step=10)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.lin0
    with torch.no_grad():
        layer.lora_E["default"][[1, 4]] = 0.0  # what AdaLoRA's budget masking leaves behind
    peft_model.save_pretrained(tmp_path / "ada")
    adapter = load_adapter(tmp_path / "ada")
    expected = layer.get_delta_weight("default").detach().double()
    ours = adapter.delta_weight("lin0", torch.float64)
    assert adapter.modules["lin0"].rank == 4  # two pruned directions dropped
    assert float((ours - expected).norm() / expected.norm()) <= 1e-6
    assert peft.__version__


def test_pruned_directions_give_a_smaller_exact_lora(tmp_path: Path) -> None:
    folder = adalora_folder(tmp_path / "a", torch.tensor([1.5, 0.0, -0.7, 0.0, 2.0]))
    adapter = load_adapter(folder)
    module = adapter.modules["lin0"]
    B, A = adapter.factors("lin0", torch.float64)
    assert module.rank == 3 and B.shape == (7, 3) and A.shape == (3, 5)
    reference = dense(folder, 5, 8)
    assert torch.allclose(adapter.delta_weight("lin0", torch.float64), reference, rtol=0, atol=1e-12)
    # written as PEFT LoRA (rank 3) and read back: the same ΔW
    out = save_adapter(adapter, tmp_path / "lora")
    back = load_adapter(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and back.modules["lin0"].update_kind == "lora"
    assert back.modules["lin0"].rank == 3
    assert float((back.delta_weight("lin0", torch.float64) - reference).norm() / reference.norm()) <= 1e-6


def test_all_pruned_is_a_zero_update(tmp_path: Path) -> None:
    adapter = load_adapter(adalora_folder(tmp_path / "a", torch.zeros(3)))
    row = inspect_adapter(adapter)["modules"][0]
    assert row["rank"] == 1 and "zero_update" in row["flags"] and row["fro_norm"] == 0


def test_lora_alpha_zero_means_init_r_like_peft(tmp_path: Path) -> None:
    adapter = load_adapter(adalora_folder(tmp_path / "a", torch.ones(4), lora_alpha=0))
    assert adapter.modules["lin0"].scale == pytest.approx(4 / (4 + 1e-5), rel=1e-15)


@pytest.mark.parametrize(("tensors", "config", "fragments"), [
    ({"lora_E": torch.ones(3, 1)}, {}, ("lin0", "lora_A")),
    ({"lora_A": torch.ones(3, 5), "lora_B": torch.ones(7, 2), "lora_E": torch.ones(3, 1)}, {}, ("do not chain",)),
    ({"lora_A": torch.ones(3, 5), "lora_B": torch.ones(7, 3), "lora_E": torch.ones(3, 1)}, {"init_r": 4},
     ("init_r is 4", "3 rows")),
    ({"lora_A": torch.ones(3, 5), "lora_B": torch.ones(7, 3), "lora_E": torch.ones(3, 1),
      "hada_w1_a": torch.ones(7, 2)}, {}, ("LyCORIS",)),
], ids=["half", "chain", "init-r", "mixed"])
def test_bad_adalora_folders(tmp_path: Path, tensors: dict, config: dict, fragments: tuple[str, ...]) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file({f"base_model.model.lin0.{k}": v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "init_r": 3, "lora_alpha": 8,
                                                            **config}))
    with pytest.raises(LoraToolsError) as caught:
        load_adapter(folder)
    assert isinstance(caught.value, (AdapterFormatError, ModuleMismatchError))
    for fragment in fragments:
        assert fragment in str(caught.value)
