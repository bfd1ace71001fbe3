"""Write a synthetic PEFT LoRA adapter shaped like Llama-2-7B with LoRA on every linear layer.

Layout (per decoder layer, ``r = 16``, fp16), keys exactly as PEFT saves them::

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight   4096 -> 4096
    base_model.model.model.layers.{i}.mlp.{gate,up}_proj.lora_{A,B}.weight         4096 -> 11008
    base_model.model.model.layers.{i}.mlp.down_proj.lora_{A,B}.weight              11008 -> 4096

``lora_A`` has shape ``[r, in]`` and ``lora_B`` has shape ``[out, r]``. Values are random but
deterministic, with a decaying spectrum (column ``j`` of B is scaled by ``DECAY**j``) and a non-zero B.

Usage::

    python benchmarks/make_synthetic_adapter.py --out /tmp/llama2-7b-lora --layers 32
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 4096
INTERMEDIATE = 11008
RANK = 16
LORA_ALPHA = 32
DECAY = 0.85
B_SCALE = 0.02
DEFAULT_SEED = 1234
KEY_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-wrapped linear layer: ``path`` is relative to the model (``model.layers.0.mlp.up_proj``)."""

    path: str
    in_features: int
    out_features: int

    @property
    def kind(self) -> str:
        """The module type without the layer index, e.g. ``self_attn.q_proj``."""
        return ".".join(self.path.split(".")[-2:])

    @property
    def key_a(self) -> str:
        return f"{KEY_PREFIX}{self.path}.lora_A.weight"

    @property
    def key_b(self) -> str:
        return f"{KEY_PREFIX}{self.path}.lora_B.weight"


# (submodule, in_features, out_features) for one Llama-2-7B decoder layer, in PEFT's save order.
LAYER_MODULES: tuple[tuple[str, int, int], ...] = (
    ("self_attn.q_proj", HIDDEN, HIDDEN),
    ("self_attn.k_proj", HIDDEN, HIDDEN),
    ("self_attn.v_proj", HIDDEN, HIDDEN),
    ("self_attn.o_proj", HIDDEN, HIDDEN),
    ("mlp.gate_proj", HIDDEN, INTERMEDIATE),
    ("mlp.up_proj", HIDDEN, INTERMEDIATE),
    ("mlp.down_proj", INTERMEDIATE, HIDDEN),
)
TARGET_MODULES: list[str] = [name.split(".")[-1] for name, _, _ in LAYER_MODULES]


def module_specs(layers: int) -> list[ModuleSpec]:
    """All LoRA modules of a ``layers``-deep Llama-2-7B, layer by layer."""
    return [
        ModuleSpec(f"model.layers.{i}.{name}", fan_in, fan_out)
        for i in range(layers)
        for name, fan_in, fan_out in LAYER_MODULES
    ]


def adapter_config() -> dict[str, object]:
    """The ``adapter_config.json`` PEFT would write for this adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": TARGET_MODULES,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def make_module(spec: ModuleSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp16 ``(A, B)`` for one module; B's columns decay geometrically so the spectrum decays."""
    a = torch.randn(RANK, spec.in_features, generator=gen) / math.sqrt(spec.in_features)
    decay = DECAY ** torch.arange(RANK, dtype=torch.float32)
    b = torch.randn(spec.out_features, RANK, generator=gen) * (B_SCALE * decay)
    return a.to(torch.float16), b.to(torch.float16)


def write_adapter(out: Path, layers: int = 32, seed: int = DEFAULT_SEED) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out``; return ``out``.

    Tensors are generated one module at a time in float32 and kept only as fp16, so peak memory is
    about the size of the output file (~80 MB for 32 layers) plus one module's float32 scratch.
    """
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for spec in module_specs(layers):
        a, b = make_module(spec, gen)
        tensors[spec.key_a] = a
        tensors[spec.key_b] = b
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(adapter_config(), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: a new dir in /tmp)"
    )
    parser.add_argument("--layers", type=int, default=32, help="number of decoder layers (default: 32)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"RNG seed (default: {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="loratools-synth-"))
    write_adapter(out, layers=args.layers, seed=args.seed)
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 1e6
    print(f"wrote {len(module_specs(args.layers))} LoRA modules ({size_mb:.1f} MB) to {out}")


if __name__ == "__main__":
    main()
