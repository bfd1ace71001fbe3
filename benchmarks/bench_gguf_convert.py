"""Benchmark ``convert --to gguf`` (issue 11) against reading the same adapter, side by side in one run.

The adapter is the synthetic Llama-2-7B-shaped PEFT LoRA of make_synthetic_adapter.py (32 layers, hidden 4096,
intermediate 11008, r = 16 on all seven linear kinds, fp16; 224 modules, ~80 MB), written to a temporary folder
with a config-only Llama-2-7B base (config.json: 32 heads; GGUF names and the q/k permutation need nothing more).

(a) read: ``load_adapter`` plus every factor fetched (the least any conversion must do);
(b) convert: ``convert --to gguf`` as the CLI runs it (map names, permute q/k, write the GGUF to a staging file,
    read it back with our reader, compare every module, move into place), with the stored dtype (fp16) and with
    ``--dtype q8_0``.
Median of ``--repeats`` runs each; the target is (b) / (a) <= 2 for the stored dtype.

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

from lora_tools.convert.to_gguf import convert_to_gguf  # noqa: E402
from lora_tools.formats import load_adapter  # noqa: E402

SECTION_TITLE = "## convert --to gguf (issue 11)"
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
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
        read_s, numel = timed(lambda: read_all(adapter), args.repeats)
        rows = []
        for dtype in (None, "q8_0"):
            out = root / f"out-{dtype or 'stored'}.gguf"
            seconds, report = timed(functools.partial(convert_to_gguf, adapter, out, base=base, dtype=dtype,
                                                      force=True), args.repeats, fresh=out)
            rows.append((dtype or "as stored (fp16)", seconds, out.stat().st_size, report))
        # The same through the CLI, fresh processes: a command that reads the adapter vs convert --to gguf.
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cli = [sys.executable, "-m", "lora_tools"]
        inspect_s, _ = timed(functools.partial(subprocess.run, [*cli, "inspect", str(adapter), "--json"], env=env,
                                               check=True, stdout=subprocess.DEVNULL), args.repeats)
        convert_cmd = [*cli, "convert", str(adapter), "-o", str(root / "cli.gguf"), "--to", "gguf", "--base",
                       str(base), "--force", "--quiet"]
        convert_s, _ = timed(functools.partial(subprocess.run, convert_cmd, env=env, check=True,
                                               stdout=subprocess.DEVNULL), args.repeats)
    lines = [f"Synthetic Llama-2-7B LoRA, r = 16, 224 modules, {numel:,} fp16 parameters. Machine: "
             f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), torch {torch.__version__}, load average "
             f"{os.getloadavg()[0]:.1f}; median of {args.repeats}.", "",
             "| step | seconds | vs read | output bytes | verification |", "|---|---|---|---|---|",
             f"| read (load_adapter + every factor) | {read_s:.2f} | 1.00x | - | - |"]
    for label, seconds, nbytes, report in rows:
        check = (f"{report['bit_exact_modules']}/{report['num_modules']} bit-exact, max rel ΔW diff "
                 f"{report['max_rel_difference']:.2g}")
        lines.append(f"| convert --to gguf, {label} | {seconds:.2f} | {seconds / read_s:.2f}x | {nbytes:,} | "
                     f"{check} |")
    ratio, cli_ratio = rows[0][1] / read_s, convert_s / inspect_s
    lines += [f"| CLI: `loratools inspect ADAPTER --json` (fresh process) | {inspect_s:.2f} | - | - | - |",
              f"| CLI: `loratools convert ADAPTER --to gguf --base LLAMA2` (fresh process) | {convert_s:.2f} | "
              f"{cli_ratio:.2f}x of inspect | - | as above |", "",
              f"Target (issue 11), convert within 2x of reading: against the CLI read (inspect) {cli_ratio:.2f}x "
              f"({'met' if cli_ratio <= 2 else 'NOT met'}); against the bare in-process read of the bytes "
              f"{ratio:.1f}x ({'met' if ratio <= 2 else 'not met'}: convert writes the same bytes again, reads them "
              "back and compares every module, and the bare read is a page-cache copy)."]
    body = "\n".join(lines)
    print(body)
    if args.write_report:
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_gguf_convert.py", *sys.argv[1:]])
        write_section(DEFAULT_REPORT, SECTION_TITLE, command, body)


if __name__ == "__main__":
    main()
