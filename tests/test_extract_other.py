"""extract lists every changed tensor outside the linear layers and, with --include-other, stores what PEFT can carry
(modules_to_save, lora_B.bias): PEFT loading the adapter onto the base then reproduces the fine-tuned model."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_tools.formats import load_adapter
from tests.conftest import tiny_gpt2, tiny_llama
from tests.helpers import assert_one_line_error, run_cli

Edit = Callable[[torch.nn.Module, torch.Generator], None]


def low_rank_(weight: torch.Tensor, rank: int, gen: torch.Generator, size: float = 0.1) -> None:
    weight += size * (torch.randn(weight.shape[0], rank, generator=gen) @ torch.randn(rank, weight.shape[1],
                                                                                      generator=gen))


def noise_(tensor: torch.Tensor, gen: torch.Generator, size: float = 0.3) -> None:
    tensor += size * torch.randn(tensor.shape, generator=gen)


def make_pair(tmp_path: Path, factory: Callable[[], torch.nn.Module], edit: Edit,
              finetuned_factory: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
              ) -> tuple[Path, Path, torch.nn.Module]:
    """(base folder, fine-tuned folder, fine-tuned model) saved with save_pretrained."""
    base = factory()
    finetuned = finetuned_factory(base) if finetuned_factory else copy.deepcopy(base)
    with torch.no_grad():
        edit(finetuned, torch.Generator().manual_seed(1))
    base.save_pretrained(str(tmp_path / "base"))
    finetuned.save_pretrained(str(tmp_path / "ft"))
    return tmp_path / "base", tmp_path / "ft", finetuned


def brute_force_changes(base: Path, finetuned: Path) -> dict[str, tuple[float, float | None]]:
    """key -> (‖ΔT‖, ‖ΔT‖/‖T_0‖) of every tensor in both files that differs, in float64."""
    before, after = load_file(str(base / "model.safetensors")), load_file(str(finetuned / "model.safetensors"))
    changes = {}
    for key, tensor in after.items():
        if key in before and before[key].shape == tensor.shape and not torch.equal(before[key], tensor):
            delta = float((tensor.double() - before[key].double()).norm())
            size = float(before[key].double().norm())
            changes[key] = (delta, delta / size if size else None)
    return changes


def extract_json(base: Path, finetuned: Path, out: Path, *extra: str, rank: int = 2) -> dict[str, Any]:
    result = run_cli("extract", "--base", str(base), "--finetuned", str(finetuned), "-o", str(out), "--rank",
                     str(rank), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def peft_logits(model_class: Any, base: Path, adapter: Path, tokens: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_class.from_pretrained(str(base)), str(adapter)).eval()
        with torch.no_grad():
            return model(tokens).logits


TOKENS = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(5))


def edit_gpt2(model: torch.nn.Module, gen: torch.Generator) -> None:
    blocks = model.transformer.h
    low_rank_(blocks[0].attn.c_attn.weight, 2, gen)  # Conv1D: (in, out)
    low_rank_(blocks[1].mlp.c_fc.weight, 1, gen)
    noise_(blocks[1].mlp.c_fc.bias, gen, 0.1)  # the bias of a LoRA layer -> lora_B.bias
    noise_(blocks[0].ln_1.bias, gen)  # a bias alone: the LayerNorm is saved whole
    noise_(model.transformer.ln_f.weight, gen)
    noise_(model.transformer.wte.weight, gen, 0.05)  # tied to lm_head: both must be saved
    noise_(model.transformer.wpe.weight, gen, 0.05)


GPT2_LORA = {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"}


def test_gpt2_include_other_reproduces_the_finetune(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    base, finetuned, model = make_pair(tmp_path, tiny_gpt2, edit_gpt2)
    report = extract_json(base, finetuned, tmp_path / "x", "--include-other")
    expected = brute_force_changes(base, finetuned)
    rows = {r["name"]: r for r in report["other_tensors"]}
    assert set(rows) == (set(expected) - GPT2_LORA) | {"lm_head.weight"}
    assert all(r["saved"] for r in rows.values()), rows
    assert rows["lm_head.weight"]["note"] == "tied to transformer.wte.weight"
    assert rows["transformer.h.1.mlp.c_fc.bias"]["saved_as"] == "lora_B.bias"
    assert report["modules_to_save"] == ["lm_head", "transformer.h.0.ln_1", "transformer.ln_f", "transformer.wpe",
                                         "transformer.wte"]
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == report["modules_to_save"] and config["lora_bias"] is True
    stored = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    # Whole modules: ln_1's unchanged weight travels with its changed bias, bit for bit.
    assert torch.equal(stored["base_model.model.transformer.h.0.ln_1.weight"], model.transformer.h[0].ln_1.weight)
    assert torch.equal(stored["base_model.model.lm_head.weight"], model.transformer.wte.weight)
    assert len(load_adapter(tmp_path / "x").extra_tensors) == 7  # our own reader takes it back
    with torch.no_grad():
        wanted = model(TOKENS).logits
    got = peft_logits(GPT2LMHeadModel, base, tmp_path / "x", TOKENS)
    assert float((got - wanted).abs().max()) < 1e-4 * float(wanted.abs().max())


def test_gpt2_without_include_other_lists_exact_changes(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    base, finetuned, model = make_pair(tmp_path, tiny_gpt2, edit_gpt2)
    report = extract_json(base, finetuned, tmp_path / "x")
    expected = brute_force_changes(base, finetuned)
    expected["lm_head.weight"] = expected["transformer.wte.weight"]
    rows = {r["name"]: r for r in report["other_tensors"]}
    assert set(rows) == set(expected) - GPT2_LORA
    for name, row in rows.items():
        delta, relative = expected[name]
        assert row["abs_change"] == pytest.approx(delta, rel=1e-12)
        assert row["rel_change"] == (None if relative is None else pytest.approx(relative, rel=1e-12)), name
        assert row["shape"] == list(load_file(str(finetuned / "model.safetensors"))[
            name if name != "lm_head.weight" else "transformer.wte.weight"].shape)
        assert not row["saved"] and row["saved_as"] in ("modules_to_save", "lora_B.bias")
    assert report["num_other_changed"] == 6 and report["modules_to_save"] == []
    assert any("6 changed tensor(s) outside the LoRA modules are not in the adapter" in w and "--include-other" in w
               for w in report["warnings"])
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert "modules_to_save" not in config and "lora_bias" not in config
    assert load_adapter(tmp_path / "x").extra_tensors == []
    with torch.no_grad():
        wanted = model(TOKENS).logits
    # What the table lists is what the adapter misses.
    assert float((peft_logits(GPT2LMHeadModel, base, tmp_path / "x", TOKENS) - wanted).abs().max()) > 1e-2
    text = run_cli("extract", "--base", str(base), "--finetuned", str(finetuned), "-o", str(tmp_path / "y"),
                   "--rank", "2").stdout
    for name, row in rows.items():
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert (f"{row['rel_change']:.4g}" if row["rel_change"] is not None else f"{row['abs_change']:.4g}") in line


def edit_llama(model: torch.nn.Module, gen: torch.Generator) -> None:
    layers = model.model.layers
    low_rank_(layers[0].self_attn.q_proj.weight, 2, gen)
    low_rank_(model.lm_head.weight, 1, gen)  # an untied head: a linear layer, extracted as LoRA
    noise_(layers[1].input_layernorm.weight, gen)
    noise_(model.model.norm.weight, gen)
    noise_(model.model.embed_tokens.weight, gen, 0.05)


def test_llama_include_other_reproduces_the_finetune(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    base, finetuned, model = make_pair(tmp_path, tiny_llama, edit_llama)
    report = extract_json(base, finetuned, tmp_path / "x", "--include-other")
    assert {r["name"] for r in report["modules"]} == {"model.layers.0.self_attn.q_proj", "lm_head"}
    assert report["modules_to_save"] == ["model.embed_tokens", "model.layers.1.input_layernorm", "model.norm"]
    with torch.no_grad():
        wanted = model(TOKENS).logits
    got = peft_logits(LlamaForCausalLM, base, tmp_path / "x", TOKENS)
    assert float((got - wanted).abs().max()) < 1e-4 * float(wanted.abs().max())


def biased_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        max_position_embeddings=64, attention_bias=True)).eval()


def bare_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)).eval()


def _resized(model: torch.nn.Module) -> torch.nn.Module:
    finetuned = copy.deepcopy(model)
    finetuned.resize_token_embeddings(104)
    return finetuned


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(2)
    finetuned = GPT2ForSequenceClassification(copy.deepcopy(model.config))
    finetuned.transformer.load_state_dict(model.transformer.state_dict())
    return finetuned


def _lora_bias_mixed(model: torch.nn.Module, gen: torch.Generator) -> None:
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    low_rank_(attention.q_proj.weight, 1, gen)
    noise_(attention.q_proj.bias, gen)
    low_rank_(mlp.down_proj.weight, 1, gen)  # no bias: lora_bias=True cannot cover it


def _bare_norm(model: torch.nn.Module, gen: torch.Generator) -> None:
    low_rank_(model.layers[0].self_attn.q_proj.weight, 1, gen)
    noise_(model.norm.weight, gen)


def _gpt2_ln_f(model: torch.nn.Module, gen: torch.Generator) -> None:
    low_rank_(model.transformer.h[0].attn.c_attn.weight, 1, gen)
    noise_(model.transformer.ln_f.weight, gen)


UNREPRESENTABLE: dict[str, tuple[Callable[[], torch.nn.Module], Edit, Any, str, str]] = {
    "bias-of-lora-layer": (biased_llama, _lora_bias_mixed, None, "model.layers.0.self_attn.q_proj.bias",
                           "lora_bias adds a bias to every adapted layer and 1 have none"),
    "suffix-clash": (bare_llama, _bare_norm, None, "norm.weight",
                     "PEFT matches modules_to_save by suffix and 'norm' would also match "
                     "'layers.0.input_layernorm'"),
    "resized-embedding": (tiny_gpt2, _gpt2_ln_f, _resized, "transformer.wte.weight",
                          "shape [104, 32] differs from the base's [100, 32]"),
    "new-head": (tiny_gpt2, _gpt2_ln_f, _classifier, "score.weight", "not in the base model"),
    "no-config": (tiny_gpt2, _gpt2_ln_f, None, "transformer.ln_f.weight",
                  "no usable config.json: which tensors form the module is unknown"),
}


@pytest.mark.parametrize("case", sorted(UNREPRESENTABLE))
def test_unrepresentable_changes_are_named(tmp_path: Path, case: str) -> None:
    factory, edit, finetuned_factory, tensor, note = UNREPRESENTABLE[case]
    base, finetuned, _ = make_pair(tmp_path, factory, edit, finetuned_factory)
    if case == "no-config":
        (base / "config.json").unlink()
        (finetuned / "config.json").unlink()
    report = extract_json(base, finetuned, tmp_path / "x", "--include-other", rank=1)
    row = next(r for r in report["other_tensors"] if r["name"] == tensor)
    assert not row["saved"] and row["saved_as"] is None and note in row["note"], row
    assert any("not in the adapter" in w for w in report["warnings"])
    stored = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    assert not any(key.endswith(tensor) for key in stored)


def test_only_other_tensors_changed_names_them(tmp_path: Path) -> None:
    base, finetuned, _ = make_pair(tmp_path, tiny_gpt2, lambda m, g: noise_(m.transformer.ln_f.bias, g))
    result = run_cli("extract", "--base", str(base), "--finetuned", str(finetuned), "-o", str(tmp_path / "x"),
                     "--rank", "2")
    assert_one_line_error(result, "no linear weight differs", "1 other tensor(s) differ, e.g. transformer.ln_f.bias")


def test_include_other_needs_peft_output(tmp_path: Path) -> None:
    base, finetuned, _ = make_pair(tmp_path, tiny_gpt2, edit_gpt2)
    result = run_cli("extract", "--base", str(base), "--finetuned", str(finetuned), "-o",
                     str(tmp_path / "x.safetensors"), "--rank", "2", "--to", "kohya", "--include-other")
    assert_one_line_error(result, "--include-other", "kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_large_differences_use_the_machine_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tools.extract as extract_module
    from lora_tools.linalg.truncate import RankRule

    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch has a single thread here")
    seen: list[int] = []
    inner = extract_module._truncated_svd
    monkeypatch.setattr(extract_module, "_truncated_svd", lambda D, rule: (seen.append(torch.get_num_threads()),
                                                                            inner(D, rule))[1])
    monkeypatch.setattr(extract_module, "THREADED_MIN_ELEMENTS", 64 * 64)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    for size in (32, 64):
        extract_module.truncated_svd(torch.randn(size, size, dtype=torch.float64), RankRule("fixed", 2))
    assert seen == [1, threads] and torch.get_num_threads() == threads
    # A machine whose cores are all busy: one thread, whatever the size.
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    extract_module.truncated_svd(torch.randn(64, 64, dtype=torch.float64), RankRule("fixed", 2))
    assert seen[-1] == 1 and torch.get_num_threads() == threads
