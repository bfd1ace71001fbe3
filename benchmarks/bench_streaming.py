"""compare-quant on a base larger than this machine's comfort: streamed block by block (issue 12).

Runs, each in a fresh process with its peak RSS sampled (psutil, every 50 ms) and the kernel's own maximum:

1. the floor: reading every tensor of the checkpoint once with safetensors (what any streamed pass must do);
2. ``compare-quant --target delta --offload always`` (per-layer comparison + end-to-end variants);
3. ``compare-quant --target base --ranks 64 --schemes int8-channel --offload always``.

The checkpoint comes from benchmarks/make_synthetic_llama.py (never committed). ``--base-adapter`` lets run 3 use
another adapter (by default the full one: every linear layer's W0 is fitted).

    .venv/bin/python benchmarks/make_synthetic_llama.py /tmp/synth
    .venv/bin/python benchmarks/bench_streaming.py /tmp/synth --write-report

``--runs base`` (etc.) runs some now and keeps the others' last results (FOLDER/bench_streaming.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import DEFAULT_REPORT, run_measured, write_section  # noqa: E402

SECTION_TITLE = "## Streaming a base larger than memory (issue 12)"
READ_FLOOR = """
import sys, time
from pathlib import Path
from safetensors import safe_open
total, start = 0, time.perf_counter()
for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(shard), framework="pt") as handle:
        for name in handle.keys():
            t = handle.get_tensor(name)
            total += t.numel() * t.element_size()
            del t
print(total, time.perf_counter() - start)
"""


def measured(command: list[str]) -> tuple[float, float, float, str]:
    wall, peak, kernel, status, out = run_measured(command, {"OMP_WAIT_POLICY": "PASSIVE"})
    if status != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return wall, peak, kernel, out


# Llama-3-70B's shape (its config.json): what one 140 GB GPU holds under this scheme, on paper.
LLAMA3_70B = {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 128256}


def paper_70b(c: dict[str, int] = LLAMA3_70B, dtype_bytes: int = 2, tokens: int = 8192) -> str:
    """The figures of a streamed compare-quant on a 70B base (bf16 forward, float64 statistics)."""
    h, i, kv = c["hidden"], c["intermediate"], c["hidden"] // c["heads"] * c["kv_heads"]
    block = 2 * h * h + 2 * kv * h + 3 * h * i  # q, o; k, v; gate, up, down
    embed = c["vocab"] * h
    total = c["layers"] * block + 2 * embed
    cov = (3 * h * h + i * i) * 8  # one C per distinct input: q/k/v, o, gate/up, down (float64)
    per_1k = 1000 * h * dtype_bytes
    mlp_batch = 8 * 128 * i * dtype_bytes * 3  # a streamed batch (8 x 128 tokens) through the MLP
    panels = sum((d - start) * min(1024, d - start) for d in (h, h, h, i) for start in range(0, d, 1024)) * 8
    peak = block * dtype_bytes + cov + 2 * tokens * h * dtype_bytes + mlp_batch
    return "\n".join([
        "On paper, Llama-3-70B (hidden 8192, intermediate 28672, 80 blocks, 8 KV heads, vocab 128,256) on one "
        "140 GB GPU, bf16 forward:",
        f"- weights {total / 1e9:.1f} B parameters = {total * dtype_bytes / 1e9:.0f} GB (does not fit beside its "
        f"activations); one block {block / 1e6:.0f} M = {block * dtype_bytes / 1e9:.2f} GB; embeddings "
        f"{embed * dtype_bytes / 1e9:.2f} GB, held only while each pass embeds its batches, the LM head as much "
        "again at the end (end to end)",
        f"- statistics: one float64 C per distinct input of a block (q/k/v, o, gate/up, down) = "
        f"{cov / 1e9:.2f} GB in full, the down projection's {i * i * 8 / 1e9:.2f} GB of it; while the batches "
        f"arrive on a CPU only their lower-triangle panels, {panels / 1e9:.2f} GB (a GPU accumulates them in "
        "full); each C is freed after its last reader is measured, one split's at a time",
        f"- activations: {per_1k / 1e6:.1f} MB of hidden states per 1k tokens per carried copy; an 8 x 128-token "
        f"batch through the MLP {mlp_batch / 1e6:.0f} MB; end to end, 27 variants x 512 tokens of hidden states "
        f"{27 * 512 * h * dtype_bytes / 1e6:.0f} MB",
        f"- peak ≈ {peak / 1e9:.1f} GB for {tokens} calibration tokens (one block + one block's C in full + "
        "hidden states + MLP batch): well under a tenth of the GPU",
        f"- floor: every block is read twice (per-layer stage, end-to-end stage): {2 * total * dtype_bytes / 1e9:.0f}"
        f" GB, {2 * total * dtype_bytes / 5e9 / 60:.1f} min at 5 GB/s",
    ])


RUNS = ("floor", "delta", "base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the output folder of make_synthetic_llama.py")
    parser.add_argument("--base-adapter", type=Path, default=None, help="adapter for the --target base run")
    parser.add_argument("--max-tokens", type=int, default=6000)
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="which runs now (comma-separated of floor, delta, base); the others' last results "
                             "are read back from FOLDER/bench_streaming.json, so long runs can be done apart")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the section")
    parser.add_argument("--write-report", action="store_true")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    if any(r not in RUNS for r in wanted):
        parser.error(f"--runs: choose from {', '.join(RUNS)}")
    base, adapter = args.folder / "base", args.folder / "adapter"
    config = json.loads((base / "config.json").read_text())
    state_path = args.folder / "bench_streaming.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    common = ["--base", str(base), "--offload", "always", "--max-tokens", str(args.max_tokens), "--holdout", "0",
              "--json", "--quiet"]
    runs = {"delta": ("`--target delta` (defaults + end to end, `--e2e-tokens 64`)",
                      [str(adapter), *common, "--e2e-tokens", "64"]),
            "base": ("`--target base --ranks 64 --schemes int8-channel`",
                     [str(args.base_adapter or adapter), *common, "--target", "base", "--ranks", "64",
                      "--schemes", "int8-channel"])}
    for key in wanted:
        load = os.getloadavg()[0]
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if key == "floor":
            wall, rss, kernel, out = measured([sys.executable, "-c", READ_FLOOR, str(base)])
            read_bytes, read_seconds = (float(v) for v in out.split())
            row = (f"| read every tensor once (safetensors) | {wall:.0f} s | {rss:.0f} MiB | {kernel:.0f} MiB | "
                   f"{read_seconds:.0f} s for {read_bytes / 1e9:.2f} GB |")
            state[key] = {"row": row, "detail": None, "load": load, "date": stamp}
        else:
            label, extra = runs[key]
            wall, rss, kernel, out = measured([sys.executable, "-m", "lora_tools", "compare-quant", *extra])
            report = json.loads(out)
            offload = report["offload"]
            row = (f"| compare-quant {label}: {len(report['layers'])} layers | {wall:.0f} s | {rss:.0f} MiB | "
                   f"{kernel:.0f} MiB | {offload['seconds_reading']:.0f} s for {offload['bytes_read'] / 1e9:.2f} GB |")
            detail = (f"{label}: plan: {offload['blocks']} blocks of {offload['block_bytes'] / 1e6:.0f} MB, "
                      f"hidden states {offload['activation_bytes'] / 1e6:.0f} MB (estimate)")
            state[key] = {"row": row, "detail": detail, "load": load, "date": stamp}
        state_path.write_text(json.dumps(state, indent=1))
        print(state[key]["row"], flush=True)
    done = [k for k in RUNS if k in state]
    body = "\n".join([
        f"Synthetic Llama checkpoint from `benchmarks/make_synthetic_llama.py`: hidden {config['hidden_size']}, "
        f"intermediate {config['intermediate_size']}, {config['num_hidden_layers']} blocks, vocab "
        f"{config['vocab_size']} (untied head), float32 in {len(list(base.glob('*.safetensors')))} shards; "
        "r=16 PEFT LoRA on all seven kinds. Every compare-quant run streams (`--offload always`) with "
        f"`--max-tokens {args.max_tokens} --holdout 0` (the widest layer takes {config['intermediate_size']} "
        "inputs, so a held-out split would need that many tokens again; this CPU forward is the cost).",
        "",
        "| run | wall | peak RSS (sampled) | max RSS (kernel) | reading weights (the floor) |",
        "| --- | --- | --- | --- | --- |",
        *[state[k]["row"] for k in done],
        "",
        *[f"- {k}: run {state[k]['date']}, load average (1 min) {state[k]['load']:.1f} before it (2 CPUs)"
          + (f"; {state[k]['detail']}" if state[k]["detail"] else "") for k in done],
        f"- torch {__import__('torch').__version__}.",
        "",
        *([args.notes.read_text().strip(), ""] if args.notes else []),
        paper_70b(),
    ])
    print(body)
    if args.write_report:
        command = f".venv/bin/python benchmarks/bench_streaming.py {args.folder}" + (
            f" --base-adapter {args.base_adapter}" if args.base_adapter else "")
        write_section(args.report, SECTION_TITLE, command + " --write-report", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
