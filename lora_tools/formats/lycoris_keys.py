"""Validate one module's LyCORIS tensors and build its update (shared by the kohya-named and PEFT readers).

Tensor layouts are LyCORIS' (lycoris/modules/{loha,lokr,locon,full}.py, which PEFT's loha/lokr layers copy):

- LoHa: hada_w1_a (out, r1), hada_w1_b (r1, in[·k]), hada_w2_a/b likewise; with Tucker cores hada_t1/t2
  (r, r, *k) the w*_a are (r, out) and w*_b (r, in).
- LoKr: lokr_w1 (a, c) or lokr_w1_a (a, r) @ lokr_w1_b (r, c); lokr_w2 (b, d[, *k]) or lokr_w2_a (b, r) @
  lokr_w2_b (r, d[·k]), or with a Tucker core lokr_t2 (r, r, *k), lokr_w2_a (r, b), lokr_w2_b (r, d).
  ΔW = kron(W1, W2) (W1 broadcast over the kernel dims): (a·b, c·d[, *k]).
- LoCon with a Tucker core: lora_down (r, in, 1, 1), lora_mid (r, r, *k), lora_up (out, r, 1, 1).
- Full: ``diff`` is ΔW itself.

The rank that alpha divides by is ComfyUI's (comfy/weight_adapter/{loha,lokr,lora}.py): LoHa ``hada_w1_b``'s first
dimension; LoKr the LoRA dim of the factored side (``lokr_w2_b`` wins over ``lokr_w1_b``; none when both sides are
full: scale 1); LoCon ``lora_down``'s first dimension.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora_tools.errors import AdapterFormatError, ModuleMismatchError, UnsupportedAdapterError
from lora_tools.tensorfile import FLOAT_DTYPES, TensorInfo
from lora_tools.updates import Full, KronSide, LoConTucker, LoHa, LoKr

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
LORA_ROLES = ("lora_down", "lora_up", "lora_mid")
FULL_ROLES = ("diff",)
FAMILIES = {"loha": LOHA_ROLES, "lokr": LOKR_ROLES, "lora": LORA_ROLES, "full": FULL_ROLES}
FAMILY_NAMES = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "lora": "LoRA/LoCon", "full": "full weight diff"}


def family(path: Path, name: str, roles: dict[str, TensorInfo]) -> str:
    """Which kind of update a module's tensors make; a module mixing two kinds is an error."""
    found = [fam for fam, names in FAMILIES.items() if any(r in roles for r in names)]
    if len(found) > 1:
        keys = ", ".join(sorted(info.key for info in roles.values()))
        raise AdapterFormatError(
            f"{path}: module {name} mixes {' and '.join(FAMILY_NAMES[f] for f in found)} tensors ({keys}); one "
            "module holds one kind of update")
    if not found:
        raise AdapterFormatError(f"{path}: module {name} has an alpha or dora_scale but no update tensors")
    return found[0]


def _check(path: Path, name: str, role: str, info: TensorInfo, min_dims: int = 2, max_dims: int | None = None) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(f"{path}: module {name}: {role} tensor {info.key!r} has dtype {info.dtype}; "
                                 "update tensors must be floating point (F32, F16, BF16, F64)")
    dims = len(info.shape)
    if dims < min_dims or (max_dims is not None and dims > max_dims):
        want = f"{min_dims}-D" if max_dims == min_dims else f"at least {min_dims}-D"
        raise AdapterFormatError(f"{path}: module {name}: {role} tensor {info.key!r} is {dims}-D "
                                 f"{list(info.shape)}; expected {want}")
    if info.numel == 0:
        raise AdapterFormatError(f"{path}: module {name}: {role} tensor {info.key!r} is empty {list(info.shape)}")


def _mismatch(path: Path, name: str, what: str, roles: dict[str, TensorInfo], *used: str) -> ModuleMismatchError:
    shapes = ", ".join(f"{r} {list(roles[r].shape)}" for r in used if r in roles)
    return ModuleMismatchError(f"{path}: module {name}: {what} ({shapes})")


def _missing(path: Path, name: str, kind: str, roles: dict[str, TensorInfo], need: tuple[str, ...]) -> None:
    absent = [r for r in need if r not in roles]
    if absent:
        have = ", ".join(r for r in roles if r in FAMILIES["loha"] + FAMILIES["lokr"] + FAMILIES["lora"])
        raise AdapterFormatError(f"{path}: module {name}: {kind} update has {have} but no {', '.join(absent)} "
                                 "(half a pair)")


def build_loha(path: Path, name: str, roles: dict[str, TensorInfo]) -> tuple[LoHa, int]:
    """The LoHa update and the rank alpha divides by."""
    _missing(path, name, "LoHa", roles, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    tucker = "hada_t1" in roles or "hada_t2" in roles
    if tucker:
        _missing(path, name, "LoHa (Tucker)", roles, ("hada_t1", "hada_t2"))
    for role in LOHA_ROLES:
        if role in roles:
            _check(path, name, role, roles[role], 3 if role in ("hada_t1", "hada_t2") else 2,
                   None if role in ("hada_t1", "hada_t2", "hada_w1_b", "hada_w2_b") else 2)
    w1a, w1b, w2a, w2b = (roles[r] for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if tucker:
        t1, t2 = roles["hada_t1"], roles["hada_t2"]
        for t, a, b, tag in ((t1, w1a, w1b, "1"), (t2, w2a, w2b, "2")):
            if len(b.shape) != 2 or t.shape[:2] != (a.shape[0], b.shape[0]):
                raise _mismatch(path, name, f"Tucker core hada_t{tag} does not fit its factors: expected "
                                f"({a.shape[0]}, {b.shape[0]}, *kernel)", roles,
                                f"hada_t{tag}", f"hada_w{tag}_a", f"hada_w{tag}_b")
        if t1.shape[2:] != t2.shape[2:]:
            raise _mismatch(path, name, "the two Tucker cores have different kernels", roles, "hada_t1", "hada_t2")
        out, in_channels, kernel = w1a.shape[1], w1b.shape[1], tuple(t1.shape[2:])
        if (w2a.shape[1], w2b.shape[1]) != (out, in_channels):
            raise _mismatch(path, name, "the two Hadamard terms have different shapes", roles, *LOHA_ROLES)
    else:
        for a, b, tag in ((w1a, w1b, "1"), (w2a, w2b, "2")):
            if a.shape[1] != b.shape[0]:
                raise _mismatch(path, name, f"hada_w{tag}_a and hada_w{tag}_b do not chain (inner dimensions "
                                "differ)", roles, f"hada_w{tag}_a", f"hada_w{tag}_b")
        out, in_channels, kernel = w1a.shape[0], w1b.shape[1], tuple(w1b.shape[2:])
        if w2a.shape[0] != out or w2b.shape[1:] != w1b.shape[1:]:
            raise _mismatch(path, name, "the two Hadamard terms have different shapes", roles, *LOHA_ROLES[:4])
    in_features = in_channels * math.prod(kernel)
    r1, r2 = w1b.shape[0], w2b.shape[0]
    rank = min(r1 * r2, out, in_features)
    update = LoHa(out, in_features, kernel, rank, w1a, w1b, w2a, w2b,
                  roles.get("hada_t1"), roles.get("hada_t2"))
    return update, r1


def _side(path: Path, name: str, roles: dict[str, TensorInfo], n: str) -> KronSide:
    full, a, b, t = (roles.get(f"lokr_w{n}"), roles.get(f"lokr_w{n}_a"), roles.get(f"lokr_w{n}_b"),
                     roles.get(f"lokr_t{n}"))
    if full is not None and (a is not None or b is not None):
        raise _mismatch(path, name, f"LoKr has both lokr_w{n} and lokr_w{n}_a/b; one form per side", roles,
                        f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b")
    if full is None and a is None and b is None:
        have = ", ".join(r for r in roles if r.startswith("lokr_"))
        raise AdapterFormatError(f"{path}: module {name}: LoKr update has {have} but neither lokr_w{n} nor "
                                 f"lokr_w{n}_a/lokr_w{n}_b (half a Kronecker pair)")
    if full is not None:
        if t is not None:
            raise _mismatch(path, name, f"a Tucker core lokr_t{n} needs lokr_w{n}_a/b, not a full lokr_w{n}",
                            roles, f"lokr_t{n}", f"lokr_w{n}")
        _check(path, name, f"lokr_w{n}", full, 2, 2 if n == "1" else None)
        return KronSide(w=full)
    _missing(path, name, "LoKr", roles, (f"lokr_w{n}_a", f"lokr_w{n}_b"))
    _check(path, name, f"lokr_w{n}_a", a, 2, 2)  # type: ignore[arg-type]
    _check(path, name, f"lokr_w{n}_b", b, 2, 2 if (t is not None or n == "1") else None)  # type: ignore[arg-type]
    if t is not None:
        _check(path, name, f"lokr_t{n}", t, 3)
        if t.shape[:2] != (a.shape[0], b.shape[0]):  # type: ignore[union-attr]
            raise _mismatch(path, name, f"Tucker core lokr_t{n} does not fit its factors: expected "
                            f"({a.shape[0]}, {b.shape[0]}, *kernel)", roles,  # type: ignore[union-attr]
                            f"lokr_t{n}", f"lokr_w{n}_a", f"lokr_w{n}_b")
    elif a.shape[1] != b.shape[0]:  # type: ignore[union-attr]
        raise _mismatch(path, name, f"lokr_w{n}_a and lokr_w{n}_b do not chain (inner dimensions differ)", roles,
                        f"lokr_w{n}_a", f"lokr_w{n}_b")
    return KronSide(a=a, b=b, t=t)


def build_lokr(path: Path, name: str, roles: dict[str, TensorInfo]) -> tuple[LoKr, int | None]:
    """The LoKr update and the LoRA dim alpha divides by (None when both sides are full)."""
    if "lokr_t1" in roles:
        raise UnsupportedAdapterError(f"{path}: module {name}: lokr_t1 (a Tucker core on the first Kronecker "
                                      "side) is applied by neither LyCORIS nor ComfyUI; refusing to guess its form")
    side1, side2 = _side(path, name, roles, "1"), _side(path, name, roles, "2")
    kernel: tuple[int, ...] = ()
    if side2.w is not None:
        kernel = tuple(side2.w.shape[2:])
    elif side2.t is not None:
        kernel = tuple(side2.t.shape[2:])
    elif side2.b is not None:
        kernel = tuple(side2.b.shape[2:])
    in_channels = side1.cols * (side2.cols // max(1, math.prod(kernel)))
    out = side1.rows * side2.rows
    update = LoKr(out, in_channels * math.prod(kernel), kernel, side1.rank * side2.rank, side1, side2)
    # ComfyUI: dim = w1_b.shape[0], overridden by w2_b.shape[0]; alpha / dim, or 1 without a factored side.
    dim = side2.inner if side2.inner is not None else side1.inner
    return update, dim


def build_locon_tucker(path: Path, name: str, roles: dict[str, TensorInfo]) -> tuple[LoConTucker, int]:
    _missing(path, name, "LoCon (Tucker)", roles, ("lora_down", "lora_up", "lora_mid"))
    down, up, mid = roles["lora_down"], roles["lora_up"], roles["lora_mid"]
    for role, info, dims in (("lora_down", down, 2), ("lora_up", up, 2), ("lora_mid", mid, 3)):
        _check(path, name, role, info, dims)
    if math.prod(down.shape[2:]) != 1 or math.prod(up.shape[2:]) != 1:
        raise _mismatch(path, name, "with a Tucker core lora_mid, lora_down and lora_up must be 1x1", roles,
                        "lora_down", "lora_up", "lora_mid")
    if mid.shape[:2] != (up.shape[1], down.shape[0]):
        raise _mismatch(path, name, f"Tucker core lora_mid has the wrong rank: expected ({up.shape[1]}, "
                        f"{down.shape[0]}, *kernel)", roles, "lora_down", "lora_mid", "lora_up")
    kernel = tuple(mid.shape[2:])
    in_features = down.shape[1] * math.prod(kernel)
    rank = min(up.shape[1], up.shape[0], in_features)
    return LoConTucker(up.shape[0], in_features, kernel, rank, up, down, mid), down.shape[0]


def build_full(path: Path, name: str, roles: dict[str, TensorInfo]) -> Full:
    diff = roles["diff"]
    _check(path, name, "diff", diff, 2)
    out, in_features = diff.shape[0], math.prod(diff.shape[1:])
    return Full(out, in_features, tuple(diff.shape[2:]), min(out, in_features), diff)


def check_alpha(path: Path, name: str, alpha: float, kind: str) -> None:
    """alpha divides into the scale: zero is read as 'alpha = rank' by LyCORIS but as scale 0 by ComfyUI, and a
    negative alpha flips the update; refuse both rather than pick one."""
    if alpha <= 0:
        raise AdapterFormatError(f"{path}: module {name}: {kind} alpha is {alpha:g}; it must be positive (alpha/"
                                 "rank scales the update; LyCORIS reads 0 as alpha = rank, ComfyUI as scale 0)")


def dora_layout(path: Path, name: str, info: TensorInfo, out: int, in_features: int,
                kernel: tuple[int, ...]) -> str:
    """LyCORIS' weight-decomposition scale is (out, 1, ...) (wd_on_out, its default) or (1, in, ...): which."""
    shape = info.shape
    in_channels = in_features // max(1, math.prod(kernel))
    if len(shape) >= 2 and shape[0] == out and math.prod(shape[1:]) == 1:
        return "dora_out"
    if len(shape) >= 2 and shape[0] == 1 and math.prod(shape[2:]) == 1 and (
            shape[1] == in_channels or (not kernel and shape[1] and in_features % shape[1] == 0)):
        return "dora_in"
    raise ModuleMismatchError(
        f"{path}: module {name}: dora_scale {info.key!r} is {list(shape)}, but the update is {out} x "
        f"{in_features}: expected ({out}, 1, ...) or (1, {in_channels}, ...)")
