"""Write a synthetic fleet of LoRA adapters for `loratools scan` (never committed: it goes to a temp folder).

Default: 2,000 adapters, a third each in PEFT folders, kohya files and diffusers files, with 1 to 200 modules
(log-uniform: many small adapters, a few large), nominal ranks 4-64, fp16 factors, and most of each update's energy
in a few directions (the case `scan` exists for: an r=64 adapter whose energy sits in 6). About 3% are broken on
purpose, one kind each in turn: truncated file, random bytes, a base-model (non-LoRA) file, an IA3 adapter, NaN
factors, an untrained adapter (lora_B all zero), a PEFT folder without weights.

Layers are small (64-256 wide) so that 2,000 adapters fit in a few hundred MB and generate in a minute; the scan's
cost per module is a QR of (out + in) x r factors, so the throughput it measures is per adapter and per module.

Usage::

    python benchmarks/make_fleet.py --out /tmp/fleet --count 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

BASES = ["meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.3", "Qwen/Qwen2.5-7B"]
LLM_PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
UNET_PROJECTIONS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0", "ff.net.2"]
WIDTHS = (64, 128, 256)
BROKEN_KINDS = ("truncated", "random_bytes", "base_model", "ia3", "nan", "zero_b", "no_weights")
BROKEN_SHARE = 0.03


def _factors(generator: torch.Generator, out_features: int, in_features: int, rank: int,
             intrinsic: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) in fp16 whose product has its energy in ``intrinsic`` directions (a 1e-3 tail)."""
    A = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
    B = torch.randn(out_features, rank, generator=generator) * 0.02
    decay = torch.ones(rank)
    decay[intrinsic:] = 1e-3
    return (B * decay).half(), A.half()


def _modules(generator: torch.Generator, count: int, projections: list[str]) -> list[tuple[str, int, int]]:
    """(module path, out, in) for ``count`` modules, layer by layer."""
    width = WIDTHS[int(torch.randint(len(WIDTHS), (1,), generator=generator))]
    modules = []
    layer = 0
    while len(modules) < count:
        for projection in projections:
            if len(modules) == count:
                break
            wide = projection.endswith(("up_proj", "gate_proj"))
            narrow = projection.endswith(("down_proj", "ff.net.2"))
            out_features, in_features = (2 * width, width) if wide else (width, 2 * width) if narrow else (width, width)
            modules.append((f"{layer}.{projection}", out_features, in_features))
        layer += 1
    return modules


def write_adapter(folder: Path, index: int, fmt: str, generator: torch.Generator, broken: str | None) -> Path:
    num_modules = max(1, min(200, int(math.exp(float(torch.rand(1, generator=generator)) * math.log(200)) + 0.5)))
    rank = int(torch.randint(4, 65, (1,), generator=generator))
    intrinsic = max(1, min(rank, int(torch.randint(1, 13, (1,), generator=generator))))
    alpha = float(2 * rank if index % 2 else rank)
    base = BASES[index % len(BASES)]
    tensors: dict[str, torch.Tensor] = {}
    projections = LLM_PROJECTIONS if fmt == "peft" else UNET_PROJECTIONS
    for position, (name, out_features, in_features) in enumerate(_modules(generator, num_modules, projections)):
        B, A = _factors(generator, out_features, in_features, min(rank, in_features, out_features), intrinsic)
        if broken == "nan" and position == 0:
            B[0, 0] = float("nan")
        if broken == "zero_b":
            B.zero_()
        if fmt == "peft":
            key = f"base_model.model.model.layers.{name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
        elif fmt == "kohya":
            key = "lora_unet_" + f"down_blocks.{name}".replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = A, B
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            key = f"unet.down_blocks.{name}"
            tensors[f"{key}.lora.down.weight"], tensors[f"{key}.lora.up.weight"] = A, B
    if broken == "base_model":
        tensors = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=generator).half()}
    if broken == "ia3":
        tensors = {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l.weight": torch.ones(64, 1).half()}
    tenant = folder / f"tenant{index // 100:03d}"
    tenant.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        path = tenant / f"adapter{index:05d}"
        path.mkdir(exist_ok=True)
        config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha,
                  "target_modules": sorted({p.split(".")[-1] for p in LLM_PROJECTIONS}), "fan_in_fan_out": False,
                  "bias": "none", "task_type": "CAUSAL_LM"}
        (path / "adapter_config.json").write_text(json.dumps(config))
        weights = path / "adapter_model.safetensors"
        if broken != "no_weights":
            save_file(tensors, str(weights))
    else:
        weights = path = tenant / f"adapter{index:05d}.safetensors"
        metadata = {"ss_sd_model_name": "sdxl-base-1.0"} if fmt == "kohya" else None
        save_file(tensors, str(weights), metadata=metadata)
    if broken == "truncated" and weights.exists():
        size = weights.stat().st_size
        with weights.open("r+b") as handle:
            handle.truncate(max(8, size // 2))
    if broken == "random_bytes":
        weights.write_bytes(os.urandom(4096))
    return path


def make_fleet(folder: Path, count: int = 2000, seed: int = 0) -> dict[str, int]:
    """Write ``count`` adapters under ``folder``; returns counts by format and broken kind."""
    generator = torch.Generator().manual_seed(seed)
    counts: dict[str, int] = {}
    every = max(1, round(1 / BROKEN_SHARE))
    for index in range(count):
        fmt = ("peft", "kohya", "diffusers")[index % 3]
        broken = BROKEN_KINDS[(index // every) % len(BROKEN_KINDS)] if index % every == every - 1 else None
        if broken == "no_weights":
            fmt = "peft"  # only a PEFT folder can lack its weights file
        write_adapter(folder, index, fmt, generator, broken)
        counts[fmt] = counts.get(fmt, 0) + 1
        if broken:
            counts[f"broken:{broken}"] = counts.get(f"broken:{broken}", 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="Folder to create (default: a new temp folder).")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="loratools-fleet-"))
    folder.mkdir(parents=True, exist_ok=True)
    counts = make_fleet(folder, args.count, args.seed)
    print(f"wrote {args.count} adapters to {folder}: {counts}")


if __name__ == "__main__":
    main()
