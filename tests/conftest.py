"""Tiny deterministic models and adapters, built in code with PEFT itself (the independent reference)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: sleeping (not spinning) idle workers keep a shared 2-core CI machine usable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    return BertModel(config).eval()


class TinyConvNet(torch.nn.Module):
    """A conv layer and a linear head: PEFT's conv LoRA path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def tiny_conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


MODEL_FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "conv": tiny_conv,
}


def make_peft_adapter(tmp_path: Path, model_name: str, save_dtype: torch.dtype | None = None,
                      **lora_kwargs: Any) -> tuple[Path, Any]:
    """Save a PEFT LoRA adapter with non-zero B (init_lora_weights=False); return (folder, PeftModel)."""
    from peft import LoraConfig, get_peft_model

    base = MODEL_FACTORIES[model_name]()
    lora_kwargs.setdefault("init_lora_weights", False)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(**lora_kwargs))
    if save_dtype is not None:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(save_dtype)
    out = tmp_path / f"{model_name}-adapter"
    model.save_pretrained(str(out))
    return out, model


@pytest.fixture
def peft_adapter(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    def build(model_name: str, **kwargs: Any) -> tuple[Path, Any]:
        return make_peft_adapter(tmp_path, model_name, **kwargs)

    return build


def requires_realdata(*parts: str) -> Any:
    path = REALDATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")
