"""The GGUF LoRA writer's own layout and checks (formats/gguf_layout.py, gguf_data.py, convert/to_gguf.py).

References: gguf's GGUFWriter (the same metadata and tensors through it must give the same bytes), gguf's own
TensorNameMap (every name it knows must map the same through our block map), and faults injected on purpose
(a wrong header value, wrong rows) that the verification must refuse before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_tools.convert.to_gguf import convert_to_gguf
from lora_tools.convert.verify import VerificationError
from lora_tools.errors import ModuleMismatchError
from lora_tools.formats import gguf_names, gguf_write, load_adapter

gguf = pytest.importorskip("gguf")
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
# module -> (out, in); k_proj has 2 kv heads of 16
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "mlp.down_proj": (64, 96), "mlp.up_proj": (96, 64)}


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA))
    save_file({"placeholder": torch.zeros(1)}, str(base / "model.safetensors"))
    return base


def _adapter(tmp_path: Path, dtype: torch.dtype = torch.float16, poison: str | None = None,
             **config: object) -> Path:
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in range(2):
        for module, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, inp, generator=gen).to(dtype)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=gen).to(dtype)
    if poison is not None:
        tensors[poison][1, 2] = float("inf")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj",
                                                                         "up_proj"], **config}))
    return folder


def test_same_bytes_as_gguf_writer(tmp_path: Path) -> None:
    """Our header, tensor table, alignment and data layout equal GGUFWriter's for the same content (q/k rows
    permuted and one module's scale baked in, so encoded tensors sit between copied runs)."""
    adapter = _adapter(tmp_path, alpha_pattern={"model.layers.1.mlp.up_proj": 3})
    ours = tmp_path / "ours.gguf"
    report = convert_to_gguf(adapter, ours, base=_base(tmp_path))
    assert report["gguf"]["permuted_modules"] == 4 and report["gguf"]["baked_modules"] >= 1
    reader = gguf.GGUFReader(str(ours))
    writer_path = tmp_path / "gguf-writer.gguf"
    writer = gguf.GGUFWriter(str(writer_path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value, vtype = field.contents(), field.types[0]
        {gguf.GGUFValueType.STRING: writer.add_string, gguf.GGUFValueType.UINT32: writer.add_uint32,
         gguf.GGUFValueType.FLOAT32: writer.add_float32}[vtype](key, value)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        writer.add_tensor(tensor.name, np.array(tensor.data).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert ours.read_bytes() == writer_path.read_bytes()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "starcoder2", "qwen3moe", "t5"])
def test_block_name_map_equals_gguf_map(arch: str) -> None:
    model_arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    full = gguf.get_tensor_name_map(model_arch, 12)
    ours = gguf_names.BlockNameMap(model_arch, 12)
    assert all(ours.get_type_and_name(key) == value for key, value in full.mapping.items())
    for key in ("model.layers.12.self_attn.q_proj", "model.layers.07.self_attn.q_proj", "model.layers.x.mlp"):
        assert ours.get_type_and_name(key) is None and full.get_type_and_name(key) is None


def test_nonfinite_in_a_copied_run_names_its_module(tmp_path: Path) -> None:
    """An Inf inside a long run of copied tensors is found and named; with --allow-nonfinite it is copied."""
    poisoned = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    adapter, base, out = _adapter(tmp_path, poison=poisoned), _base(tmp_path), tmp_path / "a.gguf"
    with pytest.raises(ModuleMismatchError, match=r"module model\.layers\.1\.mlp\.down_proj: .*NaN or Inf"):
        convert_to_gguf(adapter, out, base=base)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["adapter", "base"]
    convert_to_gguf(adapter, out, base=base, allow_nonfinite=True)
    stored = gguf.GGUFReader(str(out)).tensors
    a = next(t for t in stored if t.name == "blk.1.ffn_down.weight.lora_a")
    assert np.isinf(np.array(a.data)).sum() == 1


def test_header_that_differs_from_the_plan_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, out = _adapter(tmp_path), tmp_path / "a.gguf"
    real = gguf_write.header_bytes

    def doubled_alpha(metadata: list, entries: list) -> bytes:
        return real([(k, t, v * 2 if k == "adapter.lora.alpha" else v) for k, t, v in metadata], entries)

    monkeypatch.setattr(gguf_write, "header_bytes", doubled_alpha)
    with pytest.raises(VerificationError, match="adapter.lora.alpha"):
        convert_to_gguf(adapter, out, base=_base(tmp_path))
    assert not out.exists()


def test_wrong_rows_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k rows encoded in the wrong order fail the decoded comparison (only the encoded tensors, q/k B here,
    go through _encode; the copies are compared byte for byte as they are written)."""
    adapter, out = _adapter(tmp_path), tmp_path / "a.gguf"
    real = gguf_write._encode
    monkeypatch.setattr(gguf_write, "_encode", lambda tensor, ggml_type: real(tensor.flip(0), ggml_type))
    with pytest.raises(VerificationError, match=r"model\.layers\.0\.self_attn\.(k|q)_proj"):
        convert_to_gguf(adapter, out, base=_base(tmp_path))
    assert not out.exists()


def test_round_trip_of_the_written_file(tmp_path: Path) -> None:
    """The file reads back (our reader) with every module's update equal to the input's."""
    adapter = _adapter(tmp_path, dtype=torch.float32)
    out = tmp_path / "a.gguf"
    report = convert_to_gguf(adapter, out, base=_base(tmp_path), dtype="bf16")
    assert report["gguf"]["types"] == {"BF16": 20} and report["bit_exact_modules"] == 0
    original, written = load_adapter(adapter), load_adapter(out)
    for name in original.modules:
        ref = original.delta_weight(name, torch.float64)
        assert float((written.delta_weight(name, torch.float64) - ref).norm() / ref.norm()) < 8e-3
