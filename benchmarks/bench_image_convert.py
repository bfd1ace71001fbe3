"""Benchmark ``convert`` on a full-size Flux.1 adapter (issue 11): kohya (BFL names, fused qkv / linear1) to
diffusers (split projections) and back, against reading every tensor of the input.

The adapter: every LoRA-able layer of the 19 double and 38 single blocks at the real widths (hidden 3072, MLP
12288), rank 16, bfloat16, alpha 8 (as sd-scripts writes it): 494 diffusers layers, about 153 MB.

(a) read: every tensor of the input into memory (``load_file`` and a copy: what any conversion pays);
(b) kohya -> diffusers: ``loratools convert``'s library call: split every fused layer, write, read back and
    verify every row block;
(c) diffusers -> kohya: fuse the parts again (A stacked, B block-diagonal: rank 48 for qkv, 64 for linear1).

Usage::

    python benchmarks/bench_image_convert.py --threads 1                 # print the table
    python benchmarks/bench_image_convert.py --threads 1 --write-report  # ... and update reports/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import DEFAULT_REPORT, write_section  # noqa: E402

SECTION_TITLE = "## convert of a full-size Flux.1 adapter (issue 11)"
HIDDEN, MLP = 3072, 12288  # FluxParams: hidden_size 3072, mlp_ratio 4
DOUBLE = {"img_attn.qkv": (3 * HIDDEN, HIDDEN), "txt_attn.qkv": (3 * HIDDEN, HIDDEN),
          "img_attn.proj": (HIDDEN, HIDDEN), "txt_attn.proj": (HIDDEN, HIDDEN), "img_mlp.0": (MLP, HIDDEN),
          "img_mlp.2": (HIDDEN, MLP), "txt_mlp.0": (MLP, HIDDEN), "txt_mlp.2": (HIDDEN, MLP),
          "img_mod.lin": (6 * HIDDEN, HIDDEN), "txt_mod.lin": (6 * HIDDEN, HIDDEN)}
SINGLE = {"linear1": (3 * HIDDEN + MLP, HIDDEN), "linear2": (HIDDEN, HIDDEN + MLP),
          "modulation.lin": (3 * HIDDEN, HIDDEN)}


def make_adapter(path: Path, rank: int) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}

    def add(layer: str, out: int, inp: int) -> None:
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen).to(torch.bfloat16)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen).to(torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(8.0)

    for i in range(19):
        for leaf, (out, inp) in DOUBLE.items():
            add(f"double_blocks.{i}.{leaf}", out, inp)
    for i in range(38):
        for leaf, (out, inp) in SINGLE.items():
            add(f"single_blocks.{i}.{leaf}", out, inp)
    save_file(tensors, str(path))


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--write-report", action="store_true")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args()

    from lora_tools.convert.run import convert

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        kohya, diffusers, back = Path(tmp) / "flux.safetensors", Path(tmp) / "d.safetensors", Path(tmp) / "k.safetensors"
        make_adapter(kohya, args.rank)
        size = kohya.stat().st_size
        # load_file maps the file: clone so every byte is read, as any conversion must
        read_s, _ = best_of(args.repeats, lambda: {k: v.clone() for k, v in load_file(str(kohya)).items()})
        split_s, split = best_of(args.repeats, lambda: convert(kohya, diffusers, "diffusers", force=True))
        fuse_s, fuse = best_of(args.repeats, lambda: convert(diffusers, back, "kohya", force=True))
    rows = [("read every tensor into memory (load_file + clone)", read_s, "", ""),
            ("kohya -> diffusers (split, verified)", split_s, split["num_modules"], split["max_rel_difference"]),
            ("diffusers -> kohya (fuse, verified)", fuse_s, fuse["num_modules"], fuse["max_rel_difference"])]
    table = f"| step | best of {args.repeats} | output modules | max rel. ΔW difference |\n| --- | --- | --- | --- |\n"
    table += "".join(f"| {name} | {seconds:.2f} s | {modules} | {diff if diff == '' else f'{diff:.1e}'} |\n"
                     for name, seconds, modules, diff in rows)
    load = os.getloadavg()[0]
    body = (f"Flux.1 kohya adapter, rank {args.rank}, bfloat16, {size / 1e6:.0f} MB (19 double + 38 single blocks, "
            f"every LoRA-able layer at the real widths).\n\n{table}\nSplit layers keep A and take their rows of "
            "B (copies, no arithmetic); fusing stacks A and writes B block-diagonal. Verification compares every "
            "row block of the written file with the input: bit-identical copied columns need no QR.\n"
            f"Load average (1 min) {load:.1f}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"{os.cpu_count()} CPUs.")
    print(body)
    if args.write_report:
        command = "python benchmarks/bench_image_convert.py " + shlex.join(sys.argv[1:])
        write_section(args.report, SECTION_TITLE, command.strip(), body)


if __name__ == "__main__":
    main()
