"""Benchmark `merge --method svd --rank 16` of two Llama-2-7B-shaped r=16 adapters against the dense path.

(a) loratools: load both adapters, merge every module from the stacked factors (QR of the (out, 32) and (in, 32)
    stacked factors + a 32 x 32 core SVD) and write the PEFT folder. In-process medians over repeats, and once as
    a child process `python -m lora_tools merge ...` for the whole command's wall time and peak RSS (os.wait4).
(b) the dense path of PEFT's add_weighted_adapter(combination_type="svd"): materialise Σ w_i·s_i·B_i·A_i
    (float32, out x in), torch.linalg.svd, keep 16 triplets (without PEFT's 0.99-quantile clamp, so that both
    paths compute the same thing; full_matrices=False, cheaper than PEFT's default). Timed on one module of each
    shape of layer 0 and extrapolated to all modules by shape.

Checks on the sampled modules: the rank-16 results of both paths agree (relative Frobenius difference of the
two merged ΔW, float32 rounding level) and loratools' reported error equals the dense residual.

Usage::

    python benchmarks/bench_merge.py --threads 1                 # print the table
    python benchmarks/bench_merge.py --threads 1 --write-report  # ... and update reports/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_adapter import LAYER_MODULES, module_specs, write_adapter  # noqa: E402
from sections import DEFAULT_REPORT, write_section  # noqa: E402

from lora_tools.formats import load_adapter, save_adapter  # noqa: E402
from lora_tools.merge.run import merge_adapters  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "## merge (issue 5)"
TARGET_RANK = 16
WEIGHTS = (0.6, 0.4)
SEEDS = (1234, 4321)


def time_loratools(paths: list[Path], work: Path, repeats: int) -> tuple[float, float, dict]:
    """Median seconds of (load + merge + write) and of merge alone; the last report."""
    totals, cores = [], []
    report: dict = {}
    for i in range(repeats + 1):  # run 0 warms the page cache and is not timed
        start = time.perf_counter()
        adapters = [load_adapter(p) for p in paths]
        core_start = time.perf_counter()
        result = merge_adapters(adapters, "svd", rank=TARGET_RANK, weights=list(WEIGHTS))
        core = time.perf_counter() - core_start
        save_adapter(result.adapter, work / f"out-{i}")
        total = time.perf_counter() - start
        if i:
            totals.append(total)
            cores.append(core)
        report = result.report
    return statistics.median(totals), statistics.median(cores), report


def time_cli(paths: list[Path], work: Path, threads: int | None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of the whole `loratools merge` command in a fresh interpreter."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    command = [sys.executable, "-m", "lora_tools", "merge", *map(str, paths), "-o", str(work / "cli-out"),
               "--method", "svd", "--rank", str(TARGET_RANK), "--weights", ",".join(map(str, WEIGHTS)), "--quiet"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env, cwd=REPO_ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"loratools merge failed with status {status}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def dense_module(adapters: list, merged, name: str, reported_error: float) -> dict:
    """The dense path on one module: seconds, and how its rank-16 result compares with loratools'."""
    factors = []
    for adapter, weight in zip(adapters, WEIGHTS, strict=True):
        B, A = adapter.factors(name, torch.float32)  # B: (out, 16), A: (16, in)
        factors.append((weight * adapter.modules[name].scale * B, A))
    start = time.perf_counter()
    delta = sum(B @ A for B, A in factors)  # (out, in), materialised
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    dense_merged = (U[:, :TARGET_RANK] * S[:TARGET_RANK]) @ Vh[:TARGET_RANK]
    seconds = time.perf_counter() - start
    ours = merged.delta_weight(name, torch.float32)
    agreement = float((ours - dense_merged).norm() / dense_merged.norm())
    dense_error = float((delta - dense_merged).norm() / delta.norm())
    return {"seconds": seconds, "agreement": agreement, "dense_error": dense_error,
            "error_difference": abs(dense_error - reported_error)}


def run(paths: list[Path], layers: int, repeats: int, threads: int | None) -> tuple[str, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        total, core, report = time_loratools(paths, Path(tmp), repeats)
        cli_seconds, cli_rss = time_cli(paths, Path(tmp), threads)
    adapters = [load_adapter(p) for p in paths]
    # The default output keeps the inputs' fp16, whose rounding (~1e-4) would hide the comparison: compare the
    # float32 output of the same computation.
    exact = merge_adapters(adapters, "svd", rank=TARGET_RANK, weights=list(WEIGHTS), dtype="fp32")
    merged = exact.adapter
    errors = {row["name"]: row["rel_error"] for row in exact.report["modules"]}
    fp16_errors = {row["name"]: row["rel_error"] for row in report["modules"]}
    shapes: dict[tuple[int, int], dict] = {}
    for sub, fan_in, fan_out in LAYER_MODULES:  # one module per distinct shape, from layer 0
        if (fan_out, fan_in) not in shapes:
            name = f"model.layers.0.{sub}"
            shapes[(fan_out, fan_in)] = {"name": name, **dense_module(adapters, merged, name, errors[name])}
    counts: dict[tuple[int, int], int] = {}
    for spec in module_specs(layers):
        key = (spec.out_features, spec.in_features)
        counts[key] = counts.get(key, 0) + 1
    dense_total = sum(shapes[k]["seconds"] * n for k, n in counts.items())
    largest = max(out * inp for out, inp in counts) * 4
    rows = [f"| {s['name']} | {out} x {inp} | {counts[(out, inp)]} | {s['seconds']:.2f} s | {s['agreement']:.1e} | "
            f"{s['dense_error']:.6f} | {errors[s['name']]:.6f} | {fp16_errors[s['name']]:.6f} |"
            for (out, inp), s in shapes.items()]
    max_agreement = max(s["agreement"] for s in shapes.values())
    max_error_diff = max(s["error_difference"] for s in shapes.values())
    speedup = dense_total / core
    input_bytes = sum((p / "adapter_model.safetensors").stat().st_size for p in paths)
    table = "\n".join([
        f"Two adapters: {len(report['modules'])} modules each (Llama-2-7B shapes, {layers} layers, r=16, fp16, "
        f"seeds {SEEDS[0]} and {SEEDS[1]}), `merge --method svd --rank {TARGET_RANK} --weights "
        f"{WEIGHTS[0]},{WEIGHTS[1]}`. Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}.",
        "",
        "| path | seconds (all modules) |",
        "| --- | --- |",
        f"| loratools: load + merge + write PEFT folder (median of {repeats}) | {total:.2f} |",
        f"| loratools: merge alone (median of {repeats}) | {core:.2f} |",
        f"| `loratools merge` command in a fresh interpreter (incl. imports) | {cli_seconds:.2f} |",
        f"| dense Σ w_i·ΔW_i + torch.linalg.svd (PEFT's svd path), extrapolated from the samples below | "
        f"{dense_total:.1f} |",
        "",
        f"**Speed-up (dense / loratools merge): {speedup:,.0f}x**; including load and write: "
        f"{dense_total / total:,.0f}x; against the whole command: {dense_total / cli_seconds:,.0f}x.",
        "",
        "| sampled module | ΔW shape | modules of this shape | dense time | ‖ΔW_ours − ΔW_dense‖/‖ΔW_dense‖ | "
        "dense rank-16 error | loratools reported error (fp32 output) | reported error (default fp16 output) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Both paths give the same merged update: rank-16 results agree to {max_agreement:.1e} (float32 rounding; "
        f"loratools merged with `--dtype fp32` for this check) and the reported errors agree with the dense "
        f"residuals to {max_error_diff:.1e}. The default `--dtype keep` writes the inputs' fp16, which adds fp16 "
        "rounding to the reported error (last column).",
        f"Peak RSS of the whole command: {cli_rss / 2**20:,.0f} MiB (inputs {input_bytes / 2**20:,.0f} MiB, "
        f"memory-mapped; the merged fp16 adapter, {report['params_out'] * 2 / 2**20:,.0f} MiB, is held until it is "
        f"written). The dense path needs {largest / 2**20:,.0f} MiB for the largest single ΔW alone, plus the "
        "SVD's workspace; loratools never allocates an out x in matrix.",
    ])
    ok = max_agreement <= 1e-4 and max_error_diff <= 1e-4 and speedup >= 300
    return table, {"ok": ok, "speedup": speedup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="layers of the adapters to build (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of loratools (default: 3)")
    parser.add_argument("--write-report", action="store_true", help=f"update '{SECTION_TITLE}' in the report")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="report file to update")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both paths (default: torch's); 1 is the fair choice on a shared "
                             "machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = list(sys.argv if argv is None else [sys.argv[0], *argv])
    with tempfile.TemporaryDirectory(prefix="bench-merge-adapters-") as tmp:
        paths = [write_adapter(Path(tmp) / f"adapter-{seed}", layers=args.layers, seed=seed) for seed in SEEDS]
        table, result = run(paths, args.layers, args.repeats, args.threads)
    print(table)
    if args.write_report:
        command = shlex.join([".venv/bin/python", "benchmarks/bench_merge.py", *raw[1:]])
        write_section(args.report, SECTION_TITLE, command, table)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
