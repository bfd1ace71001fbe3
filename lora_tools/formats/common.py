"""Checks and helpers shared by every format reader."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

from lora_tools.adapter import LoraModule
from lora_tools.errors import AdapterFormatError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.tensorfile import FLOAT_DTYPES, TensorInfo

# Key fragments of adapter kinds that are not LoRA: refused with a message naming what was found.
NON_LORA_MARKERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|[._])ia3_l(\.|$)"), "IA3 (ia3_l)"),
    (re.compile(r"\.on_input$"), "LyCORIS IA3 (on_input)"),
    (re.compile(r"(^|[._])boft_"), "BOFT (boft_*)"),
    (re.compile(r"(^|[._])oft_"), "OFT (oft_*)"),
    (re.compile(r"(^|[._])vera_lambda_"), "VeRA (vera_lambda_*)"),
    (re.compile(r"(^|[._])glora_|\.(a1|a2|b1|b2|bm)\.weight$"), "GLoRA (glora_* / a1, a2, b1, b2)"),
    (re.compile(r"(^|[._])unilora_"), "UniLoRA (unilora_*)"),
)

# Structured updates that loratools reads exactly (lora_tools/updates.py), but only through their own readers
# (formats/lycoris.py, formats/peft_lycoris.py): a LoRA reader meeting them refuses, naming the kind.
STRUCTURED_MARKERS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"(^|[._])hada_(w[12]_[ab]|t[12])(\.|$)"), "LyCORIS LoHa (hada_w*)", "lycoris"),
    (re.compile(r"(^|[._])lokr_(w[12]|t[12])"), "LyCORIS LoKr (lokr_w*)", "lycoris"),
    (re.compile(r"(^|[._])lora_mid(\.|$)"), "LyCORIS LoCon with a Tucker core (lora_mid)", "lycoris"),
    (re.compile(r"\.diff$"), "LyCORIS full weight difference (.diff)", "lycoris"),
    (re.compile(r"(^|[._])lora_E(\.|$)"), "AdaLoRA (lora_E)", "adalora"),
)


def refuse_non_lora(path: Path, keys: Iterable[str], *, allow: Iterable[str] = ()) -> None:
    """Raise if any key belongs to an adapter kind that loratools does not read (IA3, OFT, VeRA, ...), or to a
    structured kind whose reader is not the caller (``allow``: "lycoris", "adalora")."""
    allowed = frozenset(allow)
    for key in keys:
        for pattern, kind in NON_LORA_MARKERS:
            if pattern.search(key):
                raise UnsupportedAdapterError(
                    f"{path}: this is a {kind} adapter (tensor {key!r}), not LoRA; loratools reads LoRA, "
                    "LyCORIS LoHa/LoKr/LoCon/full and AdaLoRA adapters"
                )
        for pattern, kind, reader in STRUCTURED_MARKERS:
            if reader not in allowed and pattern.search(key):
                where = ("a PEFT folder with its adapter_config.json (peft_type ADALORA)" if reader == "adalora"
                         else "the file without --format (LyCORIS files are detected)")
                raise UnsupportedAdapterError(
                    f"{path}: this is a {kind} adapter (tensor {key!r}), not plain LoRA; this reader reads LoRA "
                    f"factors only: read {where}"
                )


# A LoRA factor key in any reader's naming (PEFT lora_A/B, kohya lora_down/up, diffusers lora.down/up and
# processor _lora.down/up). One left among a reader's extra tensors means the file mixes naming schemes.
_ANY_FACTOR_KEY = re.compile(r"([._](lora_A|lora_B|lora_down|lora_up)|\.lora(_linear_layer)?\.(down|up)|_lora\.(down|up))"
                             r"\.weight$")


def refuse_mixed_schemes(path: Path, extras: Iterable[TensorInfo], scheme: str) -> None:
    """Raise if a tensor the reader did not take as a factor is a LoRA factor in another naming scheme (the same
    module stored twice, or two adapters in one file): silently ignoring it would misread the file."""
    for info in extras:
        if _ANY_FACTOR_KEY.search(info.key):
            raise AdapterFormatError(
                f"{path}: tensor {info.key!r} is a LoRA factor named in another scheme than this file's {scheme} "
                "names: LoRA factors under two naming schemes in one file are not supported"
            )


def check_factor(path: Path, module: str, role: str, info: TensorInfo) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(
            f"{path}: module {module}: {role} tensor {info.key!r} has dtype {info.dtype}; "
            "LoRA factors must be floating point (F32, F16, BF16, F64)"
        )
    if len(info.shape) < 2:
        raise AdapterFormatError(
            f"{path}: module {module}: {role} tensor {info.key!r} is {len(info.shape)}-D {list(info.shape)}; "
            "LoRA factors are at least 2-D"
        )
    if info.numel == 0:
        raise AdapterFormatError(f"{path}: module {module}: {role} tensor {info.key!r} is empty "
                                 f"{list(info.shape)}")


def make_module(
    path: Path,
    name: str,
    a_info: TensorInfo,
    b_info: TensorInfo,
    *,
    alpha: float,
    scale: float,
    kind: str | None = None,
    expected_rank: int | None = None,
    rank_source: str = "config",
    **extra: object,
) -> LoraModule:
    """Validate a pair of factors and build the module (A: (r, in, *k), B: (out, r, *1))."""
    check_factor(path, name, "A (down)", a_info)
    check_factor(path, name, "B (up)", b_info)
    rank = a_info.shape[0]
    if b_info.shape[1] != rank or math.prod(b_info.shape[2:]) != 1:
        raise ModuleMismatchError(
            f"{path}: module {name}: factors do not chain: A (down) is {list(a_info.shape)} (r x in), "
            f"B (up) is {list(b_info.shape)} (out x r); expected B's second dimension to be {rank}"
        )
    if expected_rank is not None and expected_rank != rank:
        raise ModuleMismatchError(
            f"{path}: module {name}: {rank_source} says rank {expected_rank} but the tensors have rank {rank} "
            f"(A is {list(a_info.shape)})"
        )
    if kind is None:
        kind = "conv" if len(a_info.shape) > 2 else "linear"
    return LoraModule(name=name, kind=kind, rank=rank, alpha=float(alpha), scale=float(scale),
                      a_info=a_info, b_info=b_info, **extra)  # type: ignore[arg-type]


def pair_factors(path: Path, downs: dict[str, TensorInfo], ups: dict[str, TensorInfo],
                 down_word: str = "A", up_word: str = "B") -> list[str]:
    """Module names that have both factors; a factor without its partner is an error."""
    only_down = sorted(set(downs) - set(ups))
    only_up = sorted(set(ups) - set(downs))
    if only_down or only_up:
        name, have, missing = (only_down[0], down_word, up_word) if only_down else (only_up[0], up_word, down_word)
        raise ModuleMismatchError(
            f"{path}: module {name} has a LoRA {have} factor but no {missing} factor "
            f"({len(only_down) + len(only_up)} unpaired module(s))"
        )
    return list(downs)


def scalar_value(path: Path, key: str, tensor: object) -> float:
    """A stored alpha: a 0-d or one-element tensor."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise AdapterFormatError(f"{path}: alpha entry {key!r} is not a tensor")
    if tensor.numel() != 1:
        raise AdapterFormatError(f"{path}: alpha tensor {key!r} should hold one number, has shape "
                                 f"{list(tensor.shape)}")
    value = float(tensor.reshape(()).to(torch.float64))
    if not math.isfinite(value):
        raise AdapterFormatError(f"{path}: alpha tensor {key!r} is not finite ({value})")
    return value


def write_safetensors(tensors: dict[str, object], path: Path, metadata: dict[str, str]) -> None:
    """Save contiguous tensors (safetensors refuses views and shared storage) with string metadata."""
    from safetensors.torch import save_file

    prepared = {key: t.detach().contiguous().clone() for key, t in tensors.items()}  # type: ignore[attr-defined]
    save_file(prepared, str(path), metadata={k: str(v) for k, v in metadata.items()})


def factor_tensor(source: object, info: TensorInfo) -> object:
    """A factor exactly as stored (its full shape, e.g. 4-D for conv)."""
    return source.get(info.key)  # type: ignore[attr-defined]


def format_number(value: float) -> int | float:
    """8.0 -> 8 (configs and metadata read better with integral alphas as ints); other values unchanged."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)
