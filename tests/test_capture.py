"""Layer-input capture: hooks always come off, padding is dropped, C is X Xᵀ, the held-out split is fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tools.capture import (
    CovarianceAccumulator,
    capture_inputs,
    holdout_split,
    lora_hooks,
    read_documents,
    run_model,
)
from lora_tools.errors import InvalidOptionError
from tests.conftest import tiny_bert


def _query_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: mod for name, mod in model.named_modules() if name.endswith("attention.self.query")}


def test_hooks_removed_even_when_the_forward_fails() -> None:
    model = tiny_bert()
    modules = _query_modules(model)

    def boom(name: str, x: torch.Tensor) -> None:
        raise RuntimeError("inside the hook")

    with pytest.raises(RuntimeError), capture_inputs(modules, boom) as state:
        state.mask = None
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert all(not m._forward_hooks for m in modules.values())
    factors = {n: (torch.zeros(m.out_features, 2), torch.zeros(2, m.in_features), 1.0) for n, m in modules.items()}
    with pytest.raises(KeyError), lora_hooks(modules, factors):
        raise KeyError("outside")
    assert all(not m._forward_hooks for m in modules.values())


def test_padding_tokens_are_dropped_and_gram_is_exact() -> None:
    model = tiny_bert()
    modules = _query_modules(model)
    name = next(iter(modules))
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    padded = CovarianceAccumulator(32)
    run_model(model, modules, sequences, lambda n, x: padded.update(x) if n == name else None, pad_id=0,
              batch_size=3)
    one_by_one = CovarianceAccumulator(32)
    inputs = []
    for seq in sequences:
        run_model(model, modules, [seq], lambda n, x: (one_by_one.update(x), inputs.append(x)) if n == name
                  else None, pad_id=0, batch_size=1)
    assert padded.tokens == one_by_one.tokens == 10
    X = torch.cat(inputs).double()  # (T, in)
    torch.testing.assert_close(one_by_one.gram, X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.gram, one_by_one.gram, rtol=1e-4, atol=1e-4)


def test_lora_hooks_add_the_update() -> None:
    layer = torch.nn.Linear(6, 4)
    B, A = torch.randn(4, 2), torch.randn(2, 6)
    x = torch.randn(3, 6)
    with lora_hooks({"l": layer}, {"l": (B, A, 0.5)}):
        out = layer(x)
    torch.testing.assert_close(out, layer(x) + 0.5 * x @ (B @ A).T)


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    calib, hold = holdout_split(40, 0.25)
    assert (calib, hold) == holdout_split(40, 0.25)
    assert len(hold) == 10 and not set(calib) & set(hold) and sorted(calib + hold) == list(range(40))
    assert holdout_split(2, 0.25) == ([0], [1]) or len(holdout_split(2, 0.25)[1]) == 1
    assert holdout_split(5, 0.0)[1] == []
    with pytest.raises(InvalidOptionError):
        holdout_split(5, 1.0)


def test_read_documents(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond\n\nthird  with   spaces\n")
    assert read_documents(path) == ["first doc line two", "second", "third with spaces"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InvalidOptionError, match="empty"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(InvalidOptionError, match="not text"):
        read_documents(tmp_path / "bin.txt")


@pytest.mark.parametrize("dim", [3, 1024, 1500, 2600])
def test_covariance_from_lower_panels_equals_brute_force(dim: int) -> None:
    """C is accumulated as lower-triangle panels of GRAM_BLOCK columns and assembled on first read: it must equal
    Σ x xᵀ in float64 (to the float32 per-batch products' rounding), be exactly symmetric, and keep accumulating
    correctly after it was read."""
    from lora_tools.capture import CovarianceAccumulator

    gen = torch.Generator().manual_seed(dim)
    batches = [torch.randn(200, dim, generator=gen) for _ in range(3)]
    acc = CovarianceAccumulator(dim)
    for x in batches:
        acc.update(x)
    X = torch.cat(batches).double()
    expected = X.T @ X
    C = acc.gram
    assert torch.equal(C, C.T)
    assert float((C - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    acc.update(batches[0])
    again = expected + batches[0].double().T @ batches[0].double()
    assert float((acc.gram - again).abs().max()) <= 1e-6 * float(again.abs().max())
    assert acc.tokens == 800
