"""fold keeps the adapter's modules_to_save copies (classification heads), so fold == PEFT's merge_and_unload."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.errors import ModuleMismatchError
from lora_tools.fold import fold, head_tensor_name
from lora_tools.formats import load_adapter
from tests.conftest import REALDATA, requires_realdata
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft


def seq_cls_model(kind: str, num_labels: int = 3) -> torch.nn.Module:
    """A tiny sequence-classification model, deterministic (seed 0), with a random untrained head."""
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification

        return GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                        n_positions=64, num_labels=num_labels,
                                                        pad_token_id=0)).eval()
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100,
                                                    max_position_embeddings=64, num_labels=num_labels)).eval()


# task_type SEQ_CLS adds the head (score / classifier) to modules_to_save; one more module is listed explicitly.
LORA = {
    "gpt2": {"target_modules": ["c_attn"], "fan_in_fan_out": True, "modules_to_save": ["ln_f"]},
    "bert": {"target_modules": ["query", "value"], "modules_to_save": ["pooler"]},
}


def seq_cls_adapter(folder: Path, kind: str, seed: int, head_seed: int | None = None) -> tuple[Path, Any]:
    """Save a SEQ_CLS PEFT adapter with random non-zero B and modules_to_save copies that differ from the base's
    (as after training); ``head_seed`` fixes the copies separately (equal seeds: identical heads)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    base = seq_cls_model(kind)  # seeds 0 itself
    torch.manual_seed(seed)  # the LoRA factors' init
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, init_lora_weights=False,
                                            **LORA[kind]))
    generator = torch.Generator().manual_seed(seed if head_seed is None else head_seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                for param in module.modules_to_save["default"].parameters():
                    param.add_(torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder))
    return folder, model


def merged_reference(model: Any) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_fold_equals_merge_and_unload_with_heads(tmp_path: Path, kind: str) -> None:
    base = tmp_path / "base"
    seq_cls_model(kind).save_pretrained(str(base), safe_serialization=True)
    adapter_path, model = seq_cls_adapter(tmp_path / "adapter", kind, seed=1)
    adapter = load_adapter(adapter_path)
    assert adapter.extra_tensors, "PEFT saved no modules_to_save copy: the test would prove nothing"
    report = fold(adapter, base, tmp_path / "folded")
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    reference = merged_reference(model)
    head = "score.weight" if kind == "gpt2" else "classifier.weight"
    # The adapter's head is not the base's: before the fix, fold kept the base's and the loop below failed.
    assert not torch.equal(reference[head], original[head])
    assert sorted(folded) == sorted(original)
    for key, tensor in folded.items():
        assert tensor.dtype == original[key].dtype
        torch.testing.assert_close(tensor, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # Every tensor of merge_and_unload's model that the base file holds was compared.
    assert set(original) <= set(reference)
    assert head in report["heads"] and len(report["heads"]) == len(adapter.extra_tensors)
    table = run_cli("fold", str(adapter_path), "--base", str(base), "-o", str(tmp_path / "cli"))
    assert table.exit_code == 0, table.output
    assert "replaced" in table.stdout and head in table.stdout


def test_head_of_another_shape_is_refused_naming_both_shapes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    seq_cls_model("gpt2", num_labels=2).save_pretrained(str(base), safe_serialization=True)
    adapter_path, _ = seq_cls_adapter(tmp_path / "adapter", "gpt2", seed=1)
    with pytest.raises(ModuleMismatchError, match=r"score\.weight has shape \[3, 32\].*shape \[2, 32\]"):
        fold(load_adapter(adapter_path), base, tmp_path / "folded")
    assert not (tmp_path / "folded").exists()
    assert_one_line_error(run_cli("fold", str(adapter_path), "--base", str(base), "-o", str(tmp_path / "cli")),
                          "score.weight", "[3, 32]", "[2, 32]")
    assert not (tmp_path / "cli").exists()


def small_base(path: Path) -> Path:
    generator = torch.Generator().manual_seed(5)
    save_file({"model.q_proj.weight": torch.randn(8, 6, generator=generator),
               "head.weight": torch.randn(3, 8, generator=generator),
               "head.bias": torch.randn(3, generator=generator)}, str(path))
    return path


def test_in_memory_naming_and_original_copies(tmp_path: Path) -> None:
    """``<m>.modules_to_save.<adapter>.<p>`` (PEFT's in-memory key) replaces the base tensor; PEFT's
    ``<m>.original_module.<p>`` (the base's own copy) is not applied."""
    trained, stale = torch.full((3, 8), 0.5), torch.full((3, 8), -9.0)
    tensors = lora_tensors({"model.q_proj": (8, 6, 2)}, seed=1)
    tensors["base_model.model.head.modules_to_save.default.weight"] = trained
    tensors["base_model.model.head.original_module.weight"] = stale
    adapter = write_peft(tmp_path / "a", tensors, r=2, lora_alpha=2, modules_to_save=["head"])
    base = small_base(tmp_path / "base.safetensors")
    report = fold(load_adapter(adapter), base, tmp_path / "out.safetensors")
    out, original = load_file(str(tmp_path / "out.safetensors")), load_file(str(base))
    assert report["heads"] == {"head.weight": "base_model.model.head.modules_to_save.default.weight"}
    assert torch.equal(out["head.weight"], trained)
    assert torch.equal(out["head.bias"], original["head.bias"])
    assert head_tensor_name("base_model.model.score.weight") == "score.weight"
    assert head_tensor_name("base_model.model.score.original_module.weight") is None


def test_copy_without_a_base_tensor_is_refused(tmp_path: Path) -> None:
    tensors = lora_tensors({"model.q_proj": (8, 6, 2)}, seed=1)
    tensors["base_model.model.lm_head.weight"] = torch.ones(3, 8)
    adapter = write_peft(tmp_path / "a", tensors, r=2, lora_alpha=2)
    base = small_base(tmp_path / "base.safetensors")
    assert_one_line_error(run_cli("fold", str(adapter), "--base", str(base), "-o", str(tmp_path / "o.safetensors")),
                          "base_model.model.lm_head.weight", "lm_head.weight", "right base model")
    assert not (tmp_path / "o.safetensors").exists()


@requires_realdata("peft-regression", "lora_mlp_modules_to_save", "0.6.1")
def test_real_modules_to_save_adapter_reproduces_peft_recorded_output(tmp_path: Path) -> None:
    """PEFT 0.6.1's own regression adapter (LoRA on lin0, lin1 saved whole): folded into the rebuilt base
    (seed 0), the model reproduces the output PEFT's maintainers recorded. (Its lin1 copy was saved untrained,
    so the output alone cannot tell kept from dropped; the report must name the replaced tensors.)"""
    folder = REALDATA / "peft-regression/lora_mlp_modules_to_save/0.6.1"
    torch.manual_seed(0)
    lin0, lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)
    base = tmp_path / "base.safetensors"
    save_file({f"{name}.{p}": getattr(layer, p).detach() for name, layer in (("lin0", lin0), ("lin1", lin1))
               for p in ("weight", "bias")}, str(base))
    report = fold(load_adapter(folder), base, tmp_path / "folded.safetensors")
    assert sorted(report["heads"]) == ["lin1.bias", "lin1.weight"]
    weights = load_file(str(tmp_path / "folded.safetensors"))
    x = torch.arange(90).reshape(9, 10).float()
    hidden = torch.relu(x @ weights["lin0.weight"].T + weights["lin0.bias"])
    output = torch.log_softmax(hidden @ weights["lin1.weight"].T + weights["lin1.bias"], dim=-1)
    expected = torch.load(folder / "output.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
