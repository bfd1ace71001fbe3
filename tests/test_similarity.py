"""similarity: φ (Hu et al. 2021) and cosine from the factors, against dense SVDs; CLI table, JSON, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.linalg.products import cosine, lowrank_fro_norm, subspace_similarity
from lora_tools.similarity import similarity
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft
from tests.test_merge import memory_adapter


def dense_phi(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    phi = torch.empty(U1.shape[1], U2.shape[1], dtype=torch.float64)
    for i in range(1, U1.shape[1] + 1):
        for j in range(1, U2.shape[1] + 1):
            phi[i - 1, j - 1] = torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j)
    return phi


def test_phi_and_cosine_match_dense_svds() -> None:
    a = memory_adapter({"q": (20, 15, 4, 2.0)}, seed=1, dtype=torch.float64)
    b = memory_adapter({"q": (20, 15, 3, 0.5)}, seed=2, dtype=torch.float64)
    row = similarity(a, b)["modules"][0]
    da, db = a.delta_weight("q", torch.float64), b.delta_weight("q", torch.float64)
    Ua, _, Vha = torch.linalg.svd(da)
    Ub, _, Vhb = torch.linalg.svd(db)
    assert torch.allclose(torch.tensor(row["phi_left"], dtype=torch.float64), dense_phi(Ua[:, :4], Ub[:, :3]), atol=1e-10)
    assert torch.allclose(torch.tensor(row["phi_right"], dtype=torch.float64), dense_phi(Vha[:4].T, Vhb[:3].T), atol=1e-10)
    dense_cos = float((da * db).sum() / (torch.linalg.matrix_norm(da) * torch.linalg.matrix_norm(db)))
    assert row["cosine"] == pytest.approx(dense_cos, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(2, 20), inp=st.integers(2, 20), rank=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_an_update_is_fully_similar_to_itself(out: int, inp: int, rank: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
    assert cosine(B, A, B, A) == pytest.approx(1.0)
    assert cosine(B, A, -B, A) == pytest.approx(-1.0)
    assert lowrank_fro_norm(B, A) == pytest.approx(float(torch.linalg.matrix_norm(B @ A)), rel=1e-10)
    Q = torch.linalg.qr(B)[0]
    phi = subspace_similarity(Q, Q)
    assert torch.allclose(phi.diagonal(), torch.ones(phi.shape[0], dtype=torch.float64))
    assert bool(((phi >= 0) & (phi <= 1)).all())


def test_cli_similarity_table_json_and_plot(tmp_path: Path) -> None:
    a = write_peft(tmp_path / "a", lora_tensors({"m.q": (8, 6, 2), "m.v": (8, 6, 2)}, seed=1), r=2)
    b = write_peft(tmp_path / "b", lora_tensors({"m.q": (8, 6, 3)}, seed=2), r=3)
    table = run_cli("similarity", str(a), str(b))
    assert table.exit_code == 0, table.output
    assert "φ_U(1,1)" in table.stdout and "only in A: 1" in table.stdout
    plot = tmp_path / "phi.png"
    result = run_cli("similarity", str(a), str(b), "--json", "--no-grids", "--plot", str(plot), "--module", "m.q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_common"] == 1 and "phi_left" not in report["modules"][0]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert_one_line_error(run_cli("similarity", str(a), str(b), "--plot", str(plot)), "already exists")


def test_no_common_module_is_an_error(tmp_path: Path) -> None:
    a = write_peft(tmp_path / "a", lora_tensors({"m.q": (8, 6, 2)}), r=2)
    b = write_peft(tmp_path / "b", lora_tensors({"m.k": (8, 6, 2)}), r=2)
    assert_one_line_error(run_cli("similarity", str(a), str(b)), "no module in common")


def test_zero_update_has_no_subspace(tmp_path: Path) -> None:
    """An untrained module (B = 0) has arbitrary singular vectors: φ is undefined, not 1.0."""

    trained = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}))
    zero_tensors = lora_tensors({"q_proj": (8, 8, 4)}, seed=1)
    zero_tensors["base_model.model.q_proj.lora_B.weight"].zero_()
    zero = write_peft(tmp_path / "b", zero_tensors)
    result = run_cli("similarity", str(trained), str(zero), "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["modules"][0]
    assert row["phi_left_top1"] is None and row["phi_right_full"] is None
    assert row["flags"] == ["zero_update_b"] and row["cosine"] == 0
    plot = run_cli("similarity", str(trained), str(zero), "--plot", str(tmp_path / "p.png"))
    assert plot.exit_code == 1 and "no singular subspace" in plot.stderr
    assert not (tmp_path / "p.png").exists()
