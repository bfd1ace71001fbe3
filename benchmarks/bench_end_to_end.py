"""Wall time and peak memory of the end-to-end compare-quant runs that `make demo` makes (issue 9).

Targets: the default run on the bundled SmolLM2 example (`compare-quant --example llm`: per-layer comparison plus
every whole-adapter variant through the full model) within 3 minutes and 4 GB peak RSS on the 2-core CPU machine;
the MiniLM run (`compare-quant --end-to-end`) within 60 s. Each run is a fresh process, as a user starts it; peak
RSS is sampled every 20 ms with psutil (short spikes can be missed: the kernel's own maximum, from wait4, is
reported beside it).

    .venv/bin/python benchmarks/bench_end_to_end.py --write-report
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import DEFAULT_REPORT, run_measured, write_section  # noqa: E402

SECTION_TITLE = "## compare-quant end to end (issue 9)"
RUNS = {
    "SmolLM2 (`--example llm`, defaults)": ["--example", "llm"],
    "MiniLM (`--end-to-end`, defaults)": ["--end-to-end"],
}


def timed_run(extra: list[str], device: str) -> tuple[float, float, float]:
    """(wall seconds, sampled peak RSS MiB, kernel max RSS MiB of the child) of one run."""
    command = [sys.executable, "-m", "lora_tools", "compare-quant", "--json", "--quiet", "--device", device, *extra]
    wall, peak, kernel, status, _ = run_measured(command)
    if status != 0:
        raise SystemExit(f"compare-quant {' '.join(extra)} failed with status {status}")
    return wall, peak, kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write-report", action="store_true")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = []
    for name, extra in RUNS.items():
        wall, sampled, kernel = timed_run(extra, args.device)
        rows.append(f"| {name} | {args.device} | {wall:.0f} s | {sampled:.0f} MiB | {kernel:.0f} MiB |")
    table = "\n".join([
        "Each run is a fresh `python -m lora_tools compare-quant --json --quiet --device DEVICE ...`: the per-layer",
        "comparison (5 schemes, ranks 1,2,4,8 and equal-byte ranks, 8,192 tokens, 25% held out) and then every",
        "whole-adapter variant (svd, svd-act, quant, svd+quant, avg-rank: 25 for the defaults) on 512 held-out",
        "tokens through the full model.",
        "",
        "| run | device | wall | peak RSS (sampled) | max RSS (kernel, wait4) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Targets: SmolLM2 within 180 s and 4 GB; MiniLM within 60 s. The kernel's maximum is the larger of the two",
        "RSS figures and the one to hold against the target (the heap grows inside a batch of the held-out pass; it",
        "is returned between batches, see lora_tools/memory.py).",
        f"Load average (1 min) {load_before:.1f} before the runs; torch {__import__('torch').__version__}, "
        f"{os.cpu_count()} CPUs.",
    ])
    print(table)
    if args.write_report:
        write_section(args.report, SECTION_TITLE, ".venv/bin/python benchmarks/bench_end_to_end.py --write-report",
                      table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
