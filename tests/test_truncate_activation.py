"""Activation-aware truncation (`truncate --base --calib`): the rank-k update that minimises the output error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_tools.calibration import activation_aware_factors
from lora_tools.data import example_adapter_path
from lora_tools.formats import load_adapter
from lora_tools.truncate import truncate
from tests.helpers import lora_tensors, run_cli, write_peft


def correlated_inputs(dim: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance, like real activations (a few dominant directions)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, dim,
                                                                                        dtype=torch.float64)
    return torch.randn(tokens, dim, generator=gen, dtype=torch.float64) @ mixing.T  # (T, in)


def output_error(delta: torch.Tensor, approx: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((delta - approx) @ X.T))


def test_factors_give_the_dense_optimum_and_its_error() -> None:
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.randn(6, 20, generator=gen,
                                                                                dtype=torch.float64)
    X = correlated_inputs(20, 200, 1)
    C = X.T @ X
    delta = 0.5 * B @ A
    U, values, T = activation_aware_factors(B, A, 0.5, C)
    dense_values, dense_vectors = torch.linalg.eigh(delta @ C @ delta.T)
    torch.testing.assert_close(values, dense_values.flip(0)[:6].clamp_min(0), rtol=1e-9, atol=1e-9)
    for k in range(1, 7):
        approx = U[:, :k] @ T[:k]
        reference = dense_vectors[:, -k:] @ dense_vectors[:, -k:].T @ delta
        torch.testing.assert_close(approx, reference, rtol=1e-8, atol=1e-10)
        assert output_error(delta, approx, X) == pytest.approx(float(values[k:].sum()) ** 0.5, rel=1e-7, abs=1e-9)


def test_truncate_with_covariances_beats_plain_svd_on_outputs(tmp_path: Path) -> None:
    modules = {"q_proj": (24, 16, 8), "v_proj": (16, 16, 8)}
    folder = write_peft(tmp_path / "a", lora_tensors(modules, seed=3), r=8, lora_alpha=16)
    adapter = load_adapter(folder)
    inputs = {name: correlated_inputs(16, 300, seed) for seed, name in enumerate(modules)}
    covariances = {name: X.T @ X for name, X in inputs.items()}
    aware = truncate(adapter, rank=3, dtype="fp32", covariances=covariances)
    plain = truncate(adapter, rank=3, dtype="fp32")
    for name, X in inputs.items():
        delta = adapter.delta_weight(name, torch.float64)
        aware_err = output_error(delta, aware.adapter.delta_weight(name, torch.float64), X)
        plain_err = output_error(delta, plain.adapter.delta_weight(name, torch.float64), X)
        assert aware_err < plain_err
        row = next(r for r in aware.report["modules"] if r["name"] == name)
        assert row["method"] == "activation-aware" and row["new_rank"] == 3
        total = float(torch.linalg.norm(delta @ X.T))
        assert row["rel_output_error"] == pytest.approx(aware_err / total, rel=1e-5)
        # Weight-space numbers stay exact: ΔŴ is an orthogonal projection of ΔW.
        weight_err = float(torch.linalg.norm(delta - aware.adapter.delta_weight(name, torch.float64)))
        assert row["rel_fro_error"] == pytest.approx(weight_err / float(torch.linalg.norm(delta)), rel=1e-5)
        assert row["rel_fro_error"] == pytest.approx((1 - row["retained_energy"]) ** 0.5, rel=1e-12)


@pytest.mark.skipif(not example_adapter_path().joinpath("adapter_config.json").exists(), reason="no example")
def test_cli_on_the_bundled_example_with_the_real_base(tmp_path: Path) -> None:
    out = tmp_path / "act"
    result = run_cli("truncate", "--rank", "4", "--calib", "bundled", "--max-tokens", "1600", "-o", str(out),
                     "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["tokens"] == 1600
    assert all(m["method"] == "activation-aware" and m["new_rank"] == 4 for m in report["modules"])
    assert all(m["retained_output_energy"] > m["retained_energy"] for m in report["modules"])
    assert load_adapter(out).modules["encoder.layer.0.attention.self.query"].rank == 4


def test_bad_calibration_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = run_cli("truncate", "--rank", "2", "--calib", str(empty), "-o", str(tmp_path / "o"))
    assert result.exit_code == 1 and "calibration file is empty" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not example_adapter_path().joinpath("adapter_config.json").exists(), reason="no example")
def test_too_few_calibration_tokens_are_refused_with_the_numbers(tmp_path: Path) -> None:
    """MiniLM's output dense layers take 1536 inputs: from 256 tokens their covariance is rank-deficient."""
    from tests.helpers import assert_one_line_error

    out = tmp_path / "act"
    result = run_cli("truncate", "--rank", "4", "--calib", "bundled", "--max-tokens", "256", "-o", str(out), "--quiet")
    assert_one_line_error(result, "256 calibration tokens", "needs at least 1536", "output.dense")
    assert not out.exists()
