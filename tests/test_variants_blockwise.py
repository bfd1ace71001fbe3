"""Whole-adapter variants built one decoder block at a time (issue 12, end-to-end stage memory): the same factors
and summaries as an all-at-once build, and a streamed compare-quant never holding two blocks' factors."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools.compare import variants_plan
from lora_tools.compare.span import SpanCovariance
from lora_tools.compare.variants_plan import VariantPlan
from lora_tools.formats import load_adapter
from lora_tools.model.feed import block_index
from tests.helpers import lora_tensors, save_head_adapter, write_peft

KINDS = {"self_attn.q_proj": (24, 40), "self_attn.v_proj": (16, 40), "mlp.down_proj": (40, 56)}
BLOCKS = 3
RANK = 6
NAMES = [f"model.layers.{i}.{kind}" for i in range(BLOCKS) for kind in KINDS]
NO_COVARIANCE = ["model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    shapes = {name: (*KINDS[name.split(".", 3)[3]], RANK) for name in NAMES}
    tensors = lora_tensors(shapes, seed=5, dtype=torch.float32)
    # Spectra from flat to steeply decaying, different in every block: the avg-rank solver moves rank across
    # blocks, so a per-block allocation would differ from the global one.
    for i, name in enumerate(NAMES):
        key = f"base_model.model.{name}.lora_B.weight"
        tensors[key] = tensors[key] * torch.logspace(0, -(i % 4), RANK)[None, :] * (1 + i / 3)
    folder = write_peft(tmp_path_factory.mktemp("blockwise") / "a", tensors, r=RANK, lora_alpha=12,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    return load_adapter(folder)


def covariances(adapter) -> dict[str, SpanCovariance]:  # noqa: ANN001
    """C_calib on each module's row space (as compare-quant hands them over), missing for two modules."""
    gen = torch.Generator().manual_seed(1)
    result = {}
    for name in NAMES:
        if name in NO_COVARIANCE:
            continue
        width = adapter.modules[name].in_features
        X = torch.randn(200, width, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, width,
                                                                                       dtype=torch.float64)
        result[name] = SpanCovariance(X.T @ X, adapter.factors(name)[1])
    return result


def plan(adapter) -> VariantPlan:  # noqa: ANN001
    return VariantPlan(adapter, covariances(adapter), NAMES, ranks=(1, 2, 4),
                       schemes=("int8-channel", "int4-g4"), mixed_schemes=("int8-channel", "int4-g4"))


def test_blockwise_build_equals_the_all_at_once_build(adapter) -> None:  # noqa: ANN001
    whole = plan(adapter).build_all()
    blockwise = plan(adapter)
    by_label = {v.label: v for v in whole}
    assert [v.label for v in blockwise.variants] == [v.label for v in whole]
    compared = 0
    for block in reversed(range(BLOCKS)):  # any order of blocks: the summaries are put back in module order
        names = [n for n in NAMES if block_index(n) == block]
        assert not blockwise.complete
        for variant, factors in zip(blockwise.variants, blockwise.build(names), strict=True):
            assert list(factors) == names
            for name, f in factors.items():
                expected = by_label[variant.label].factors[name]
                assert torch.equal(f.B, expected.B) and torch.equal(f.A, expected.A), (variant.label, name)
                assert f.scale == expected.scale
                compared += 1
    assert blockwise.complete and compared == len(whole) * len(NAMES)
    for got, expected in zip(blockwise.variants, whole, strict=True):
        assert got.factors == {}  # a block-wise plan keeps no factors
        assert got.summary() == expected.summary(), got.label  # exact: no NaN in these figures
        assert got.bytes == expected.bytes and got.mean_rank == expected.mean_rank
        assert list(got.predicted.items()) == list(expected.predicted.items())  # same order: same float sums
        assert list(got.reference.items()) == list(expected.reference.items())
        assert got.module_rel_errors("output") == expected.module_rel_errors("output")
        assert got.notes == expected.notes
    variants = {v.label: v for v in blockwise.variants}
    # The global pieces are global: avg-rank's allocation (non-uniform, across blocks) and svd-act's note.
    allocated = variants["avg-rank-r2"].ranks
    assert len(set(allocated.values())) > 1 and allocated == {n: f.rank for n, f in
                                                              by_label["avg-rank-r2"].factors.items()}
    assert variants["avg-rank-r2"].mean_rank == pytest.approx(sum(allocated.values()) / len(NAMES))
    assert variants["svd-act-r2"].notes == [f"{len(NO_COVARIANCE)} module(s) without calibration inputs "
                                            f"truncated by plain SVD, e.g. {NO_COVARIANCE[0]}"]
    assert variants["svd-act-r2"].predicted_rel_error("output") is None
    assert variants["svd-act-r2"].predicted_rel_error("weight") > 0


def test_a_module_is_built_once(adapter) -> None:  # noqa: ANN001
    blockwise = plan(adapter)
    blockwise.build(NAMES[:3])
    with pytest.raises(ValueError, match="twice"):
        blockwise.build(NAMES[2:4])
    with pytest.raises(ValueError, match="twice"):
        blockwise.build([NAMES[5], NAMES[5]])
    with pytest.raises(Exception, match="not in this variant plan"):
        blockwise.build(["model.layers.9.mlp.down_proj"])


def test_streamed_end_to_end_holds_one_block_of_factors_at_a_time(tiny_llama: tuple[Path, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every factor tensor a variant gets, and every module basis decomposed, is watched through a weak
    reference; whenever a new one is made, the live ones must all belong to one decoder block (bases: to one
    module), and none may outlive the run."""
    from lora_tools.compare import CompareOptions, prepare_compare

    factor_refs: list[tuple[int, weakref.ref]] = []
    basis_refs: list[weakref.ref] = []
    peaks = {"blocks": 0, "bases": 0, "calls": 0}

    def live_factors() -> list[int]:
        return [block for block, ref in factor_refs if ref() is not None]

    original_variant, original_decompose = variants_plan.module_variant, variants_plan.decompose

    def module_variant(m: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_variant(m, *args, **kwargs)
        factor_refs.extend((block_index(m.name), weakref.ref(t)) for t in (result[0].B, result[0].A))
        peaks["blocks"] = max(peaks["blocks"], len(set(live_factors())))  # the new one's block included
        peaks["calls"] += 1
        return result

    def decompose(*args: Any, **kwargs: Any) -> Any:
        basis = original_decompose(*args, **kwargs)
        basis_refs.append(weakref.ref(basis))
        peaks["bases"] = max(peaks["bases"], sum(ref() is not None for ref in basis_refs))
        return basis

    monkeypatch.setattr(variants_plan, "module_variant", module_variant)
    monkeypatch.setattr(variants_plan, "decompose", decompose)
    base, adapter_path = tiny_llama
    report = prepare_compare(load_adapter(adapter_path), base,
                             CompareOptions(max_tokens=600, device="cpu", offload="always")).run()
    e2e = report["end_to_end"]
    assert report["offload"]["stream"] and len(e2e["variants"]) > 5
    variants = len(e2e["variants"]) + 1  # and the identity (the reference)
    assert peaks["calls"] == variants * e2e["modules"]  # the watch saw every module of every variant
    assert peaks["blocks"] == 1  # never two blocks' factors alive together
    assert peaks["bases"] == 1  # one module's SVD bases and eigenfactors at a time
    gc.collect()
    assert live_factors() == [] and all(ref() is None for ref in basis_refs)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded 3-block Llama and a LoRA on all seven kinds (``tests.test_streaming``'s base)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    from tests.helpers import save_tiny_base_and_adapter

    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return save_tiny_base_and_adapter(tmp_path_factory.mktemp("stream"), transformers.LlamaForCausalLM(config).eval(),
                                      kinds, max_shard_size="2MB")


@pytest.fixture(scope="module")
def head_adapter(tiny_llama: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA on the tiny Llama's q_proj, down_proj and its LM head (outside the decoder blocks)."""
    return save_head_adapter(tiny_llama[0], tmp_path_factory.mktemp("head") / "adapter")


def test_streamed_end_to_end_applies_the_lm_head_variants(tiny_llama: tuple[Path, Path], head_adapter: Path) -> None:
    """An adapted lm_head is built after the blocks and switched in while the logits are computed: the
    streamed section equals the in-memory one (before, the streamed stage refused the head)."""
    from lora_tools.compare import CompareOptions, prepare_compare
    from tests.test_streaming import _assert_same

    def section(offload: str) -> dict[str, Any]:
        options = CompareOptions(max_tokens=600, device="cpu", offload=offload, ranks=(1, 2),
                                 schemes=("int8-channel",))
        return prepare_compare(load_adapter(head_adapter), tiny_llama[0], options).run()["end_to_end"]

    whole, streamed = section("never"), section("always")
    assert whole["modules"] == 7 and whole["kl_adapter_base"] > 0
    # The head's update matters: without it the reference would be another model and every KL would move.
    assert _assert_same(whole, streamed) > 50
