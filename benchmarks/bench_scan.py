"""`loratools scan` throughput: --jobs 1, --jobs 2 and --ray on a local 2-CPU Ray instance, in one run.

Writes a synthetic fleet (benchmarks/make_fleet.py: 2,000 adapters by default, into a temp folder that is removed
afterwards unless --keep), scans it three times through the library entry point the CLI uses (run_scan), and
reports for each run: wall time (pool or Ray start included), steady adapters/s (between the 5% and 95% results,
start-up and tail excluded), each worker's peak RSS (the kernel's ru_maxrss, read inside the worker), the load
average, and whether the three runs produced identical lines.

Usage::

    .venv/bin/python benchmarks/bench_scan.py --write-report
    .venv/bin/python benchmarks/bench_scan.py --fleet /tmp/fleet --keep   # reuse a fleet already written
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_fleet import make_fleet  # noqa: E402
from sections import DEFAULT_REPORT, write_section  # noqa: E402

from lora_tools.scan.discover import ScanTask  # noqa: E402
from lora_tools.scan.run import run_scan  # noqa: E402
from lora_tools.scan.worker import ScanOptions, scan_adapter  # noqa: E402

NODES, CORES_PER_NODE, PAPER_ADAPTERS = 32, 32, 100_000


def measured_scan(task: ScanTask, options: ScanOptions) -> dict[str, Any]:
    """scan_adapter, plus the worker's pid and peak RSS so far (KiB on Linux) for the benchmark."""
    line = scan_adapter(task, options)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    line["_worker"] = [os.getpid(), usage.ru_maxrss, usage.ru_utime + usage.ru_stime]
    return line


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else float("nan")


def run_once(name: str, fleet: Path, work: Path, **engine: Any) -> dict[str, Any]:
    stamps: list[float] = []
    peaks: dict[int, int] = {}
    cpu: dict[int, float] = {}

    def on_result(line: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        pid, peak, seconds = line.pop("_worker", (0, 0, 0.0))
        peaks[pid] = max(peaks.get(pid, 0), peak)
        cpu[pid] = max(cpu.get(pid, 0.0), seconds)

    load_before = load()
    output = work / f"{name.replace(' ', '_').replace('-', '')}.jsonl"
    start, cpu_start = time.perf_counter(), time.process_time()
    run_scan([str(fleet)], ScanOptions(), output=output, func=measured_scan, on_result=on_result, force=True,
             **engine)
    wall = time.perf_counter() - start
    driver_cpu = time.process_time() - cpu_start  # the parent's own share of the 2 cores
    count = len(stamps)
    low, high = int(count * 0.05), max(int(count * 0.95) - 1, int(count * 0.05) + 1)
    steady = (high - low) / (stamps[high] - stamps[low]) if count > 20 else count / wall
    rss = [kib / 1024 for kib in peaks.values()]
    result = {"name": name, "adapters": count, "wall": wall, "overall_rate": count / wall, "steady_rate": steady,
              "workers": len(peaks), "rss_max": max(rss), "rss_median": statistics.median(rss),
              "load_before": load_before, "load_after": load(), "output": output, "driver_cpu": driver_cpu,
              # CPU seconds the workers spent per adapter: what the cores, not the other jobs, cost per adapter
              "cpu_ms_per_adapter": 1000 * sum(cpu.values()) / max(1, count)}
    print(f"{name}: {count} adapters, {wall:.1f} s wall, {steady:.1f} adapters/s steady, "
          f"{len(peaks)} workers, peak RSS {max(rss):.0f} MiB, driver CPU {driver_cpu:.1f} s, "
          f"worker CPU {result['cpu_ms_per_adapter']:.0f} ms/adapter, "
          f"load {load_before:.1f} -> {result['load_after']:.1f}",
          flush=True)
    return result


def comparable(path: Path) -> list[str]:
    """The lines without their per-run fields (timings; the benchmark's worker stamp is not written)."""
    out = []
    for text in path.read_text().splitlines():
        line = json.loads(text)
        line.pop("seconds", None)
        line.pop("_worker", None)
        out.append(json.dumps(line, sort_keys=True))
    return out


def fleet_stats(lines_path: Path) -> dict[str, Any]:
    lines = [json.loads(text) for text in lines_path.read_text().splitlines()]
    ok = [line for line in lines if not line["error"]]
    return {"adapters": len(lines), "errors": len(lines) - len(ok), "modules": sum(line["num_modules"] for line in ok),
            "bytes": sum(line["bytes"] or 0 for line in ok)}


def render(results: list[dict[str, Any]], stats: dict[str, Any], identical: bool, gen_seconds: float) -> str:
    rows = ["| run | wall (start included) | overall adapters/s | steady adapters/s | workers | peak RSS per "
            "worker (max / median) | worker CPU per adapter | driver CPU | load avg before -> after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rows.append(f"| {r['name']} | {r['wall']:.1f} s | {r['overall_rate']:.1f} | {r['steady_rate']:.1f} | "
                    f"{r['workers']} | {r['rss_max']:.0f} / {r['rss_median']:.0f} MiB | {r['cpu_ms_per_adapter']:.1f} ms | "
                    f"{r['driver_cpu']:.1f} s | "
                    f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
    by = {r["name"]: r for r in results}
    one, two, ray = by["--jobs 1"], by["--jobs 2"], by["--ray (local, 2 CPUs)"]
    speedup = two["steady_rate"] / one["steady_rate"]
    # On an idle machine two workers would finish two adapters per CPU-time of one: the ceiling the load hides.
    quiet_speedup = 2 * one["cpu_ms_per_adapter"] / two["cpu_ms_per_adapter"]
    quiet_ray = two["cpu_ms_per_adapter"] / ray["cpu_ms_per_adapter"]
    ray_ratio = ray["steady_rate"] / two["steady_rate"]
    cluster_rate = NODES * CORES_PER_NODE * one["steady_rate"] * min(1.0, ray_ratio)
    paper_seconds = PAPER_ADAPTERS / cluster_rate
    per_adapter_bytes = stats["bytes"] / max(1, stats["adapters"] - stats["errors"])
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = [
        f"Fleet: {stats['adapters']:,} synthetic adapters (benchmarks/make_fleet.py, seed 0; {gen_seconds:.0f} s to "
        f"write): PEFT, kohya and diffusers in turn, 1-200 modules (log-uniform), ranks 4-64, layers 64-512 wide, "
        f"fp16; {stats['errors']} broken on purpose (error lines); {stats['modules']:,} modules, "
        f"{stats['bytes'] / 1e9:.2f} GB. Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load averages in the table.", "",
        *rows, "",
        f"- `--jobs 2` / `--jobs 1` (steady): **{speedup:.2f}x** (target 1.7x); `--ray` / `--jobs 2` (steady): "
        f"**{ray_ratio:.2f}** (target within 30%, i.e. >= 0.70). CPU time per adapter, which other load on the "
        f"machine does not change, predicts an idle one: `--jobs 2` / `--jobs 1` = 2 x {one['cpu_ms_per_adapter']:.1f} / {two['cpu_ms_per_adapter']:.1f}"
        f" ms = **{quiet_speedup:.2f}x**, `--ray` / `--jobs 2` = **{quiet_ray:.2f}** (Ray's CPU includes its "
        f"workers' start-up).",
        f"- The three runs wrote identical lines (timings aside): **{identical}**. Peak RSS of the driver process "
        f"(this script, all three runs): {main_rss:.0f} MiB.",
        f"- On paper, {PAPER_ADAPTERS:,} adapters like these on a {NODES}-node Ray cluster of {CORES_PER_NODE} cores "
        f"each ({NODES * CORES_PER_NODE} workers): {one['steady_rate']:.1f} adapters/s per core x "
        f"{NODES * CORES_PER_NODE} x Ray efficiency {min(1.0, ray_ratio):.2f} = {cluster_rate:,.0f} adapters/s, "
        f"so **{paper_seconds / 60:.1f} min** of scanning plus Ray start-up (~10 s), provided the shared file system "
        f"delivers {cluster_rate * per_adapter_bytes / 1e9:.1f} GB/s ({per_adapter_bytes / 1e6:.2f} MB per adapter "
        f"here; real adapters are larger, so on a real fleet reading, not the SVDs, sets the pace). Memory: one "
        f"worker per core at the peak RSS above. Adapters go to Ray in chunks of up to 16 (~1 s tasks), so the "
        f"driver schedules ~{cluster_rate / 16:,.0f} tasks/s, well within one Ray driver's reach.",
        f"- The same on paper for Llama-2-7B-sized adapters (224 modules, r=16, 76 MiB each; `inspect` costs ~0.6 s "
        f"of CPU per adapter beyond interpreter start, section 'inspect (issue 2)'): {PAPER_ADAPTERS:,} x 0.6 s / "
        f"{NODES * CORES_PER_NODE} cores = {PAPER_ADAPTERS * 0.6 / (NODES * CORES_PER_NODE) / 60:.1f} min of CPU "
        f"work, but 7.6 TB to read: ~{7.6e12 / 10e9 / 60:.0f} min at 10 GB/s of aggregate storage bandwidth. At "
        "that scale the storage, not the cluster's CPUs, decides the time.",
    ]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--fleet", type=Path, default=None, help="Use (or create) this fleet folder.")
    parser.add_argument("--keep", action="store_true", help="Keep the fleet and the result files.")
    parser.add_argument("--write-report", action="store_true", help=f"Replace this section of {DEFAULT_REPORT}.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loratools-bench-scan-"))
    fleet = args.fleet or work / "fleet"
    gen_seconds = 0.0
    try:
        if not fleet.exists() or not any(fleet.iterdir()):
            start = time.perf_counter()
            print(make_fleet(fleet, args.count), flush=True)
            gen_seconds = time.perf_counter() - start
        results = [run_once("--jobs 1", fleet, work, jobs=1), run_once("--jobs 2", fleet, work, jobs=2)]
        try:
            import ray  # noqa: F401
        except ImportError:
            sys.exit("ray is not installed: pip install 'loratools[ray]' (or pip install ray) and rerun")
        results.append(run_once("--ray (local, 2 CPUs)", fleet, work, ray_address="", jobs=2))
        identical = len({tuple(comparable(r["output"])) for r in results}) == 1
        body = render(results, fleet_stats(results[0]["output"]), identical, gen_seconds)
        print(body)
        if args.write_report:
            command = ".venv/bin/pip install ray && .venv/bin/python benchmarks/bench_scan.py --write-report"
            write_section(DEFAULT_REPORT, "## scan: adapters/s, local pool vs Ray (issue 13)", command, body)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
