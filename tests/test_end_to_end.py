"""End-to-end evaluation: KL / top-1 / perplexity / effect kept against explicit float64 loops on tiny causal LMs,
pooled cosine on a tiny BERT, PEFT's own logits as the reference for the hooks, hooks off after failures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools.basemodel import match_modules
from lora_tools.compare.end_to_end import (
    EndToEndModelError,
    apply_variant,
    detect_metric,
    evaluate_variants,
)
from lora_tools.compare.frontier import finalize
from lora_tools.compare.variants import ModuleFactors, Variant
from lora_tools.compare.variants_plan import build_variants
from lora_tools.errors import InvalidOptionError, ModuleMismatchError
from lora_tools.formats import load_adapter
from tests.conftest import make_peft_adapter, tiny_bert, tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_sequences(count: int, low: int, high: int, seed: int = 0, vocab: int = 100) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen)
    return [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder, peft_model = make_peft_adapter(tmp_path_factory.mktemp("llama"), "llama", r=4, lora_alpha=8,
                                           target_modules=LLAMA_TARGETS)
    adapter = load_adapter(folder)
    model = tiny_llama()
    mapping = match_modules(model, list(adapter.modules))
    assert not mapping.unmatched and len(mapping.modules) == 14
    variants = {v.label: v for v in build_variants(adapter, ranks=(1, 2), schemes=("int8-channel", "int4-g128"),
                                                   mixed_schemes=("int4-g128",))}
    return {"adapter": adapter, "model": model, "modules": mapping.modules, "variants": variants,
            "peft": peft_model}


def zero_variant(reference: Variant) -> Variant:
    """The adapter's update removed (zero factors): the model's outputs are the base model's."""
    factors = {n: ModuleFactors(torch.zeros_like(f.B), torch.zeros_like(f.A), f.scale)
               for n, f in reference.factors.items()}
    return Variant("zero", "svd", 0, None, 0, factors, reference.predicted, reference.reference)


def logits_of(model: torch.nn.Module, modules: dict, variant: Variant | None, seq: list[int]) -> torch.Tensor:
    with torch.no_grad(), apply_variant(modules, variant):
        return model(input_ids=torch.tensor([seq])).logits[0].double()  # (len, V), one unpadded sequence


def brute_force(model: torch.nn.Module, modules: dict, reference: Variant, variant: Variant | None,
                sequences: list[list[int]]) -> dict[str, float]:
    """Explicit per-position softmax loops in float64, one unpadded sequence at a time."""
    kls, nll, hits = [], [], 0
    for seq in sequences:
        ref, other = logits_of(model, modules, reference, seq), logits_of(model, modules, variant, seq)
        for t in range(len(seq) - 1):
            za, zv = ref[t].tolist(), other[t].tolist()
            ma, mv = max(za), max(zv)
            sa = sum(math.exp(z - ma) for z in za)
            sv = sum(math.exp(z - mv) for z in zv)
            kl = 0.0
            for a, v in zip(za, zv, strict=True):
                pa, pv = math.exp(a - ma) / sa, math.exp(v - mv) / sv
                kl += pa * math.log(pa / pv)
            kls.append(kl)
            nll.append(-math.log(math.exp(zv[seq[t + 1]] - mv) / sv))
            hits += za.index(max(za)) == zv.index(max(zv))
    ordered = sorted(kls)
    position = 0.99 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    p99 = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return {"kl_mean": sum(kls) / len(kls), "kl_p99": p99, "top1": hits / len(kls),
            "ppl": math.exp(sum(nll) / len(nll)), "positions": len(kls)}


def test_kl_top1_ppl_and_effect_kept_match_brute_force(llama: dict[str, Any]) -> None:
    variants = llama["variants"]
    reference = variants["identity"]
    chosen = [variants[label] for label in ("svd-r1", "int4-g128", "svd-r2+int4-g128")]
    sequences = random_sequences(5, 2, 14) + [[7]]  # one single-token sequence: no next-token position
    result = evaluate_variants(llama["model"], llama["modules"], sequences, reference, chosen, batch_size=3)
    base = brute_force(llama["model"], llama["modules"], reference, None, sequences)
    assert result["metric"] == "kl" and result["positions"] == base["positions"] == sum(
        len(s) - 1 for s in sequences)
    assert result["kl_adapter_base"] == pytest.approx(base["kl_mean"], rel=1e-5)
    assert result["kl_adapter_base_p99"] == pytest.approx(base["kl_p99"], rel=1e-5)
    assert result["base_ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert result["adapter_ppl"] == pytest.approx(
        brute_force(llama["model"], llama["modules"], reference, reference, sequences)["ppl"], rel=1e-6)
    for variant, row in zip(chosen, result["variants"], strict=True):
        expected = brute_force(llama["model"], llama["modules"], reference, variant, sequences)
        assert row["label"] == variant.label and row["bytes"] == variant.bytes
        assert row["kl_mean"] > 0
        assert row["kl_mean"] == pytest.approx(expected["kl_mean"], rel=1e-5)
        assert row["kl_p99"] == pytest.approx(expected["kl_p99"], rel=1e-5)
        assert row["top1"] == pytest.approx(expected["top1"])
        assert row["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
        assert row["effect_kept"] == pytest.approx(1 - expected["kl_mean"] / base["kl_mean"], rel=1e-5)


def test_identity_keeps_everything_and_zero_keeps_nothing(llama: dict[str, Any]) -> None:
    reference = llama["variants"]["identity"]
    sequences = random_sequences(6, 3, 20, seed=1)
    result = evaluate_variants(llama["model"], llama["modules"], sequences, reference,
                               [reference, zero_variant(reference)], batch_size=4)
    identity, zero = result["variants"]
    assert identity["kl_mean"] == 0.0 and identity["kl_p99"] == 0.0
    assert identity["top1"] == 1.0 and identity["effect_kept"] == 1.0
    assert identity["ppl"] == result["adapter_ppl"]
    assert result["kl_adapter_base"] > 0
    assert zero["kl_mean"] == result["kl_adapter_base"]
    assert zero["effect_kept"] == 0.0
    assert zero["ppl"] == result["base_ppl"]


def test_zero_adapter_has_no_effect_to_keep(tmp_path: Path) -> None:
    folder, _ = make_peft_adapter(tmp_path, "llama", r=2, init_lora_weights=True)  # PEFT's B = 0
    adapter = load_adapter(folder)
    model = tiny_llama()
    modules = match_modules(model, list(adapter.modules)).modules
    variants = build_variants(adapter, ranks=(1,), schemes=("int8-channel",), mixed_schemes=())
    section = evaluate_variants(model, modules, random_sequences(3, 4, 9), variants[0], variants)
    assert section["kl_adapter_base"] == 0.0 and section["base_ppl"] == section["adapter_ppl"]
    assert all(row["kl_mean"] == 0.0 and row["effect_kept"] is None for row in section["variants"])
    recommendation = finalize(section)["recommendation"]
    assert recommendation["label"] is None and "does not change" in recommendation["note"]


def test_padding_and_chunking_do_not_change_the_numbers(llama: dict[str, Any]) -> None:
    reference = llama["variants"]["identity"]
    chosen = [llama["variants"]["svd-r1"]]
    sequences = random_sequences(5, 2, 16, seed=2)
    together = evaluate_variants(llama["model"], llama["modules"], sequences, reference, chosen, batch_size=5,
                                 pad_id=3)
    alone = evaluate_variants(llama["model"], llama["modules"], sequences, reference, chosen, batch_size=1,
                              chunk_elements=100)  # one row per float64 chunk
    for key in ("kl_adapter_base", "base_ppl", "adapter_ppl", "positions"):
        assert together[key] == pytest.approx(alone[key], rel=1e-5)
    for key in ("kl_mean", "kl_p99", "top1", "ppl"):
        assert together["variants"][0][key] == pytest.approx(alone["variants"][0][key], rel=1e-5)


def test_hooks_equal_peft_logits_on_tiny_llama_and_gpt2(llama: dict[str, Any], tmp_path: Path) -> None:
    ids = torch.tensor(random_sequences(2, 12, 13, seed=3))
    with torch.no_grad():
        expected = llama["peft"](input_ids=ids).logits
        with apply_variant(llama["modules"], llama["variants"]["identity"]):
            ours = llama["model"](input_ids=ids).logits
        plain = llama["model"](input_ids=ids).logits  # hooks are off again
    assert float((ours - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert float((plain - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    # GPT-2: transformers' Conv1D layers (weight (in, out)), PEFT's fan_in_fan_out path
    folder, peft_gpt2 = make_peft_adapter(tmp_path, "gpt2", r=4, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True)
    adapter = load_adapter(folder)
    model = tiny_gpt2()
    modules = match_modules(model, list(adapter.modules)).modules
    identity = build_variants(adapter, ranks=(1,), schemes=(), mixed_schemes=(), avg_rank=False)[0]
    with torch.no_grad(), apply_variant(modules, identity):
        ours = model(input_ids=ids).logits
        expected = peft_gpt2(input_ids=ids).logits
    assert float((ours - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_hooks_come_off_after_exceptions(llama: dict[str, Any]) -> None:
    model, modules = llama["model"], llama["modules"]
    reference = llama["variants"]["identity"]

    def fail(_: int) -> None:
        raise RuntimeError("stop after the first batch")

    model.train()
    with pytest.raises(RuntimeError, match="stop"):
        evaluate_variants(model, modules, random_sequences(4, 3, 6), reference, [reference], batch_size=2,
                          progress=fail)
    assert all(not m._forward_hooks for m in modules.values())
    assert model.training  # the caller's mode is restored
    model.eval()
    with pytest.raises(KeyError), apply_variant(modules, reference):
        raise KeyError("inside the block")
    assert all(not m._forward_hooks for m in modules.values())


def test_bad_models_and_variants(llama: dict[str, Any]) -> None:
    from transformers import BertForMaskedLM, BertForSequenceClassification

    reference = llama["variants"]["identity"]
    model, modules = llama["model"], llama["modules"]
    with pytest.raises(EndToEndModelError, match="not a causal LM"):
        detect_metric(BertForMaskedLM(tiny_bert().config))
    classifier = BertForSequenceClassification(tiny_bert().config).eval()
    assert detect_metric(classifier) == "cosine"  # no output embeddings: decided by its forward
    with pytest.raises(EndToEndModelError, match="last_hidden_state"):
        evaluate_variants(classifier, {}, [[1, 2, 3]], Variant("empty", "identity", None, None, 0, {}, {}, {}), [])
    assert all(not m._forward_hooks for m in classifier.modules())
    partial = Variant("partial", "svd", 1, None, 0, dict(list(reference.factors.items())[:3]), {}, {})
    with pytest.raises(ModuleMismatchError, match="partial: lacks"):
        evaluate_variants(model, modules, [[1, 2, 3]], reference, [partial])
    name = next(iter(reference.factors))
    wrong = dict(reference.factors)
    wrong[name] = ModuleFactors(torch.zeros(5, 2), torch.zeros(2, 7), 1.0)
    with pytest.raises(ModuleMismatchError, match="do not fit the layer"):
        evaluate_variants(model, modules, [[1, 2, 3]], reference, [Variant("w", "svd", 1, None, 0, wrong, {}, {})])
    with pytest.raises(InvalidOptionError, match="no sequence has two tokens"):
        evaluate_variants(model, modules, [[1], [2]], reference, [reference])
    with pytest.raises(InvalidOptionError, match="unknown end-to-end metric"):
        evaluate_variants(model, modules, [[1, 2]], reference, [reference], metric="bleu")
    peft_modules = match_modules(llama["peft"], list(llama["adapter"].modules)).modules
    with pytest.raises(ModuleMismatchError, match="already holds LoRA"):
        evaluate_variants(llama["peft"], peft_modules, [[1, 2]], reference, [reference])


def test_encoder_pooled_cosine_against_brute_force(tmp_path: Path) -> None:
    folder, _ = make_peft_adapter(tmp_path, "bert", r=4, target_modules=["query", "value", "dense"])
    adapter = load_adapter(folder)
    model = tiny_bert()
    mapping = match_modules(model, list(adapter.modules))
    assert not mapping.unmatched
    variants = build_variants(adapter, ranks=(1,), schemes=("int4-channel",), mixed_schemes=(), avg_rank=False)
    reference = variants[0]
    sequences = random_sequences(5, 2, 12, seed=4)
    chosen = [reference, *variants[1:], zero_variant(reference)]
    section = evaluate_variants(model, mapping.modules, sequences, reference, chosen, batch_size=2)
    assert section["metric"] == "cosine" and section["base_ppl"] is None and section["positions"] == 5

    def pooled(variant: Variant | None, seq: list[int]) -> list[float]:
        with torch.no_grad(), apply_variant(mapping.modules, variant):
            hidden = model(input_ids=torch.tensor([seq])).last_hidden_state[0].double()
        return hidden.mean(dim=0).tolist()

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    references = [pooled(reference, s) for s in sequences]
    base = [1 - cosine(r, pooled(None, s)) for r, s in zip(references, sequences, strict=True)]
    assert section["kl_adapter_base"] == pytest.approx(sum(base) / 5, rel=1e-5)
    identity, svd, quant, zero = section["variants"]
    assert identity["kl_mean"] == 0.0 and identity["cosine_worst"] == 1.0 and identity["effect_kept"] == 1.0
    assert identity["top1"] is None and identity["ppl"] is None
    assert zero["effect_kept"] == pytest.approx(0.0, abs=1e-12)
    for variant, row in ((variants[1], svd), (variants[2], quant)):
        cosines = [cosine(r, pooled(variant, s)) for r, s in zip(references, sequences, strict=True)]
        assert row["cosine_mean"] == pytest.approx(sum(cosines) / 5, rel=1e-6)
        assert row["cosine_worst"] == pytest.approx(min(cosines), rel=1e-6)
        assert row["kl_mean"] == pytest.approx(sum(1 - c for c in cosines) / 5, rel=1e-4)
        assert row["effect_kept"] == pytest.approx(1 - row["kl_mean"] / section["kl_adapter_base"], rel=1e-9)


def test_bf16_forward_keeps_float64_comparisons(llama: dict[str, Any]) -> None:
    model = tiny_llama().to(torch.bfloat16)
    modules = match_modules(model, list(llama["adapter"].modules)).modules
    reference = llama["variants"]["identity"]
    section = evaluate_variants(model, modules, random_sequences(3, 4, 10), reference,
                                [reference, llama["variants"]["svd-r1"]])
    assert section["forward_dtype"] == "bfloat16"
    identity, svd = section["variants"]
    assert identity["kl_mean"] == 0.0 and identity["effect_kept"] == 1.0
    assert 0 < svd["kl_mean"] < section["kl_adapter_base"] * 2 and math.isfinite(svd["ppl"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_float32(llama: dict[str, Any]) -> None:
    sequences = random_sequences(4, 4, 12, seed=5)
    reference = llama["variants"]["identity"]
    chosen = [llama["variants"]["svd-r1"]]
    cpu = evaluate_variants(llama["model"], llama["modules"], sequences, reference, chosen)
    model = tiny_llama().to("cuda", torch.bfloat16)
    modules = match_modules(model, list(llama["adapter"].modules)).modules
    gpu = evaluate_variants(model, modules, sequences, reference, chosen, device="cuda")
    assert gpu["device"].startswith("cuda") and gpu["forward_dtype"] == "bfloat16"
    assert gpu["variants"][0]["kl_mean"] == pytest.approx(cpu["variants"][0]["kl_mean"], rel=0.1)
