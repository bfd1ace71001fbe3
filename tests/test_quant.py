"""Quantization primitives: exact on-grid round trips, rounding rule, granularity, honest bytes, bad names."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.errors import InvalidOptionError
from lora_tools.quant import (
    PerGroup,
    PerRow,
    PerTensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    get_scheme,
    quantize,
    quantized_bytes,
)


def test_registry_parses_names() -> None:
    assert get_scheme("int8-tensor").granularity == PerTensor()
    assert get_scheme("int8-channel").granularity == PerRow()
    assert get_scheme("int4-g128").granularity == PerGroup(128)
    assert get_scheme("INT8-g32").name == "int8-g32"
    assert get_scheme("int4-channel").qmax == 7 and get_scheme("int8-g64").qmax == 127


@pytest.mark.parametrize("name", ["int3-g128", "int8-g0", "fp8", "int8-row", ""])
def test_unknown_scheme_lists_valid_ones(name: str) -> None:
    with pytest.raises(InvalidOptionError, match="int8-channel"):
        get_scheme(name)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 6), inp=st.integers(1, 300), seed=st.integers(0, 10_000),
       name=st.sampled_from(["int8-tensor", "int8-channel", "int8-g128", "int4-g7", "int4-channel"]),
       exponent=st.integers(-12, 4))
def test_on_grid_values_round_trip_exactly(out: int, inp: int, seed: int, name: str, exponent: int) -> None:
    scheme = get_scheme(name)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-scheme.qmax, scheme.qmax + 1, (out, inp), generator=gen)
    codes[:, 0] = scheme.qmax  # every row (and group 0) reaches qmax, so amax / qmax is the grid step
    if isinstance(scheme.granularity, PerGroup):
        codes[:, ::scheme.granularity.group_size] = scheme.qmax
    step = 2.0 ** exponent * 1.5  # representable in float16
    w = codes.float() * step
    w_hat, steps = fake_quantize(w, scheme)
    assert torch.equal(w_hat, w)
    assert torch.all(steps == step)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(["int8-tensor", "int8-channel", "int8-g16", "int4-g16"]))
def test_error_is_at_most_half_a_step(seed: int, name: str) -> None:
    scheme = get_scheme(name)
    w = torch.randn(7, 50, generator=torch.Generator().manual_seed(seed))
    w_hat, steps = fake_quantize(w, scheme)
    assert torch.all((w_hat - w).abs() <= steps / 2 * (1 + 1e-5) + 1e-12)
    codes = quantize(w, choose_qparams(w, scheme), scheme)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= scheme.qmax


def test_round_half_to_even_and_symmetry() -> None:
    scheme = get_scheme("int8-tensor")
    w = torch.tensor([[127.0, 2.5, 3.5, -2.5, -127.0, 0.5]])  # scale = 1 exactly
    scale = choose_qparams(w, scheme)
    assert float(scale.flatten()[0]) == 1.0
    assert quantize(w, scale, scheme).tolist() == [[127, 2, 4, -2, -127, 0]]
    assert torch.equal(quantize(-w, scale, scheme), -quantize(w, scale, scheme))


def test_per_channel_beats_per_tensor_with_an_outlier_row() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    w[3] *= 1000.0  # one outlier row inflates the per-tensor scale for every other row
    errors = {}
    for name in ("int8-tensor", "int8-channel"):
        w_hat, _ = fake_quantize(w, get_scheme(name))
        errors[name] = float((w_hat - w).norm())
    assert errors["int8-channel"] <= errors["int8-tensor"]
    rest = torch.ones(16, dtype=torch.bool)
    rest[3] = False
    tensor_rest = (fake_quantize(w, get_scheme("int8-tensor"))[0] - w)[rest].norm()
    channel_rest = (fake_quantize(w, get_scheme("int8-channel"))[0] - w)[rest].norm()
    assert channel_rest < tensor_rest / 100


def test_bytes_include_scales_and_pack_int4() -> None:
    assert quantized_bytes((10, 300), get_scheme("int4-g128")) == 1500 + 10 * 3 * 2
    assert quantized_bytes((10, 300), get_scheme("int8-channel")) == 3000 + 10 * 2
    assert quantized_bytes((10, 300), get_scheme("int8-tensor")) == 3000 + 2
    assert quantized_bytes((3, 3), get_scheme("int4-channel")) == 5 + 3 * 2  # 9 codes -> 5 bytes


def test_zero_matrix_and_dequantize_shape() -> None:
    scheme = get_scheme("int4-g4")
    w = torch.zeros(3, 10)
    scale = choose_qparams(w, scheme)
    assert torch.equal(dequantize(quantize(w, scale, scheme), scale, scheme), w)
