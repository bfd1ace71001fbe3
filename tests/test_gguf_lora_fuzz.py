"""Fuzzing of the GGUF LoRA reader (issue 11): mutated or truncated GGUF files read or raise LoraToolsError.

Same contract as tests/test_fuzz_readers.py (whose settings and checker this reuses): anything but a
LoraToolsError escaping the reader or ``inspect`` is a bug.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_fuzz_readers import EXAMPLES, FUZZ, mutation, read_and_inspect

gguf = pytest.importorskip("gguf")


def _seed() -> bytes:
    """A small GGUF LoRA with every field our reader looks at (head counts, recorded names, q/k, F16, Q8_0)."""
    gen = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
        writer.add_uint32("llama.attention.head_count", 2)
        writer.add_uint32("llama.attention.head_count_kv", 1)
        writer.add_string("loratools.module_names", json.dumps({"blk.0.attn_q.weight": "q", "blk.0.attn_k.weight": "k"}))
        writer.add_tensor("blk.0.attn_q.weight.lora_a", gen.standard_normal((2, 32)).astype(np.float32))
        writer.add_tensor("blk.0.attn_q.weight.lora_b", gen.standard_normal((8, 2)).astype(np.float16))
        quantized = gguf.quants.quantize(gen.standard_normal((2, 32)).astype(np.float32),
                                         gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("blk.0.attn_k.weight.lora_a", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("blk.0.attn_k.weight.lora_b", gen.standard_normal((4, 2)).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


SEED = _seed()


def test_seed_reads() -> None:
    """The unmutated seed is a valid adapter (so the fuzzing starts from a file that reads)."""
    from lora_tools.formats import load_adapter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.gguf"
        path.write_bytes(SEED)
        adapter = load_adapter(path)
        assert set(adapter.modules) == {"q", "k"} and adapter.modules["q"].scale == 4.0


@settings(FUZZ, max_examples=max(100, EXAMPLES // 2))
@given(flips=st.lists(mutation, min_size=1, max_size=4), cut=st.one_of(st.none(), st.integers(0, 4000)),
       header_only=st.booleans())
def test_mutated_gguf_lora(flips: list[tuple[int, int]], cut: int | None, header_only: bool) -> None:
    data = bytearray(SEED)
    span = 400 if header_only else len(data)  # most structure sits in the first few hundred bytes
    for position, value in flips:
        data[position % span] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.gguf"
        path.write_bytes(bytes(data))
        read_and_inspect(path)
