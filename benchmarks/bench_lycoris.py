"""Benchmark exact LyCORIS spectra (issue 10) against forming ΔW and a dense SVD, side by side in one run.

Two updates on a 4096 x 4096 layer, stored as a kohya-named LyCORIS file (float32, random factors):

- LoHa with r1 = r2 = 16: ΔW = (W1a·W1b) ⊙ (W2a·W2b)·alpha/r, an exact LoRA of rank 256 (face-splitting and
  Khatri–Rao products of the factors); loratools: QR of the (4096, 256) factors and a 256 x 256 SVD.
- LoKr as LyCORIS makes it by default for 4096 x 4096 (factor -1: 64 x 64 sides, lokr_w1 full, lokr_w2 factored
  at dim 16): ΔW = kron(W1, W2a·W2b)·alpha/dim, rank 64·16 = 1024; loratools: σ(kron) = {σi(W1)·σj(W2)}.

(a) loratools: ``analyze_module`` (what ``inspect`` runs per module: checks, spectrum, metrics) on the module of
    a freshly loaded adapter, median of ``--repeats`` runs.
(b) the dense path: form ΔW from the stored tensors as ComfyUI does (float32), then ``torch.linalg.svdvals``.

Check: every singular value of (a) agrees with (b) to 1e-5 of σ_max (the dense path rounds in float32), and the
dense float32 reconstruction equals ``Adapter.delta_weight`` to float32 rounding.

Usage::

    python benchmarks/bench_lycoris.py --threads 1                 # print the table
    python benchmarks/bench_lycoris.py --threads 1 --write-report  # ... and update reports/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import DEFAULT_REPORT, write_section  # noqa: E402

from lora_tools.analysis import analyze_module  # noqa: E402
from lora_tools.formats import load_adapter  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "## LyCORIS spectra (issue 10)"
SIZE, LOHA_RANK, LOKR_SIDE, LOKR_DIM, ALPHA = 4096, 16, 64, 16, 8.0
TOLERANCE = 1e-5  # of σ_max


def make_file(path: Path, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    r, s, d = LOHA_RANK, LOKR_SIDE, LOKR_DIM
    tensors = {
        "lora_unet_loha.hada_w1_a": randn(SIZE, r, std=0.1), "lora_unet_loha.hada_w1_b": randn(r, SIZE),
        "lora_unet_loha.hada_w2_a": randn(SIZE, r, std=0.1), "lora_unet_loha.hada_w2_b": randn(r, SIZE),
        "lora_unet_loha.alpha": torch.tensor(ALPHA),
        "lora_unet_lokr.lokr_w1": randn(s, s, std=0.1),
        "lora_unet_lokr.lokr_w2_a": randn(s, d, std=0.1), "lora_unet_lokr.lokr_w2_b": randn(d, s),
        "lora_unet_lokr.alpha": torch.tensor(ALPHA),
    }
    save_file(tensors, str(path))


def dense_delta(path: Path, name: str) -> torch.Tensor:
    """ΔW formed from the stored tensors, float32, the way ComfyUI's loaders do (weight_adapter/loha.py, lokr.py)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        t = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
    if "hada_w1_a" in t:
        scale = float(t["alpha"]) / t["hada_w1_b"].shape[0]
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    scale = float(t["alpha"]) / t["lokr_w2_b"].shape[0]
    return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * scale


def measure(path: Path, name: str, repeats: int) -> dict:
    adapter = load_adapter(path)
    module = adapter.modules[name]
    times, row = [], {}
    for _ in range(repeats + 1):  # run 0 warms up and is not timed
        start = time.perf_counter()
        row = analyze_module(adapter, module)
        times.append(time.perf_counter() - start)
    ours_time = statistics.median(times[1:])
    start = time.perf_counter()
    delta = dense_delta(path, name)
    form_time = time.perf_counter() - start
    start = time.perf_counter()
    dense_S = torch.linalg.svdvals(delta).double()
    svd_time = time.perf_counter() - start
    ours = torch.tensor(row["singular_values"], dtype=torch.float64)
    sigma_max = float(dense_S[0])
    agreement = max(float((ours - dense_S[: ours.numel()]).abs().max()),
                    float(dense_S[ours.numel():].abs().max()) if dense_S.numel() > ours.numel() else 0.0)
    reconstruction = float((adapter.delta_weight(name, torch.float64) - delta.double()).norm()
                           / delta.double().norm())
    return {"kind": module.update_kind, "rank": module.rank, "ours": ours_time, "form": form_time,
            "svd": svd_time, "agreement": agreement / sigma_max, "sigma_max": sigma_max,
            "reconstruction": reconstruction}


def render(results: dict[str, dict], threads: int) -> str:
    lines = [f"One 4096 x 4096 layer each, float32 factors, alpha {ALPHA:g}. Machine: {platform.machine()}, "
             f"{threads} torch thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}.", "",
             "| update | exact rank | loratools spectrum (analyze_module, median) | dense: form ΔW | dense: svdvals "
             "| dense total | speed-up | max abs σ difference / σ_max | ‖ΔW_ours − ΔW_dense‖/‖ΔW_dense‖ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in results.items():
        dense = r["form"] + r["svd"]
        lines.append(f"| {label} | {r['rank']} | {r['ours'] * 1e3:.1f} ms | {r['form']:.2f} s | {r['svd']:.2f} s | "
                     f"{dense:.2f} s | **{dense / r['ours']:,.0f}x** | {r['agreement']:.1e} | "
                     f"{r['reconstruction']:.1e} |")
    worst = max(r["agreement"] for r in results.values())
    lines += ["", f"Every singular value agrees with the dense float32 SVD to {worst:.1e} of σ_max (required: "
              f"{TOLERANCE:g}); the dense path is the one that rounds (float32 ΔW and SVD), loratools computes in "
              "float64 from the stored factors without forming the 4096 x 4096 matrix. LoHa: QR of the (4096, 256) "
              "face-splitting / Khatri–Rao factors and a 256 x 256 SVD; LoKr: the products σi(W1)·σj(W2) of a "
              "64 x 64 SVD and a rank-16 factored side."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of loratools per update (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both paths")
    parser.add_argument("--write-report", action="store_true", help=f"update '{SECTION_TITLE}' in the report")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="report file to update")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lycoris_4096.safetensors"
        make_file(path)
        results = {f"LoHa r1 = r2 = {LOHA_RANK}": measure(path, "lora_unet_loha", args.repeats),
                   f"LoKr W1 {LOKR_SIDE}x{LOKR_SIDE} full ⊗ W2 {LOKR_SIDE}x{LOKR_SIDE} at dim {LOKR_DIM}":
                   measure(path, "lora_unet_lokr", args.repeats)}
    table = render(results, torch.get_num_threads())
    print(table)
    failed = [k for k, r in results.items() if r["agreement"] > TOLERANCE or (r["form"] + r["svd"]) / r["ours"] < 100]
    if args.write_report:
        command = shlex.join([".venv/bin/python", "benchmarks/bench_lycoris.py", *sys.argv[1:]])
        write_section(args.report, SECTION_TITLE, command, table)
    if failed:
        print(f"FAILED (agreement > {TOLERANCE:g} of σ_max or speed-up < 100x): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
