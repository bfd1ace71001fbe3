"""Benchmark `truncate --rank 4` against the dense-SVD path on a Llama-2-7B-shaped r=16 adapter.

(a) loratools: load the adapter, truncate every module to rank 4 from the factors (QR of B and Aᵀ + a 16 x 16 SVD)
    and write the PEFT folder — the whole command's work, medians over repeats.
(b) the dense path of PEFT's SVD conversion / kohya's resize_lora.py: materialise ΔW = s·B·A (float32), run
    torch.linalg.svd on it, keep 4 triplets. Timed on one module of each shape of layer 0 and extrapolated to all
    modules by shape (the dense SVD of a 4096 x 11008 matrix takes seconds; all 224 would take many minutes).

Checks, on the sampled modules: the 16 singular values of both paths agree (relative 1e-5) and the relative
Frobenius error of the rank-4 result is the same whether computed by the dense path or reported by loratools.

Usage::

    python benchmarks/bench_truncate.py                 # print the table
    python benchmarks/bench_truncate.py --write-report  # ... and update reports/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_adapter import LAYER_MODULES, module_specs, write_adapter  # noqa: E402
from sections import DEFAULT_REPORT, write_section  # noqa: E402

from lora_tools.formats import load_adapter, save_adapter  # noqa: E402
from lora_tools.linalg import lowrank_svd  # noqa: E402
from lora_tools.truncate import truncate  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "## truncate (issue 3)"
TARGET_RANK = 4
SV_RTOL = 1e-5


def time_loratools(adapter_dir: Path, work: Path, repeats: int) -> tuple[float, float, dict]:
    """Median seconds of (load + truncate + write) and of truncate alone; the last report."""
    totals, cores = [], []
    report: dict = {}
    for i in range(repeats + 1):  # run 0 warms the page cache and is not timed
        start = time.perf_counter()
        adapter = load_adapter(adapter_dir)
        core_start = time.perf_counter()
        result = truncate(adapter, rank=TARGET_RANK)
        core = time.perf_counter() - core_start
        save_adapter(result.adapter, work / f"out-{i}")
        total = time.perf_counter() - start
        if i:
            totals.append(total)
            cores.append(core)
        report = result.report
    return statistics.median(totals), statistics.median(cores), report


@torch.no_grad()
def dense_module(adapter, name: str) -> dict:
    """The dense path on one module: seconds, its singular values and its rank-4 relative error."""
    module = adapter.modules[name]
    B, A = adapter.factors(name, torch.float32)  # B: (out, 16), A: (16, in)
    start = time.perf_counter()
    delta = module.scale * (B @ A)  # (out, in), materialised
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    new_B, new_A = U[:, :TARGET_RANK] * S[:TARGET_RANK], Vh[:TARGET_RANK]
    seconds = time.perf_counter() - start
    residual = float((delta.double() - new_B.double() @ new_A.double()).norm() / delta.double().norm())
    exact = lowrank_svd(B, A, module.scale).S  # float64, from the factors
    sv_rel = float(((S[: exact.numel()].double() - exact).abs() / exact[0]).max())
    return {"seconds": seconds, "sv_rel": sv_rel, "dense_error": residual}


def run(adapter_dir: Path, layers: int, repeats: int) -> tuple[str, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-truncate-") as tmp:
        total, core, report = time_loratools(adapter_dir, Path(tmp), repeats)
    adapter = load_adapter(adapter_dir)
    errors = {row["name"]: row["rel_fro_error"] for row in report["modules"]}
    shapes: dict[tuple[int, int], dict] = {}
    for sub, fan_in, fan_out in LAYER_MODULES:  # one module per distinct shape, from layer 0
        if (fan_out, fan_in) not in shapes:
            name = f"model.layers.0.{sub}"
            shapes[(fan_out, fan_in)] = {"name": name, **dense_module(adapter, name)}
    counts: dict[tuple[int, int], int] = {}
    for spec in module_specs(layers):
        key = (spec.out_features, spec.in_features)
        counts[key] = counts.get(key, 0) + 1
    dense_total = sum(shapes[k]["seconds"] * n for k, n in counts.items())
    rows = []
    for (out, inp), sample in shapes.items():
        ours = errors[sample["name"]]
        rows.append(f"| {sample['name']} | {out} x {inp} | {counts[(out, inp)]} | {sample['seconds']:.2f} s | "
                    f"{sample['sv_rel']:.1e} | {sample['dense_error']:.6f} | {ours:.6f} | "
                    f"{abs(sample['dense_error'] - ours):.1e} |")
    max_sv = max(s["sv_rel"] for s in shapes.values())
    max_err = max(abs(s["dense_error"] - errors[s["name"]]) for s in shapes.values())
    speedup = dense_total / core
    table = "\n".join([
        f"Adapter: {len(report['modules'])} modules (Llama-2-7B shapes, {layers} layers, r=16, fp16), "
        f"`truncate --rank {TARGET_RANK}`. Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}.",
        "",
        "| path | seconds (all modules) |",
        "| --- | --- |",
        f"| loratools: load + truncate + write PEFT folder (median of {repeats}) | {total:.2f} |",
        f"| loratools: truncate alone (median of {repeats}) | {core:.2f} |",
        f"| dense ΔW + torch.linalg.svd, extrapolated from the samples below | {dense_total:.1f} |",
        "",
        f"**Speed-up (dense / loratools truncate): {speedup:,.0f}x**; including load and write: "
        f"{dense_total / total:,.0f}x.",
        "",
        "| sampled module | ΔW shape | modules of this shape | dense time | max \\|Δσ\\|/σ_max | dense rank-4 "
        "error | loratools reported error | difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Singular values agree to {max_sv:.1e} of σ_max (required {SV_RTOL:g}); rank-4 relative Frobenius "
        f"errors agree to {max_err:.1e}. Parameters {report['params_before']:,} -> {report['params_after']:,}; "
        f"tensor bytes {report['bytes_before']:,} -> {report['bytes_after']:,}.",
    ])
    ok = max_sv <= SV_RTOL and max_err <= 1e-5 and speedup >= 500
    return table, {"ok": ok, "speedup": speedup}


def write_report(report: Path, command: str, table: str, title: str = SECTION_TITLE) -> None:
    write_section(report, title, command, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, help="reuse this synthetic adapter folder instead of building one")
    parser.add_argument("--layers", type=int, default=32, help="layers of the adapter to build (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of loratools (default: 3)")
    parser.add_argument("--write-report", action="store_true", help=f"update '{SECTION_TITLE}' in the report")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="report file to update")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both paths (default: torch's); 1 is the fair choice on a shared "
                             "machine, where threads of small ops mostly wait on each other")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = list(sys.argv if argv is None else [sys.argv[0], *argv])
    with tempfile.TemporaryDirectory(prefix="bench-truncate-adapter-") as tmp:
        adapter_dir = args.adapter or write_adapter(Path(tmp) / "adapter", layers=args.layers)
        table, result = run(adapter_dir, args.layers, args.repeats)
    print(table)
    if args.write_report:
        command = shlex.join([".venv/bin/python", "benchmarks/bench_truncate.py", *raw[1:]])
        write_report(args.report, command, table)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
