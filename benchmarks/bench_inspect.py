"""Benchmark ``loratools inspect --json`` against reading the tensors and against dense SVD.

On a synthetic Llama-2-7B LoRA adapter (224 modules, r=16, fp16; see make_synthetic_adapter.py) it
measures, in one run:

(a0) a fresh interpreter that only imports torch and safetensors (baseline for time and RSS);
(a)  reading every tensor with safetensors alone, in a fresh ``python -c`` subprocess (wall clock of
     the whole subprocess, plus the import and read times that subprocess reports about itself);
(b)  ``python -m lora_tools inspect --json ADAPTER`` as a subprocess: wall clock and the child's own
     peak RSS (``os.wait4`` in a small launcher); its JSON must parse and report ``num_modules`` == 7 * layers;
(c)  the dense approach other tools use: ``svdvals(scale * B @ A)`` in float32 for a sample of modules
     of each of the 7 module types, extrapolated to all modules; its top singular values are checked
     against the ``singular_values`` that (b) reports for the same modules.

(a0), (a) and (b) run ``--repeats`` times, interleaved, after one untimed warm-up of (a) and (b) (so the
page cache is warm for all of them); medians are reported. CPU time (user + sys, all threads) is
reported next to wall time because it is far less sensitive to other processes on a shared machine;
the CPU time other processes used during the run is recorded too. Thread settings are left at their
defaults and the same environment is passed to every subprocess; they are recorded in the output.

Usage::

    python benchmarks/bench_inspect.py                 # build a temporary adapter, print the table
    python benchmarks/bench_inspect.py --write-report  # ... and update reports/benchmarks.md
    python benchmarks/bench_inspect.py --adapter DIR   # reuse an adapter made by make_synthetic_adapter.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_adapter import (  # noqa: E402
    CONFIG_NAME,
    KEY_PREFIX,
    LAYER_MODULES,
    WEIGHTS_NAME,
    ModuleSpec,
    module_specs,
    write_adapter,
)
from sections import DEFAULT_REPORT, write_section  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION_TITLE = "## inspect (issue 2)"
SV_RTOL = 1e-4
TARGET_INSPECT_OVER_READ = 2.0
TARGET_DENSE_OVER_INSPECT = 1000.0
TARGET_RSS_OVER_FILE = 2.0
IDLE_BUSY_FRACTION = 0.10  # "idle" for --wait-idle: other processes use < 10% of all CPUs
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# Runs in a fresh interpreter: import, then materialise every tensor (the sum forces a full read).
READ_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import torch
from safetensors import safe_open
t1 = time.perf_counter()
checksum, count, nbytes = 0.0, 0, 0
with safe_open(sys.argv[1], framework="pt") as f:
    for key in f.keys():
        t = f.get_tensor(key)
        checksum += float(t.sum(dtype=torch.float32))
        count += 1
        nbytes += t.numel() * t.element_size()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "tensors": count, "bytes": nbytes,
                  "checksum": checksum, "torch_threads": torch.get_num_threads()}))
"""
BASELINE_SNIPPET = "import torch, safetensors.torch"

# Launcher for every measured subprocess: fork + exec the command, reap it, write its own rusage.
LAUNCHER_SNIPPET = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss,
               "returncode": code}, f)
sys.exit(code)
"""


def n_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------
# Load from other processes


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have been busy since boot (Linux ``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU-seconds used by this process and its reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class OtherLoad:
    """CPU time used by *other* processes between construction and ``fraction()``."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.busy0 = _busy_seconds()
        self.own0 = _own_cpu_seconds()

    def seconds(self) -> float | None:
        busy1 = _busy_seconds()
        if busy1 is None or self.busy0 is None:
            return None
        return max(0.0, (busy1 - self.busy0) - (_own_cpu_seconds() - self.own0))

    def fraction(self) -> float | None:
        """Other processes' CPU time as a fraction of all CPUs over the elapsed wall time."""
        other = self.seconds()
        wall = time.perf_counter() - self.wall0
        return None if other is None or wall <= 0 else other / (wall * n_cpus())


def busy_fraction(window_s: float = 2.0) -> float | None:
    meter = OtherLoad()
    time.sleep(window_s)
    return meter.fraction()


def wait_for_idle(max_wait_s: float) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use < IDLE_BUSY_FRACTION of the CPUs."""
    deadline = time.monotonic() + max_wait_s
    frac = busy_fraction()
    while frac is not None and frac >= IDLE_BUSY_FRACTION and time.monotonic() < deadline:
        print(f"waiting for an idle machine: other processes use {frac:.0%} of the CPUs", flush=True)
        time.sleep(15)
        frac = busy_fraction(5.0)
    return frac


# --------------------------------------------------------------------------------------------------
# Subprocess measurement


@dataclass
class ChildRun:
    """One finished subprocess: wall-clock and CPU seconds, its own peak RSS, exit status, output."""

    wall_s: float
    cpu_s: float
    maxrss_bytes: int
    returncode: int
    stdout: str
    stderr: str


def run_child(cmd: Sequence[str], env: dict[str, str]) -> ChildRun:
    """Run ``cmd`` under a small launcher process and return its wall/CPU time and own peak RSS.

    A child's ``ru_maxrss`` counts the RSS of the process it was forked from (Linux keeps the high-water
    mark of the pre-exec address space), so reaping ``cmd`` directly from this process, which holds
    torch and tensors, would report at least our own RSS. The launcher (``python -S``, ~10 MiB) forks
    ``cmd``, reaps it with ``os.wait4`` and writes its rusage and wall time to a file.
    """
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r", suffix=".json") as usage_file,
    ):
        launcher = [sys.executable, "-S", "-c", LAUNCHER_SNIPPET, usage_file.name, *cmd]
        proc = subprocess.run(
            launcher, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
        out.seek(0)
        err.seek(0)
        usage = json.loads(usage_file.read() or "{}")
        if not usage:
            raise RuntimeError(f"launcher failed (rc={proc.returncode}):\n{tail(err.read())}")
        # ru_maxrss is in kilobytes on Linux (bytes on macOS).
        rss = usage["maxrss"] if sys.platform == "darwin" else usage["maxrss"] * 1024
        return ChildRun(usage["wall_s"], usage["cpu_s"], rss, usage["returncode"], out.read(), err.read())


@dataclass
class Series:
    """Repeated runs of one subprocess measurement."""

    runs: list[ChildRun] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)

    @property
    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs]

    @property
    def median_wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def median_cpu(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)

    @property
    def max_rss(self) -> int:
        return max(r.maxrss_bytes for r in self.runs)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------
# (a0) / (a): import only, and read with safetensors


def baseline_cmd() -> list[str]:
    return [sys.executable, "-c", BASELINE_SNIPPET]


def read_cmd(weights: Path) -> list[str]:
    return [sys.executable, "-c", READ_SNIPPET, str(weights)]


def check_read(run: ChildRun, expected_tensors: int) -> dict[str, float]:
    if run.returncode != 0:
        raise RuntimeError(f"safetensors read subprocess failed (rc={run.returncode}):\n{tail(run.stderr)}")
    info = json.loads(run.stdout.strip().splitlines()[-1])
    if info["tensors"] != expected_tensors:
        raise RuntimeError(f"read {info['tensors']} tensors, expected {expected_tensors}")
    return info


# --------------------------------------------------------------------------------------------------
# (b) loratools inspect --json


def inspect_cmd(adapter: Path) -> list[str]:
    return [sys.executable, "-m", "lora_tools", "inspect", "--json", str(adapter)]


def inspect_available() -> bool:
    return (REPO_ROOT / "lora_tools" / "__main__.py").is_file()


def check_inspect(run: ChildRun, expected_modules: int) -> dict[str, object]:
    """Parse and validate inspect's JSON; raise with the exact error output otherwise."""
    if run.returncode != 0:
        raise RuntimeError(
            f"`python -m lora_tools inspect --json ADAPTER` exited with rc={run.returncode}.\n"
            f"stderr (tail):\n{tail(run.stderr)}\nstdout (tail):\n{tail(run.stdout, 5)}"
        )
    try:
        data = json.loads(run.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"inspect output is not valid JSON ({exc}); head:\n{run.stdout[:500]}") from exc
    if not isinstance(data, dict):
        raise RuntimeError(f"inspect JSON is a {type(data).__name__}, expected an object")
    if data.get("num_modules") != expected_modules:
        raise RuntimeError(
            f"inspect JSON num_modules={data.get('num_modules')!r}, expected {expected_modules}"
        )
    return data


def normalise_name(name: str) -> str:
    """``base_model.model.model.layers.0.x.lora_A.weight`` -> ``model.layers.0.x``."""
    name = name.removeprefix(KEY_PREFIX)
    for suffix in (".weight", ".lora_A", ".lora_B", ".default"):
        name = name.removesuffix(suffix)
    return name


def inspect_singular_values(data: dict[str, object]) -> dict[str, list[float]]:
    modules = data.get("modules")
    if not isinstance(modules, list):
        raise RuntimeError("inspect JSON has no 'modules' list")
    found: dict[str, list[float]] = {}
    for mod in modules:
        if isinstance(mod, dict) and "name" in mod and "singular_values" in mod:
            found[normalise_name(str(mod["name"]))] = [float(x) for x in mod["singular_values"]]
    return found


def lookup(found: dict[str, list[float]], path: str) -> list[float] | None:
    """Exact match on the module path, else a match on a dotted suffix in either direction."""
    if path in found:
        return found[path]
    hits = [v for k, v in found.items() if k.endswith("." + path) or path.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


# --------------------------------------------------------------------------------------------------
# (c) dense SVD


@dataclass
class DenseSample:
    spec: ModuleSpec
    wall_s: float
    cpu_s: float
    top: list[float]


def sample_layers(layers: int, per_kind: int) -> list[int]:
    """``per_kind`` layer indices spread evenly over ``0 .. layers-1`` (first and last included)."""
    if per_kind <= 1 or layers == 1:
        return [0]
    n = min(per_kind, layers)
    return sorted({round(i * (layers - 1) / (n - 1)) for i in range(n)})


def dense_svd(weights: Path, specs: list[ModuleSpec], scale: float, rank: int) -> list[DenseSample]:
    """Time ``svdvals(scale * B @ A)`` in float32 (including forming ΔW, excluding the file read).

    Wide ΔW (down_proj: 4096 x 11008) is transposed first: same singular values, and LAPACK via
    torch is several times faster on the tall orientation, so this is the dense approach at its best.
    """
    samples: list[DenseSample] = []
    with safe_open(str(weights), framework="pt") as f:
        for spec in specs:
            a = f.get_tensor(spec.key_a).float()
            b = f.get_tensor(spec.key_b).float()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            delta = scale * (b @ a)
            if delta.shape[0] < delta.shape[1]:
                delta = delta.T
            sv = torch.linalg.svdvals(delta)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            samples.append(DenseSample(spec, wall, cpu, sv[:rank].double().tolist()))
            del delta, sv
            shape = f"{spec.out_features}x{spec.in_features}"
            print(f"  dense {spec.path:34s} {shape:>10s} {wall:7.2f} s wall {cpu:7.2f} s CPU", flush=True)
    return samples


def extrapolate(samples: list[DenseSample], layers: int) -> tuple[float, float]:
    """(wall, CPU) seconds for all modules: mean per module type times the number of that type."""
    by_kind: dict[str, list[DenseSample]] = {}
    for s in samples:
        by_kind.setdefault(s.spec.kind, []).append(s)
    wall = sum(statistics.mean(s.wall_s for s in group) * layers for group in by_kind.values())
    cpu = sum(statistics.mean(s.cpu_s for s in group) * layers for group in by_kind.values())
    return wall, cpu


def compare_spectra(
    samples: list[DenseSample], found: dict[str, list[float]], scale: float
) -> tuple[float, list[str]]:
    """Worst elementwise relative difference over the sampled modules, and a list of problems."""
    problems: list[str] = []
    worst = 0.0
    for s in samples:
        tool = lookup(found, s.spec.path)
        if tool is None:
            problems.append(f"{s.spec.path}: not found in inspect JSON")
            continue
        k = min(len(tool), len(s.top))
        if k == 0 or tool[0] == 0:
            problems.append(f"{s.spec.path}: empty or zero singular_values")
            continue
        rel = max(abs(d - t) / abs(t) for d, t in zip(s.top[:k], tool[:k], strict=True) if t != 0)
        worst = max(worst, rel)
        if rel >= SV_RTOL:
            hint = ""
            if abs(s.top[0] / tool[0] - scale) < 1e-3 * scale:
                hint = f" (tool's values look unscaled: dense/tool = {s.top[0] / tool[0]:.4f} = alpha/r)"
            problems.append(
                f"{s.spec.path}: max rel diff {rel:.2e} >= {SV_RTOL:g}{hint}; "
                f"dense {s.top[:3]} vs tool {tool[:3]}"
            )
    return worst, problems


# --------------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Results:
    file_size: int
    n_modules: int
    rank: int
    baseline: Series
    read: Series
    read_infos: list[dict[str, float]]
    inspect: Series
    dense: list[DenseSample]
    dense_wall: float
    dense_cpu: float
    sv_worst: float | None
    sv_problems: list[str] | None
    info: dict[str, str]


def machine_info(child_threads: int | None, busy_start: float | None, other: OtherLoad) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = ", ".join(f"{var}={os.environ.get(var, 'unset')}" for var in THREAD_ENV_VARS)
    other_s, other_frac = other.seconds(), other.fraction()
    return {
        "CPU": cpu,
        "nproc": str(n_cpus()),
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads (intra / inter-op)": f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}"
        + (f"; subprocess (a): {child_threads}" if child_threads is not None else ""),
        "thread env": threads,
        "other processes' CPU use": (
            "n/a"
            if other_s is None or other_frac is None
            else f"{other_frac:.0%} of all CPUs during the run ({other_s:.0f} CPU-s); "
            + (f"{busy_start:.0%} just before it" if busy_start is not None else "")
        ),
    }


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def fmt_runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def build_table(res: Results) -> str:
    imp = statistics.median(i["import_s"] for i in res.read_infos)
    rd = statistics.median(i["read_s"] for i in res.read_infos)
    base, read, insp = res.baseline, res.read, res.inspect
    rows = [
        "| Measurement | Median wall | Wall of each run (s) | Median CPU (user+sys) | Peak RSS | Notes |",
        "|---|---:|---|---:|---:|---|",
        f"| (a0) `python -c '{BASELINE_SNIPPET}'` | {base.median_wall:.2f} s | {fmt_runs(base.walls)} | "
        f"{base.median_cpu:.2f} s | {fmt_mb(base.max_rss)} | baseline: interpreter + imports only |",
        f"| (a) safetensors read, fresh `python -c` | {read.median_wall:.2f} s | {fmt_runs(read.walls)} | "
        f"{read.median_cpu:.2f} s | {fmt_mb(read.max_rss)} | in-process: import torch + safetensors "
        f"{imp:.2f} s, read all {2 * res.n_modules} tensors {rd:.3f} s |",
    ]
    if insp.ok:
        rows.append(
            f"| (b) `loratools inspect --json` | {insp.median_wall:.2f} s | {fmt_runs(insp.walls)} | "
            f"{insp.median_cpu:.2f} s | {fmt_mb(insp.max_rss)} | `python -m lora_tools inspect --json DIR`; "
            f"JSON valid, num_modules = {res.n_modules} |"
        )
    else:
        rows.append(f"| (b) `loratools inspect --json` | n/a | | | | {insp.error or 'not run'} |")
    measured_wall = sum(s.wall_s for s in res.dense)
    rows.append(
        f"| (c) dense fp32 `svdvals(scale·B@A)`, all modules (extrapolated) | {res.dense_wall:,.0f} s | "
        f"{len(res.dense)} modules measured, {measured_wall:.0f} s in all | {res.dense_cpu:,.0f} s | | "
        f"mean per module type x {res.n_modules // len(LAYER_MODULES)} layers; excludes the file read |"
    )

    rows += ["", "| Ratio | Value | Target | Met |", "|---|---:|---:|---|"]
    if insp.ok:
        r_ba, r_ba_cpu = insp.median_wall / read.median_wall, insp.median_cpu / read.median_cpu
        r_cb, r_cb_cpu = res.dense_wall / insp.median_wall, res.dense_cpu / insp.median_cpu
        r_rss = insp.max_rss / res.file_size
        r_rss_extra = (insp.max_rss - base.max_rss) / res.file_size
        rows += [
            f"| (b) / (a), wall | {r_ba:.2f} | <= {TARGET_INSPECT_OVER_READ:g} | "
            f"{verdict(r_ba <= TARGET_INSPECT_OVER_READ)} |",
            f"| (b) / (a), CPU | {r_ba_cpu:.2f} | <= {TARGET_INSPECT_OVER_READ:g} | "
            f"{verdict(r_ba_cpu <= TARGET_INSPECT_OVER_READ)} |",
            f"| (c) / (b), wall | {r_cb:,.0f} | >= {TARGET_DENSE_OVER_INSPECT:,.0f} | "
            f"{verdict(r_cb >= TARGET_DENSE_OVER_INSPECT)} |",
            f"| (c) / (b), CPU | {r_cb_cpu:,.0f} | >= {TARGET_DENSE_OVER_INSPECT:,.0f} | "
            f"{verdict(r_cb_cpu >= TARGET_DENSE_OVER_INSPECT)} |",
            f"| peak RSS (b) / file size | {r_rss:.2f} ({fmt_mb(insp.max_rss)} / {fmt_mb(res.file_size)}) | "
            f"well below {TARGET_RSS_OVER_FILE:g} | {verdict(r_rss < TARGET_RSS_OVER_FILE)} |",
            f"| (peak RSS (b) - peak RSS (a0)) / file size: above interpreter + torch | {r_rss_extra:.2f} "
            f"({fmt_mb(insp.max_rss - base.max_rss)}) | well below {TARGET_RSS_OVER_FILE:g} | "
            f"{verdict(r_rss_extra < TARGET_RSS_OVER_FILE)} |",
            f"| (b) - (a), wall | {insp.median_wall - read.median_wall:+.2f} s | | |",
        ]
        if res.sv_problems is not None and res.sv_worst is not None:
            rows.append(
                f"| top-{res.rank} singular values, (c) vs (b), {len(res.dense)} modules: worst elementwise "
                f"rel. diff | {res.sv_worst:.1e}"
                + (f" ({len(res.sv_problems)} modules fail)" if res.sv_problems else "")
                + f" | < {SV_RTOL:g} | {verdict(not res.sv_problems)} |"
            )
    else:
        rows.append("| (b) / (a), (c) / (b), RSS (b) / file | n/a | | (b) did not run |")
    rows += [
        "",
        f"Adapter: synthetic Llama-2-7B, {res.n_modules} LoRA modules, r={res.rank}, fp16, "
        f"`{WEIGHTS_NAME}` = {fmt_mb(res.file_size)} ({res.file_size:,} bytes).",
        "",
        "| Machine | |",
        "|---|---|",
    ]
    rows += [f"| {k} | {v} |" for k, v in res.info.items()]
    return "\n".join(rows)


def display_command(argv: Sequence[str]) -> str:
    """The command as run from the repository root (paths inside the repo shown relative to it)."""

    def rel(p: str) -> str:
        try:
            return str(Path(p).absolute().relative_to(REPO_ROOT))
        except ValueError:
            return p

    return shlex.join([rel(sys.executable), rel(argv[0]), *argv[1:]])


def write_report(report: Path, command: str, table: str) -> None:
    """Replace (or append) the section ``SECTION_TITLE`` in ``report``, leaving other sections alone."""
    body = (
        "Page cache warm (one untimed warm-up run of (a) and (b)); (a0), (a) and (b) repeated and "
        "interleaved, medians shown; peak RSS is the largest of the runs. CPU = user + sys of the "
        "process, all threads; peak RSS is the measured process's own (reaped by a ~10 MiB launcher, "
        "not by the benchmark process, whose RSS a forked child would otherwise inherit). Thread settings left at their defaults, same environment for all. "
        "(c) runs in the benchmark process on a sample of modules and is extrapolated by module type; "
        "wide ΔW are transposed first (faster, so (c) is the dense approach at its best).\n\n"
        f"{table}\n"
    )
    write_section(report, SECTION_TITLE, command, body)


def adapter_scale(adapter: Path) -> tuple[float, int]:
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    return float(cfg["lora_alpha"]) / float(cfg["r"]), int(cfg["r"])


def count_layers(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        n_keys = len(list(f.keys()))
    per_layer = 2 * len(LAYER_MODULES)
    if n_keys % per_layer:
        raise SystemExit(f"{weights}: {n_keys} tensors is not a multiple of {per_layer}; not synthetic?")
    return n_keys // per_layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", type=Path, help="reuse this adapter directory instead of building one")
    parser.add_argument("--layers", type=int, default=32, help="layers of the adapter to build (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of (a0), (a), (b) (default: 3)")
    parser.add_argument(
        "--dense-per-type",
        type=int,
        default=2,
        help="modules per module type to run dense SVD on (default: 2)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the CPUs idle (default: 0)",
    )
    parser.add_argument("--write-report", action="store_true", help=f"update '{SECTION_TITLE}' in the report")
    parser.add_argument(
        "--report", type=Path, default=DEFAULT_REPORT, help="report file (default: %(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary adapter directory")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.dense_per_type < 1 or args.layers < 1:
        parser.error("--repeats, --dense-per-type and --layers must be >= 1")
    raw_argv = sys.argv if argv is None else [sys.argv[0], *argv]

    built: Path | None = None
    if args.adapter is not None:
        adapter = args.adapter.resolve()
    else:
        built = adapter = Path(tempfile.mkdtemp(prefix="loratools-bench-"))
        start = time.perf_counter()
        write_adapter(adapter, layers=args.layers)
        print(f"built synthetic adapter in {adapter} ({time.perf_counter() - start:.1f} s)", flush=True)
    try:
        return run_benchmark(args, adapter, raw_argv)
    finally:
        if built is not None and not args.keep:
            shutil.rmtree(built, ignore_errors=True)
        elif built is not None:
            print(f"kept adapter in {built}")


def run_benchmark(args: argparse.Namespace, adapter: Path, raw_argv: list[str]) -> int:
    weights = adapter / WEIGHTS_NAME
    file_size = weights.stat().st_size
    layers = count_layers(weights)
    n_modules = layers * len(LAYER_MODULES)
    scale, rank = adapter_scale(adapter)
    env = dict(os.environ)  # identical (default) thread settings for every subprocess
    print(f"adapter: {weights} ({fmt_mb(file_size)}, {n_modules} modules, scale {scale:g}, r {rank})")

    busy_start = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else busy_fraction()
    if busy_start is not None and busy_start >= IDLE_BUSY_FRACTION:
        print(
            f"WARNING: other processes use {busy_start:.0%} of the CPUs; wall times will be inflated "
            "(CPU times much less so)",
            flush=True,
        )
    other = OtherLoad()

    baseline, read, inspect = Series(), Series(), Series()
    read_infos: list[dict[str, float]] = []
    data: dict[str, object] | None = None
    have_inspect = inspect_available()
    if not have_inspect:
        inspect.error = "unavailable: lora_tools/__main__.py does not exist yet (`python -m lora_tools`)"
        print(f"(b) {inspect.error}", flush=True)

    # Warm-up (page cache, .pyc files), then interleaved timed runs.
    print("warm-up ...", flush=True)
    check_read(run_child(read_cmd(weights), env), 2 * n_modules)
    if have_inspect:
        try:
            data = check_inspect(run_child(inspect_cmd(adapter), env), n_modules)
        except RuntimeError as exc:
            inspect.error = "failed: " + str(exc).splitlines()[0].replace("|", "\\|")
            print(f"(b) inspect FAILED on the synthetic adapter:\n{exc}", flush=True)
            have_inspect = False
    for i in range(args.repeats):
        run = run_child(baseline_cmd(), env)
        if run.returncode != 0:
            raise RuntimeError(f"baseline import subprocess failed:\n{tail(run.stderr)}")
        baseline.runs.append(run)
        msg = f"run {i + 1}/{args.repeats}: (a0) {run.wall_s:.2f} s"
        run = run_child(read_cmd(weights), env)
        read_infos.append(check_read(run, 2 * n_modules))
        read.runs.append(run)
        msg += f", (a) {run.wall_s:.2f} s"
        if have_inspect:
            run = run_child(inspect_cmd(adapter), env)
            try:
                data = check_inspect(run, n_modules)
            except RuntimeError as exc:
                inspect.error = "failed on a timed run (see output)"
                print(f"(b) inspect FAILED on timed run {i + 1}:\n{exc}", flush=True)
                have_inspect = False
            else:
                inspect.runs.append(run)
                msg += (
                    f", (b) {run.wall_s:.2f} s ({run.cpu_s:.2f} s CPU, peak RSS {fmt_mb(run.maxrss_bytes)})"
                )
        print(msg, flush=True)

    print("(c) dense SVD on a sample of modules ...", flush=True)
    picked = set(sample_layers(layers, args.dense_per_type))
    specs = [s for s in module_specs(layers) if int(s.path.split(".")[2]) in picked]
    dense = dense_svd(weights, specs, scale, rank)
    dense_wall, dense_cpu = extrapolate(dense, layers)

    sv_worst: float | None = None
    sv_problems: list[str] | None = None
    if data is not None and inspect.ok:
        sv_worst, sv_problems = compare_spectra(dense, inspect_singular_values(data), scale)
        print(f"  singular values, dense fp32 vs inspect: worst elementwise rel. diff {sv_worst:.2e}")
        for p in sv_problems:
            print(f"  MISMATCH {p}")

    res = Results(
        file_size=file_size,
        n_modules=n_modules,
        rank=rank,
        baseline=baseline,
        read=read,
        read_infos=read_infos,
        inspect=inspect,
        dense=dense,
        dense_wall=dense_wall,
        dense_cpu=dense_cpu,
        sv_worst=sv_worst,
        sv_problems=sv_problems,
        info=machine_info(int(read_infos[0]["torch_threads"]), busy_start, other),
    )
    table = build_table(res)
    command = display_command(raw_argv)
    print(f"\nCommand: {command}\n\n{table}\n")

    if args.write_report:
        if inspect.ok:
            write_report(args.report, command, table)
        else:
            print(f"not writing the report: (b) {inspect.error}")
    if inspect.error is not None and inspect.error.startswith("unavailable"):
        return 0
    return 0 if inspect.ok and not sv_problems else 1


if __name__ == "__main__":
    sys.exit(main())
