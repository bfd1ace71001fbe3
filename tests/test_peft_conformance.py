"""Every field inspect reports is checked against PEFT's own modules: scaling, rank, ΔW and its spectrum."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch

from lora_tools.analysis import inspect_adapter
from lora_tools.formats import load_adapter

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4,
                                 lora_alpha=8)),
    "llama-rslora-patterns": ("llama", dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=8,
        lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, r"model\.layers\.0\.self_attn\.o_proj": 40})),
    "llama-dora": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=4, use_dora=True)),
    "bert-embedding": ("bert", dict(target_modules=["query", "key", "value", "dense", "word_embeddings"], r=4,
                                    lora_alpha=12)),
    "conv-bias": ("conv", dict(target_modules=["conv", "head"], r=3, lora_alpha=6, lora_bias=True)),
}


def peft_lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: mod for name, mod in model.base_model.model.named_modules() if isinstance(mod, LoraLayer)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_modules_scales_and_deltas_match_peft(peft_adapter: Any, case: str) -> None:
    model_name, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, model = peft_adapter(model_name, **kwargs)
    adapter = load_adapter(folder)
    layers = peft_lora_layers(model)
    assert set(adapter.modules) == set(layers)
    for name, layer in layers.items():
        module = adapter.modules[name]
        assert module.rank == layer.r["default"], name
        assert module.scale == pytest.approx(layer.scaling["default"], rel=1e-12), name
        expected = layer.get_delta_weight("default").detach().double()
        got = adapter.delta_weight(name, torch.float64)
        assert got.shape == expected.shape, name
        # PEFT forms the product in float32, ours is float64: compare at float32 accuracy of the largest entry.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert bool(layer.lora_magnitude_vector) == (module.magnitude_key is not None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reported_spectrum_matches_dense_float64_svd(peft_adapter: Any, case: str) -> None:
    model_name, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, model = peft_adapter(model_name, **kwargs)
    adapter = load_adapter(folder)
    report = inspect_adapter(adapter)
    layers = peft_lora_layers(model)
    for row in report["modules"]:
        dense = layers[row["name"]].get_delta_weight("default").detach().double()
        reference = torch.linalg.svdvals(dense.reshape(dense.shape[0], -1))
        ours = torch.tensor(row["singular_values"], dtype=torch.float64)
        k = min(len(ours), len(reference))
        # All r values are reported; those beyond min(out, in) must be zero.
        assert torch.all(ours[k:] == 0)
        rel = (ours[:k] - reference[:k]).abs().max() / reference[0]
        assert rel < 1e-5, (row["name"], float(rel))
        assert row["sigma_max"] == pytest.approx(float(reference[0]), rel=1e-5)
        assert row["fro_norm"] == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-5)
        assert row["scale"] == pytest.approx(layers[row["name"]].scaling["default"], rel=1e-12)
        assert row["rank"] == layers[row["name"]].r["default"]


def test_kinds_and_flags(peft_adapter: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, _ = peft_adapter("bert", **CASES["bert-embedding"][1])
    report = inspect_adapter(load_adapter(folder))
    kinds = {row["name"]: row["kind"] for row in report["modules"]}
    assert kinds["embeddings.word_embeddings"] == "embedding"
    assert kinds["encoder.layer.0.attention.self.query"] == "linear"
    emb = next(r for r in report["modules"] if r["name"] == "embeddings.word_embeddings")
    assert emb["weight_shape"] == [100, 32]  # (num_embeddings, dim)


def test_dora_is_flagged_with_a_warning(peft_adapter: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, _ = peft_adapter("llama", **CASES["llama-dora"][1])
    report = inspect_adapter(load_adapter(folder))
    assert all("dora" in row["flags"] for row in report["modules"])
    assert any("DoRA" in w for w in report["warnings"])


def test_conv1d_with_fan_in_fan_out_false_is_reported(peft_adapter: Any) -> None:
    """Real GPT-2 configs sometimes say fan_in_fan_out=false; PEFT transposes anyway and so must we."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, model = peft_adapter("gpt2", target_modules=["c_attn"], fan_in_fan_out=False, r=2)
    # PEFT fixes the flag in memory and saves true; real files in the wild still say false.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["fan_in_fan_out"] = False
    config_path.write_text(json.dumps(config))
    adapter = load_adapter(folder)
    report = inspect_adapter(adapter)
    assert all("fifo_mismatch" in row["flags"] for row in report["modules"])
    assert any("fan_in_fan_out=false" in w for w in report["warnings"])
    for name, layer in peft_lora_layers(model).items():
        torch.testing.assert_close(adapter.delta_weight(name, torch.float64),
                                   layer.get_delta_weight("default").double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_are_analysed_in_float64(peft_adapter: Any, dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, _ = peft_adapter("llama", target_modules=["q_proj"], r=4, save_dtype=dtype)
    adapter = load_adapter(folder)
    report = inspect_adapter(adapter)
    for row in report["modules"]:
        B, A = adapter.factors(row["name"], torch.float64)  # exact upcast of the stored values
        dense = adapter.modules[row["name"]].scale * (B @ A)
        reference = torch.linalg.svdvals(dense)[: row["rank"]]
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), reference,
                                   rtol=1e-9, atol=1e-12 * float(reference[0]))
        assert row["dtype"] == {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
