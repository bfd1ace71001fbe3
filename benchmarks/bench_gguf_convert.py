"""Benchmark ``convert --to gguf`` (issue 11) against reading the same adapter, side by side in one run.

The adapter is the synthetic Llama-2-7B-shaped PEFT LoRA of make_synthetic_adapter.py (32 layers, hidden 4096,
intermediate 11008, r = 16 on all seven linear kinds, fp16; 224 modules, ~80 MB), written to a temporary folder
with a config-only Llama-2-7B base (config.json: 32 heads; GGUF names and the q/k permutation need nothing more).

(a) read, as every command reads an adapter: ``load_adapter`` (header, names, ranks, scales) plus every factor
    read into memory through the adapter's source (``adapter.source.get``: the bytes are copied, not mapped);
(a') the floor under any reader: the file's data section read in 1 MiB pieces into one reused buffer;
(b) convert: ``convert --to gguf`` as the CLI runs it (open the adapter, map names, write the GGUF to a staging
    file: stored bytes copied and NaN/Inf-checked, q/k B rows permuted and checked decoded, the writes on a
    thread of their own; header parsed back, move into place), with the stored dtype (fp16) and
    with ``--dtype q8_0``; for the stored dtype also where its time goes (the same runs, phases timed by
    wrapping the functions that do them; inside the data step the two threads' times add up to more than it);
(c) the same through the CLI in fresh processes: ``loratools inspect`` (a command that reads the adapter) vs
    ``loratools convert --to gguf``.
Median of ``--repeats`` runs each, the paths taking turns; the target is (b) / (a) <= 2 for the stored dtype.

Usage::

    python benchmarks/bench_gguf_convert.py                 # print the table
    python benchmarks/bench_gguf_convert.py --write-report  # ... and update reports/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import json
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
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_adapter import write_adapter  # noqa: E402
from sections import DEFAULT_REPORT, write_section  # noqa: E402

import lora_tools.formats as formats_package  # noqa: E402
from lora_tools.convert import to_gguf  # noqa: E402
from lora_tools.convert.to_gguf import convert_to_gguf  # noqa: E402
from lora_tools.formats import gguf_data, gguf_write, load_adapter  # noqa: E402

SECTION_TITLE = "## convert --to gguf (issue 11)"
WRITE, READS = "write(2) into the page cache (writer thread)", "positioned reads of the input"
FINITE, COMPARE = "NaN/Inf check of copied pieces", "byte comparisons of decoded tensors"
ENCODE, DECODE = "changed tensors encoded", "changed tensors decoded and checked"
DATA = "tensor data: copied, encoded and checked, written"
LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000}


def read_all(path: Path) -> int:
    adapter = load_adapter(path)
    total = 0
    for module in adapter.modules.values():
        for key in (module.a_info.key, module.b_info.key):
            total += adapter.source.get(key).numel()
    return total


def read_bytes(path: Path) -> int:
    """The floor: every byte of the data section, 1 MiB at a time into one buffer (no decoding, no tensors)."""
    import numpy as np

    file = path / "adapter_model.safetensors"
    buffer = np.empty(1 << 20, dtype=np.uint8)
    fd = os.open(file, os.O_RDONLY)
    try:
        start, end = 8 + int.from_bytes(os.pread(fd, 8, 0), "little"), file.stat().st_size
        for offset in range(start, end, len(buffer)):
            os.preadv(fd, [buffer[:min(len(buffer), end - offset)]], offset)
    finally:
        os.close(fd)
    return end - start


class OSCalls:
    """Stands in for ``os`` inside formats/gguf_data.py, so that its system calls can be timed."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)


def _per_run(values: list[float], runs: int) -> list[list[float]]:
    """A label's call times split into ``runs`` equal groups (the same calls happen in every run)."""
    size = max(1, len(values) // runs)
    return [values[i:i + size] for i in range(0, size * runs, size)] or [[0.0]]


class Phases:
    """Seconds spent in the wrapped functions per call and label (``seconds``: one entry per call)."""

    def __init__(self, targets: list[tuple[object, str, str]]):
        self.targets, self.seconds = targets, {label: [] for _, _, label in targets}
        self.calls = self.seconds

    def __enter__(self) -> Phases:
        self.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.targets]
        for owner, name, label in self.targets:
            setattr(owner, name, self._timed(getattr(owner, name), label))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, func in self.saved:
            setattr(owner, name, func)

    def _timed(self, func: object, label: str) -> object:
        def timed_call(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)  # type: ignore[operator]
            finally:
                self.seconds[label].append(time.perf_counter() - start)
        return timed_call


def timed(func: object, repeats: int, fresh: Path | None = None) -> tuple[float, object]:
    """Median seconds of ``func()``; ``fresh``: an output removed before each run, untimed (a repeat with --force
    would otherwise also time deleting the previous 80 MB file)."""
    times, result = [], None
    for _ in range(repeats):
        if fresh is not None:
            fresh.unlink(missing_ok=True)
        start = time.perf_counter()
        result = func()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _overlap_sentence(data_s: float, calls: dict[str, list[float]], repeats: int) -> str:
    """How the data step's two threads shared its wall time, from this run's own figures."""
    def per_run(label: str) -> float:
        return statistics.median([sum(v) for v in _per_run(calls[label], repeats)])

    main = per_run(READS) + per_run(FINITE) + per_run(ENCODE) + per_run(DECODE)
    return (f"The data step overlaps two threads: the writer spent {per_run(WRITE) * 1e3:.1f} ms in write(2), "
            f"while the main thread read the input pieces ({per_run(READS) * 1e3:.1f} ms), checked them for "
            f"NaN/Inf ({per_run(FINITE) * 1e3:.1f} ms), encoded the 64 changed q/k tensors "
            f"({per_run(ENCODE) * 1e3:.1f} ms) and decoded those bytes back for the comparison with the input "
            f"({per_run(DECODE) * 1e3:.1f} ms, {per_run(COMPARE) * 1e3:.1f} ms of it byte comparisons): "
            f"{main * 1e3:.1f} ms; the step took {data_s * 1e3:.1f} ms of wall time. Before this round "
            "(2026-12-02 08:11 UTC, load 0.8) convert took 78.8 ms = 2.96x the read, on one thread, reading back "
            "and comparing every byte it wrote as well; each piece is now written from the buffer it was checked "
            "in, so a read-back would only test write(2).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both paths (default 1: on a shared machine extra threads only wait)")
    parser.add_argument("--write-report", action="store_true", help=f"update {DEFAULT_REPORT}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        root = Path(tmp)
        adapter = write_adapter(root / "adapter")
        base = root / "llama-2-7b"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(LLAMA2_7B))
        save_file({"placeholder": torch.zeros(1)}, str(base / "model.safetensors"))
        out = {dtype: root / f"out-{dtype or 'stored'}.gguf" for dtype in (None, "q8_0")}
        runs = {"read": lambda: read_all(adapter), "floor": lambda: read_bytes(adapter),
                "convert": functools.partial(convert_to_gguf, adapter, out[None], base=base, force=True)}
        times: dict[str, list[float]] = {label: [] for label in runs}
        results: dict[str, object] = {}
        for _ in range(args.repeats):  # taking turns, so that a busy moment on a shared machine hits all paths
            for label, func in runs.items():
                if label == "convert":
                    out[None].unlink(missing_ok=True)  # untimed: deleting the previous 80 MB is not converting
                start = time.perf_counter()
                results[label] = func()
                times[label].append(time.perf_counter() - start)
        read_s, floor_s, convert_s = (statistics.median(times[k]) for k in ("read", "floor", "convert"))
        numel = results["read"]
        phases = Phases([(formats_package, "load_adapter", "open the adapter (load_adapter)"),
                         (gguf_write, "map_names", "GGUF tensor names"),
                         (gguf_write, "write_tensors", DATA),
                         (to_gguf, "check_header", "header parsed back from the file")])
        os_calls = OSCalls()
        inside = Phases([(os_calls, "write", WRITE), (os_calls, "preadv", READS), (gguf_data, "_finite", FINITE),
                         (to_gguf, "same_bytes", COMPARE), (gguf_write, "_encode", ENCODE),
                         (to_gguf.TensorChecks, "__call__", DECODE)])
        gguf_data.os = os_calls  # type: ignore[assignment]
        with phases, inside:
            for _ in range(args.repeats):
                out[None].unlink(missing_ok=True)
                start = time.perf_counter()
                convert_to_gguf(adapter, out[None], base=base, force=True)
                phases.seconds.setdefault("total", []).append(time.perf_counter() - start)
        q8_s, q8_report = timed(functools.partial(convert_to_gguf, adapter, out["q8_0"], base=base, dtype="q8_0",
                                                  force=True), max(1, args.repeats // 3), fresh=out["q8_0"])
        rows = [("as stored (fp16)", convert_s, out[None].stat().st_size, results["convert"]),
                ("q8_0", q8_s, out["q8_0"].stat().st_size, q8_report)]
        # The same through the CLI, fresh processes: a command that reads the adapter vs convert --to gguf.
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cli = [sys.executable, "-m", "lora_tools"]
        inspect_cmd = [*cli, "inspect", str(adapter), "--json"]
        convert_cmd = [*cli, "convert", str(adapter), "-o", str(root / "cli.gguf"), "--to", "gguf", "--base",
                       str(base), "--force", "--quiet"]
        cli_times: dict[str, list[float]] = {"inspect": [], "convert": []}
        for _ in range(max(3, args.repeats // 3)):
            for label, command in (("inspect", inspect_cmd), ("convert", convert_cmd)):
                (root / "cli.gguf").unlink(missing_ok=True)
                start = time.perf_counter()
                subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
                cli_times[label].append(time.perf_counter() - start)
        inspect_s, cli_convert_s = (statistics.median(cli_times[k]) for k in ("inspect", "convert"))
    lines = [f"Synthetic Llama-2-7B LoRA, r = 16, 224 modules, {numel:,} fp16 parameters "
             f"({2 * numel / 1e6:.1f} MB). Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} "
             f"torch thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end; "
             f"median of {args.repeats} in process (read, floor and convert taking turns), of "
             f"{len(cli_times['inspect'])} for the CLI.", "",
             "| step | ms | vs read | output bytes | verification |", "|---|---|---|---|---|",
             f"| read: load_adapter + every factor into memory (what every command does) | {read_s * 1e3:.1f} | "
             "1.00x | - | - |",
             f"| floor: the data section's bytes, 1 MiB preads into one buffer | {floor_s * 1e3:.1f} | "
             f"{floor_s / read_s:.2f}x | - | - |"]
    for label, seconds, nbytes, report in rows:
        check = (f"{report['bit_exact_modules']}/{report['num_modules']} bit-exact, max rel ΔW diff "
                 f"{report['max_rel_difference']:.2g}")
        lines.append(f"| convert --to gguf, {label} | {seconds * 1e3:.1f} | {seconds / read_s:.2f}x | {nbytes:,} | "
                     f"{check} |")
    ratio, cli_ratio = convert_s / read_s, cli_convert_s / inspect_s
    lines += [f"| CLI, fresh process: `loratools inspect ADAPTER --json` | {inspect_s * 1e3:.0f} | - | - | - |",
              f"| CLI, fresh process: `loratools convert ADAPTER --to gguf --base LLAMA2` | {cli_convert_s * 1e3:.0f} "
              f"| {cli_ratio:.2f}x of inspect | - | as above |", ""]
    gguf_data.os = os  # type: ignore[assignment]
    total = statistics.median(phases.seconds["total"])
    parts = [(label, statistics.median(values)) for label, values in phases.seconds.items()
             if label != "total" and values]
    rest = total - sum(seconds for _, seconds in parts)
    lines += [f"Where convert's time goes (as stored; medians of {args.repeats} further runs, total "
              f"{total * 1e3:.1f} ms): " + "; ".join(f"{label} {seconds * 1e3:.1f} ms" for label, seconds in parts)
              + f"; the rest (base config, plan, module checks, rename) {rest * 1e3:.1f} ms.", "",
              "Inside the tensor data step (sums per run over both threads, medians; the NaN/Inf check of "
              "changed tensors inside 'encoded', the byte comparisons inside 'decoded and checked'): "
              + "; ".join(
                  f"{label} {statistics.median([sum(v) for v in _per_run(values, args.repeats)]) * 1e3:.1f} ms"
                  for label, values in inside.calls.items()) + ".", "",
              _overlap_sentence(dict(parts)[DATA], inside.calls, args.repeats), "",
              f"Target (issue 11), convert within 2x of reading: in process {ratio:.2f}x "
              f"({'met' if ratio <= 2 else 'NOT met'}); in fresh processes {cli_ratio:.2f}x of inspect "
              f"({'met' if cli_ratio <= 2 else 'NOT met'}; both are mostly Python and torch start-up)."]
    body = "\n".join(lines)
    print(body)
    if args.write_report:
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_gguf_convert.py", *sys.argv[1:]])
        write_section(DEFAULT_REPORT, SECTION_TITLE, command, body)


if __name__ == "__main__":
    main()
