"""compare-quant's end-to-end stage (issue 9): every whole-adapter variant run through the full model, reported in
report.json's pinned ``end_to_end`` section, with the frontier, the recommendation and the bad inputs.

Tiny models built in code (a 2-layer Llama causal LM and a 2-layer BERT) with MiniLM's real tokenizer, so that
real text runs through them; the variants' arithmetic itself is checked in tests/test_end_to_end.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import MINILM_VOCAB, assert_one_line_error, run_cli, save_tiny_base_and_adapter

PINNED_VARIANT_FIELDS = {"label", "method", "rank", "scheme", "bytes", "kl_mean", "kl_p99", "top1", "ppl",
                         "effect_kept", "on_frontier"}
METHODS = {"svd", "svd-act", "quant", "svd+quant", "avg-rank"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base folder, adapter folder): a 2-layer Llama (hidden 32, intermediate 48) and a random-B LoRA on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-e2e-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=MINILM_VOCAB,
                                         max_position_embeddings=256)).eval()
    return save_tiny_base_and_adapter(root, model, ["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-e2e-bert")
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 vocab_size=MINILM_VOCAB, max_position_embeddings=128)).eval()
    return save_tiny_base_and_adapter(root, model, ["query", "value"])


def _args(tiny: tuple[Path, Path], *extra: str) -> list[str]:
    base, adapter = tiny
    return ["compare-quant", str(adapter), "--base", str(base), "--device", "cpu", "--quiet", "--ranks", "1,2",
            "--schemes", "int8-channel,int4-g16", "--max-tokens", "2048", "--e2e-tokens", "512", *extra]


@pytest.fixture(scope="module")
def llama_report(tiny_llama: tuple[Path, Path]) -> dict:
    result = run_cli(*_args(tiny_llama, "--json"))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_causal_lm_gets_the_pinned_end_to_end_section_by_default(llama_report: dict) -> None:
    section = llama_report["end_to_end"]
    assert section["metric"] == "kl"
    for key in ("base_ppl", "adapter_ppl", "kl_adapter_base", "variants", "recommendation"):
        assert key in section
    assert section["kl_adapter_base"] > 0 and section["base_ppl"] > 1 and section["adapter_ppl"] > 1
    labels = [v["label"] for v in section["variants"]]
    assert len(labels) == len(set(labels))
    assert {"svd-r1", "svd-act-r1", "int8-channel", "svd-r1+int4-g128", "avg-rank-r1"} <= set(labels), labels
    for variant in section["variants"]:
        assert PINNED_VARIANT_FIELDS <= set(variant), variant
        assert variant["method"] in METHODS
        assert variant["kl_mean"] >= 0 and variant["kl_p99"] >= 0
        assert 0.0 <= variant["top1"] <= 1.0
        # effect kept is exactly 1 - KL(variant)/KL(base), from the same tallies
        assert variant["effect_kept"] == pytest.approx(1 - variant["kl_mean"] / section["kl_adapter_base"])
    assert any(v["on_frontier"] for v in section["variants"])


def test_full_rank_truncation_is_the_adapter_itself(llama_report: dict) -> None:
    """svd at the adapter's own rank reproduces it: KL at rounding level, every top-1 equal, effect kept 1."""
    by_label = {v["label"]: v for v in llama_report["end_to_end"]["variants"]}
    assert by_label["svd-r2"]["kl_mean"] < by_label["svd-r1"]["kl_mean"]
    assert llama_report["end_to_end"]["recommendation"]["criterion"] == "effect_kept"


def test_frontier_is_pareto(llama_report: dict) -> None:
    rows = llama_report["end_to_end"]["variants"]
    for row in rows:
        dominated = any(o["bytes"] <= row["bytes"] and o["kl_mean"] <= row["kl_mean"] and
                        (o["bytes"] < row["bytes"] or o["kl_mean"] < row["kl_mean"]) for o in rows)
        assert row["on_frontier"] == (not dominated), row["label"]


def test_budget_recommends_the_smallest_kl_that_fits(tiny_llama: tuple[Path, Path], llama_report: dict) -> None:
    rows = llama_report["end_to_end"]["variants"]
    budget = sorted(r["bytes"] for r in rows)[len(rows) // 2]
    result = run_cli(*_args(tiny_llama, "--json", "--budget", str(budget)))
    assert result.exit_code == 0, result.output
    section = json.loads(result.stdout)["end_to_end"]
    chosen = section["recommendation"]
    fits = [r for r in section["variants"] if r["bytes"] <= budget]
    assert chosen["label"] == min(fits, key=lambda r: (r["kl_mean"], r["bytes"]))["label"]


def test_report_folder_has_the_frontier_plot_and_section(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = run_cli(*_args(tiny_llama, "--report", str(out)))
    assert result.exit_code == 0, result.output
    assert (out / "frontier.png").stat().st_size > 1000
    markdown = (out / "report.md").read_text()
    assert "End-to-end" in markdown and "frontier.png" in markdown and "Recommended" in markdown
    assert json.loads((out / "report.json").read_text())["end_to_end"]["metric"] == "kl"


def test_budget_no_variant_meets_names_the_closest(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = run_cli(*_args(tiny_llama, "--budget", "1", "--report", str(out)))
    assert_one_line_error(result, "--budget 1 bytes", "smallest is")
    assert not out.exists()


def test_no_end_to_end_leaves_it_out_and_says_why(tiny_llama: tuple[Path, Path]) -> None:
    result = run_cli(*_args(tiny_llama, "--json", "--no-end-to-end"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["end_to_end"] is None and report["end_to_end_skipped"] == "--no-end-to-end"


def test_encoder_uses_pooled_cosine_only_when_asked(tiny_bert: tuple[Path, Path]) -> None:
    default = json.loads(run_cli(*_args(tiny_bert, "--json")).stdout)
    assert default["end_to_end"] is None and "encoder" in default["end_to_end_skipped"]
    result = run_cli(*_args(tiny_bert, "--json", "--end-to-end"))
    assert result.exit_code == 0, result.output
    section = json.loads(result.stdout)["end_to_end"]
    assert section["metric"] == "cosine"
    for variant in section["variants"]:
        assert 0.0 <= variant["kl_mean"] <= 2.0  # 1 - cos in place of KL


@pytest.mark.parametrize(("extra", "fragments"), [
    (("--end-to-end", "--calib", "random"), ("--end-to-end", "--calib random")),
    (("--end-to-end", "--target", "merged"), ("--end-to-end", "--target merged")),
    (("--max-kl", "-1"), ("--max-kl",)),
    (("--max-kl", "0.1", "--budget", "100"), ("--max-kl or --budget",)),
])
def test_bad_end_to_end_options(tiny_llama: tuple[Path, Path], tmp_path: Path, extra: tuple[str, ...],
                                fragments: tuple[str, ...]) -> None:
    out = tmp_path / "rep"
    result = run_cli(*_args(tiny_llama, *extra, "--report", str(out)))
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_max_kl_on_an_encoder_is_refused(tiny_bert: tuple[Path, Path]) -> None:
    assert_one_line_error(run_cli(*_args(tiny_bert, "--end-to-end", "--max-kl", "0.1")), "--max-kl", "causal LM")


def test_modules_the_base_lacks_are_named(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.helpers import lora_tensors, write_peft

    base, adapter = tiny_llama
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors.update(lora_tensors({"model.layers.0.self_attn.not_there": (32, 32, 4)}))
    odd = write_peft(tmp_path / "odd", tensors, r=4, lora_alpha=8)
    result = run_cli("compare-quant", str(odd), "--base", str(base), "--quiet")
    assert_one_line_error(result, "1 of the adapter's", "not_there")


def test_adapter_of_another_architecture_is_refused(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.helpers import lora_tensors, write_peft

    base, _ = tiny_llama
    gpt2 = write_peft(tmp_path / "gpt2", lora_tensors({"transformer.h.0.attn.c_attn": (96, 32, 4)}), r=4,
                      lora_alpha=8, fan_in_fan_out=True, base_model_name_or_path="gpt2")
    for command in (["compare-quant", str(gpt2), "--base", str(base), "--quiet"],
                    ["truncate", str(gpt2), "--base", str(base), "--calib", "bundled", "--rank", "1", "-o",
                     str(tmp_path / "out"), "--quiet"]):
        assert_one_line_error(run_cli(*command), "another architecture", "gpt2")
    assert not (tmp_path / "out").exists()
