"""How much two adapters' updates overlap, per common module, from the factors alone.

The normalised subspace similarity of the LoRA paper (Hu et al. 2021, section 7.2) compares the top-i left
singular vectors of ΔW_A with the top-j of ΔW_B: φ(i, j) = ‖U_A[:, :i]ᵀ U_B[:, :j]‖_F² / min(i, j) ∈ [0, 1]. The
same on the right singular vectors says whether the two updates read the same input directions. The cosine of the
two updates as vectors, ⟨ΔW_A, ΔW_B⟩_F / (‖ΔW_A‖_F ‖ΔW_B‖_F), says whether they push the same way. Singular
vectors come from ``lowrank_svd`` (QR of the factors + an r x r core SVD); no out x in matrix is formed.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_tools.adapter import Adapter
from lora_tools.convert.run import aligned_keys
from lora_tools.errors import ModuleMismatchError
from lora_tools.linalg import lowrank_svd, single_threaded, spectrum_metrics
from lora_tools.linalg.products import cosine, subspace_similarity


def common_modules(a: Adapter, b: Adapter) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(pairs of (name in A, name in B), names only in A, names only in B); across formats by the module each
    name resolves to (``convert``'s name resolution)."""
    keys_a, keys_b = aligned_keys([a, b])
    keys_a = {k: n for n, k in keys_a.items()}
    keys_b = {k: n for n, k in keys_b.items()}
    pairs = [(keys_a[k], keys_b[k]) for k in keys_a if k in keys_b]
    return pairs, [keys_a[k] for k in keys_a if k not in keys_b], [keys_b[k] for k in keys_b if k not in keys_a]


@torch.no_grad()
def module_similarity(a: Adapter, name_a: str, b: Adapter, name_b: str) -> dict[str, Any]:
    """Similarity numbers for one module, with the full φ grids (rows: top-i of A, columns: top-j of B)."""
    mod_a, mod_b = a.modules[name_a], b.modules[name_b]
    if (mod_a.kind, mod_a.weight_shape) != (mod_b.kind, mod_b.weight_shape):
        raise ModuleMismatchError(f"module {name_a}: {a.path} has a {mod_a.kind} update of shape "
                                  f"{list(mod_a.weight_shape)} but {b.path} has a {mod_b.kind} update of shape "
                                  f"{list(mod_b.weight_shape)}; the adapters were trained on different base models")
    B_a, A_a = a.factors(name_a, torch.float64)
    B_b, A_b = b.factors(name_b, torch.float64)
    for adapter, name, factors in ((a, name_a, (B_a, A_a)), (b, name_b, (B_b, A_b))):
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            # an SVD of NaN fails deep inside LAPACK; say which file and module instead
            raise ModuleMismatchError(f"{adapter.path}: module {name}: LoRA factors contain NaN or Inf; "
                                      "no similarity can be computed")
    B_a, B_b = B_a * mod_a.scale, B_b * mod_b.scale
    svd_a, svd_b = lowrank_svd(B_a, A_a), lowrank_svd(B_b, A_b)
    shape = (mod_a.out_features, mod_a.in_features)
    # Singular vectors of (numerically) zero singular values are arbitrary: compare only the directions each
    # update really has. An update that is zero everywhere (untrained B) has no subspace at all.
    k_a, k_b = (spectrum_metrics(svd.S, shape).numerical_rank for svd in (svd_a, svd_b))
    flags = [f"zero_update_{side}" for side, k in (("a", k_a), ("b", k_b)) if k == 0]
    if flags:
        left = right = None
    else:
        left = subspace_similarity(svd_a.U[:, :k_a], svd_b.U[:, :k_b])
        right = subspace_similarity(svd_a.Vh[:k_a].T, svd_b.Vh[:k_b].T)
    return {
        "name": name_a,
        "name_b": name_b,
        "shape": [mod_a.out_features, mod_a.in_features],
        "rank_a": mod_a.rank,
        "rank_b": mod_b.rank,
        "cosine": cosine(B_a, A_a, B_b, A_b),
        "phi_left_top1": float(left[0, 0]) if left is not None else None,
        "phi_left_full": float(left[-1, -1]) if left is not None else None,
        "phi_right_top1": float(right[0, 0]) if right is not None else None,
        "phi_right_full": float(right[-1, -1]) if right is not None else None,
        "phi_left": left.tolist() if left is not None else None,
        "phi_right": right.tolist() if right is not None else None,
        "flags": flags,
    }



def similarity(a: Adapter, b: Adapter, *, grids: bool = True) -> dict[str, Any]:
    """Per common module: cosine of the updates and φ of the left/right singular subspaces (report data)."""
    pairs, only_a, only_b = common_modules(a, b)
    if not pairs:
        raise ModuleMismatchError(f"{a.path} and {b.path} have no module in common (e.g. {next(iter(a.modules))} "
                                  f"vs {next(iter(b.modules))})")
    rows = []
    with single_threaded():
        for name_a, name_b in pairs:
            row = module_similarity(a, name_a, b, name_b)
            if not grids:
                row.pop("phi_left")
                row.pop("phi_right")
            rows.append(row)
    return {"a": str(a.path), "b": str(b.path), "num_common": len(rows), "only_in_a": len(only_a),
            "only_in_b": len(only_b), "modules": rows}
