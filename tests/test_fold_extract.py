"""fold == PEFT's merge_and_unload on tiny models; extract(fold(adapter)) recovers ΔW."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_tools.extract import extract
from lora_tools.fold import fold
from lora_tools.formats import load_adapter
from tests.conftest import MODEL_FACTORIES, make_peft_adapter
from tests.helpers import assert_one_line_error, run_cli


def saved_base(tmp_path: Path, model_name: str) -> Path:
    folder = tmp_path / f"{model_name}-base"
    MODEL_FACTORIES[model_name]().save_pretrained(str(folder), safe_serialization=True)
    return folder


def merged_state(adapter_path: Path, model_name: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(MODEL_FACTORIES[model_name](), str(adapter_path))
        return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


CASES = {
    "llama": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "rank_pattern": {"down_proj": 2}, "use_rslora": True},
    "gpt2": {"r": 2, "lora_alpha": 3, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    "llama-dora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"], "use_dora": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_equals_merge_and_unload(tmp_path: Path, case: str) -> None:
    model_name = case.split("-")[0]
    adapter_path, _ = make_peft_adapter(tmp_path, model_name, **CASES[case])
    base = saved_base(tmp_path, model_name)
    report = fold(load_adapter(adapter_path), base, tmp_path / "folded")
    assert report["num_modules"] == len(load_adapter(adapter_path).modules)
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    reference = merged_state(adapter_path, model_name)
    assert sorted(folded) == sorted(original)
    assert (tmp_path / "folded" / "config.json").is_file()
    changed = 0
    for key, tensor in folded.items():
        assert tensor.dtype == original[key].dtype
        if torch.equal(tensor, original[key]):
            continue
        changed += 1
        assert torch.allclose(tensor, reference[key], rtol=1e-5, atol=1e-6), key
    assert changed == report["num_modules"]


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_extract_of_fold_recovers_the_update(tmp_path: Path, model_name: str) -> None:
    kwargs: dict[str, Any] = CASES[model_name]
    adapter_path, _ = make_peft_adapter(tmp_path, model_name, **kwargs)
    base = saved_base(tmp_path, model_name)
    fold(load_adapter(adapter_path), base, tmp_path / "folded")
    extracted, report = extract(base, tmp_path / "folded", rank=kwargs["r"])
    original = load_adapter(adapter_path)
    assert set(extracted.modules) == set(original.modules)
    assert report["min_retained_energy"] > 1 - 1e-9
    for name, module in original.modules.items():
        expected = original.delta_weight(name, torch.float64)
        got = extracted.delta_weight(name, torch.float64)
        assert extracted.modules[name].kind == module.kind
        # The folded weights are float32: W_ft − W0 carries float32 rounding of W0 + ΔW.
        assert float(torch.linalg.matrix_norm(got - expected) / torch.linalg.matrix_norm(expected)) < 1e-5


def test_cli_extract_energy_and_fold_refusals(tmp_path: Path) -> None:
    adapter_path, _ = make_peft_adapter(tmp_path, "llama", r=4, lora_alpha=8, target_modules=["q_proj"])
    base = saved_base(tmp_path, "llama")
    assert run_cli("fold", str(adapter_path), "--base", str(base), "-o", str(tmp_path / "ft")).exit_code == 0
    result = run_cli("extract", "--base", str(base), "--finetuned", str(tmp_path / "ft"), "-o",
                     str(tmp_path / "x"), "--energy", "0.99", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_modules"] == 2 and all(r["retained_energy"] >= 0.99 for r in report["modules"])
    assert load_adapter(tmp_path / "x").format == "peft"
    (tmp_path / "g").mkdir()
    gpt2_adapter, _ = make_peft_adapter(tmp_path / "g", "gpt2", r=2, target_modules=["c_attn"])
    assert_one_line_error(run_cli("fold", str(gpt2_adapter), "--base", str(base), "-o", str(tmp_path / "bad")),
                          "no (unique) weight in the base model")
    assert not (tmp_path / "bad").exists()
    assert_one_line_error(run_cli("extract", "--base", str(base), "--finetuned", str(tmp_path / "ft"), "-o",
                                  str(tmp_path / "y")), "--rank R and --energy F")


def test_randomized_svd_path_keeps_the_exact_energy(monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tools.extract as extract_module
    from lora_tools.linalg.truncate import RankRule

    monkeypatch.setattr(extract_module, "EXACT_LIMIT", 8)  # force the randomized range finder on a small matrix
    gen = torch.Generator().manual_seed(0)
    D = (torch.randn(80, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 60, generator=gen,
                                                                              dtype=torch.float64)
         + 1e-3 * torch.randn(80, 60, generator=gen, dtype=torch.float64))
    U, S, Vh, kept, method = extract_module.truncated_svd(D, RankRule("fixed", 3))
    exact = torch.linalg.svdvals(D)
    assert method == "randomized"
    assert kept == pytest.approx(float(exact[:3].square().sum() / exact.square().sum()), rel=1e-9)
    assert torch.allclose(S, exact[:3], rtol=1e-8)
