"""merge refuses adapters of different bases (or with nothing in common) and keeps modules_to_save heads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.errors import ModuleMismatchError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.merge.bases import parse_model_name
from lora_tools.merge.run import merge_adapters
from tests.conftest import REALDATA, requires_realdata
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft
from tests.test_fold_heads import seq_cls_adapter, seq_cls_model

# --- bases -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "same"), [
    ("gpt2", "openai-community/gpt2", True),  # the Hub's legacy alias of a namespaced model
    ("GPT2", "gpt2", True),
    ("/models/gpt2/", "openai-community/gpt2", True),  # a local download keeps the repository name
    ("C:\\models\\gpt2", "gpt2", True),
    ("./out/checkpoint-500", "./out/checkpoint-500", True),
    ("gpt2", "facebook/opt-125m", False),
    ("gpt2", "distilbert/distilgpt2", False),
    ("meta-llama/Llama-2-7b-hf", "NousResearch/Llama-2-7b-hf", False),  # other owner: not assumed equal
    ("sshleifer/tiny-gpt2", "gpt2", False),
])
def test_base_name_rule(a: str, b: str, same: bool) -> None:
    first, second = parse_model_name(a), parse_model_name(b)
    assert first is not None and second is not None
    assert first.same_as(second) is same and second.same_as(first) is same


@requires_realdata("peft-opt125m-qv")
def test_real_gpt2_and_opt_adapters_are_refused(tmp_path: Path) -> None:
    gpt2, opt = REALDATA / "peft-gpt2-r4-cattn-ironhack", REALDATA / "peft-opt125m-qv"
    out = tmp_path / "out"
    # Before the fix: exit 0, one warning, a 36-module union named for gpt2.
    assert_one_line_error(run_cli("merge", str(gpt2), str(opt), "-o", str(out)),
                          "different base models", "(gpt2, 12 modules)", "(facebook/opt-125m, 24 modules)",
                          "0 module(s) shared", "--allow-different-bases")
    assert not out.exists()
    result = run_cli("merge", str(gpt2), str(opt), "-o", str(out), "--allow-different-bases", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_modules"] == 36
    assert any("merged anyway (--allow-different-bases)" in w for w in report["warnings"])


def two_module_adapter(folder: Path, modules: dict[str, tuple[int, int, int]], seed: int,
                       base: str | None) -> Path:
    return write_peft(folder, lora_tensors(modules, seed=seed), r=2, lora_alpha=2, base_model_name_or_path=base)


def test_unknown_base_alone_does_not_refuse_but_no_shared_module_does(tmp_path: Path) -> None:
    a = load_adapter(two_module_adapter(tmp_path / "a", {"model.q": (8, 6, 2)}, 1, None))
    b = load_adapter(two_module_adapter(tmp_path / "b", {"model.q": (8, 6, 2)}, 2, "openai-community/gpt2"))
    c = load_adapter(two_module_adapter(tmp_path / "c", {"q": (8, 6, 2)}, 3, None))  # another model class' names
    assert merge_adapters([a, b], "cat").report["num_modules"] == 1
    with pytest.raises(ModuleMismatchError, match=r"c \(base unknown, 1 modules\) shares no module"):
        merge_adapters([a, b, c], "cat")
    result = merge_adapters([a, b, c], "cat", allow_different_bases=True)
    assert result.report["num_modules"] == 2
    assert any("shares no module" in w for w in result.report["warnings"])


def test_equal_bases_under_trivially_different_names_merge(tmp_path: Path) -> None:
    a = load_adapter(two_module_adapter(tmp_path / "a", {"model.q": (8, 6, 2)}, 1, "gpt2"))
    b = load_adapter(two_module_adapter(tmp_path / "b", {"model.q": (8, 6, 2)}, 2, "openai-community/gpt2"))
    c = load_adapter(two_module_adapter(tmp_path / "c", {"model.q": (8, 6, 2)}, 3, "facebook/opt-125m"))
    assert merge_adapters([a, b], "svd").report["warnings"] == []
    with pytest.raises(ModuleMismatchError, match=r"\(gpt2, 1 modules\) vs .*\(facebook/opt-125m, 1 modules\); "
                                                  r"1 module\(s\) shared"):
        merge_adapters([a, b, c], "cat")


def kohya_file(path: Path, seed: int, **metadata: str) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file({"lora_unet_mid_block_attn1_to_q.lora_down.weight": torch.randn(2, 6, generator=generator),
               "lora_unet_mid_block_attn1_to_q.lora_up.weight": torch.randn(8, 2, generator=generator)},
              str(path), metadata=metadata)
    return path


def test_kohya_families_are_compared_not_checkpoint_names(tmp_path: Path) -> None:
    sd15 = kohya_file(tmp_path / "a.safetensors", 1, ss_base_model_version="sd_v1", ss_sd_model_name="v1-5.ckpt")
    anime = kohya_file(tmp_path / "b.safetensors", 2, ss_v2="False", ss_sd_model_name="animefull.ckpt")
    sdxl = kohya_file(tmp_path / "c.safetensors", 3, ss_base_model_version="sdxl_base_v1-0")
    # Two SD 1.x fine-tunes: one family, mergeable.
    assert merge_adapters([load_adapter(sd15), load_adapter(anime)], "cat").report["num_modules"] == 1
    assert_one_line_error(run_cli("merge", str(sd15), str(sdxl), "-o", str(tmp_path / "o.safetensors")),
                          "(sd_v1, 1 modules)", "(sdxl_base_v1-0, 1 modules)")


# --- heads (modules_to_save copies) ----------------------------------------------------------------------------


def score_of(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "adapter_model.safetensors"))["base_model.model.score.weight"]


def peft_score(folder: Path) -> torch.Tensor:
    """The score head PEFT itself uses after loading ``folder`` onto a fresh base."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(seq_cls_model("gpt2"), str(folder))
        return model.merge_and_unload().score.weight.detach()


@pytest.fixture
def two_heads(tmp_path: Path) -> tuple[Path, Path]:
    a, _ = seq_cls_adapter(tmp_path / "a", "gpt2", seed=1)
    b, _ = seq_cls_adapter(tmp_path / "b", "gpt2", seed=2)
    return a, b


def test_single_input_keeps_its_head(tmp_path: Path, two_heads: tuple[Path, Path]) -> None:
    a, _ = two_heads
    result = run_cli("merge", str(a), "-o", str(tmp_path / "m"), "--method", "svd", "--json")
    assert result.exit_code == 0, result.output
    # Before the fix PEFT loaded a copy of the base's untrained head here.
    torch.testing.assert_close(peft_score(tmp_path / "m"), score_of(a), rtol=0, atol=0)
    assert json.loads(result.stdout)["heads"]["policy"] == "single input"
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]


def test_different_heads_need_a_choice(tmp_path: Path, two_heads: tuple[Path, Path]) -> None:
    a, b = two_heads
    out = tmp_path / "m"
    assert_one_line_error(run_cli("merge", str(a), str(b), "-o", str(out)),
                          "different non-LoRA tensors", "differs between", "--heads first, average or drop")
    assert not out.exists()
    assert_one_line_error(run_cli("merge", str(a), str(b), "-o", str(out), "--heads", "best"), "--heads 'best'")

    assert run_cli("merge", str(a), str(b), "-o", str(out), "--heads", "first").exit_code == 0
    torch.testing.assert_close(peft_score(out), score_of(a), rtol=0, atol=0)

    assert run_cli("merge", str(a), str(b), "-o", str(out), "--heads", "average", "--force").exit_code == 0
    torch.testing.assert_close(score_of(out), (score_of(a) + score_of(b)) / 2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(peft_score(out), score_of(out), rtol=0, atol=0)

    result = run_cli("merge", str(a), str(b), "-o", str(out), "--heads", "drop", "--force", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["heads"]["policy"] == "drop" and "base_model.model.score.weight" in report["heads"]["dropped"]
    assert any("task_type SEQ_CLS cleared" in w for w in report["warnings"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["task_type"] is None
    assert load_adapter(out).extra_tensors == []
    # PEFT loads it (a SEQ_CLS config without head tensors makes PEFT 0.21 raise KeyError) and keeps the base's head.
    torch.testing.assert_close(peft_score(out), seq_cls_model("gpt2").score.weight.detach(), rtol=0, atol=0)


def test_identical_heads_need_no_choice(tmp_path: Path) -> None:
    a, _ = seq_cls_adapter(tmp_path / "a", "gpt2", seed=1, head_seed=7)
    b, _ = seq_cls_adapter(tmp_path / "b", "gpt2", seed=2, head_seed=7)
    assert not torch.equal(load_file(str(a / "adapter_model.safetensors"))
                           ["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"],
                           load_file(str(b / "adapter_model.safetensors"))
                           ["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"])
    result = merge_adapters([load_adapter(a), load_adapter(b)], "cat")
    assert result.report["heads"]["policy"] == "identical in every input"
    save_adapter(result.adapter, tmp_path / "m")
    torch.testing.assert_close(score_of(tmp_path / "m"), score_of(a), rtol=0, atol=0)


def test_head_in_one_input_only_needs_a_choice(tmp_path: Path) -> None:
    with_head = tmp_path / "a"
    tensors = lora_tensors({"model.q": (8, 6, 2)}, seed=1)
    tensors["base_model.model.score.weight"] = torch.ones(3, 8)
    write_peft(with_head, tensors, r=2, lora_alpha=2, modules_to_save=["score"], task_type="SEQ_CLS")
    without = two_module_adapter(tmp_path / "b", {"model.q": (8, 6, 2)}, 2, "tiny/test")
    a, b = load_adapter(with_head), load_adapter(without)
    with pytest.raises(ModuleMismatchError, match="has base_model.model.score.weight but"):
        merge_adapters([a, b], "cat")
    with pytest.raises(ModuleMismatchError, match="--heads average needs the same"):
        merge_adapters([a, b], "cat", heads="average")
    first = merge_adapters([a, b], "cat", heads="first")
    assert [i.key for i in first.adapter.extra_tensors] == ["base_model.model.score.weight"]
    assert first.adapter.config["modules_to_save"] == ["score"]
    # The first input has no head: --heads first keeps none, and the config says so.
    reverse = merge_adapters([b, a], "cat", heads="first")
    assert reverse.adapter.extra_tensors == [] and reverse.adapter.config["modules_to_save"] is None
    assert reverse.report["heads"]["dropped"] == ["base_model.model.score.weight"]


# --- threads ---------------------------------------------------------------------------------------------------


def test_large_dense_modules_use_the_idle_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """ties' out x in SVD runs on ``idle_threads()`` threads for layers of >= PARALLEL_MIN_ENTRIES entries (it
    was pinned to one), small layers stay on one, and torch's setting is restored afterwards."""
    import lora_tools.merge.methods as methods
    import lora_tools.merge.run as run
    from lora_tools.builder import AdapterBuilder

    seen: dict[int, int] = {}
    real = methods.truncated_dense

    def spy(merged: torch.Tensor, terms: list, options: methods.MergeOptions) -> methods.MergedFactors:
        seen[merged.numel()] = torch.get_num_threads()
        return real(merged, terms, options)

    monkeypatch.setattr(methods, "truncated_dense", spy)
    monkeypatch.setattr(run, "idle_threads", lambda: 3)
    side = 512  # 512 x 512 = PARALLEL_MIN_ENTRIES
    assert side * side == run.PARALLEL_MIN_ENTRIES
    inputs = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        builder = AdapterBuilder("peft", Path(f"mem-{seed}"))
        for name, (out, inp) in {"big": (side, side), "small": (8, 6)}.items():
            builder.add_module(name, "linear", torch.randn(out, 2, generator=generator, dtype=torch.float64),
                               torch.randn(2, inp, generator=generator, dtype=torch.float64), scale=1.0, alpha=2.0)
        inputs.append(builder.build())
    before = torch.get_num_threads()
    merge_adapters(inputs, "ties")
    assert seen == {side * side: 3, 48: 1}
    assert torch.get_num_threads() == before


def test_idle_threads_stay_within_torch_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from lora_tools.linalg.lowrank import idle_threads

    assert 1 <= idle_threads() <= torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 0.0, 0.0))  # a saturated machine gets one thread
    assert idle_threads() == 1
