"""Flux's text encoders in kohya/ComfyUI files: CLIP-L as ``lora_te1_``, T5-XXL as ``lora_te3_`` (sd-scripts
networks/lora_flux.py), and in diffusers naming ``text_encoder.`` / ``text_encoder_2.`` (a Flux pipeline's
text_encoder_2 is its T5EncoderModel).

References: transformers' own T5EncoderModel (every T5 path we write must be one of its modules) and diffusers'
kohya Flux converter for the CLIP and transformer layers; diffusers' converter does not handle ``lora_te3_``
(it leaves those keys out), so for T5 the check is the exact round trip of every dense update.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_tools.convert.run import convert
from lora_tools.formats import load_adapter
from lora_tools.linalg.products import relative_difference
from tests.test_image_models import TOLERANCE, Factory, flux_kohya, oracle_modules

conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
T5_LAYERS = {"layer.0.SelfAttention.q": (8, 16), "layer.0.SelfAttention.o": (16, 8),
             "layer.1.DenseReluDense.wi_0": (32, 16), "layer.1.DenseReluDense.wi_1": (32, 16),
             "layer.1.DenseReluDense.wo": (16, 32)}


def flux_with_text_encoders(tmp_path: Path) -> Path:
    tensors = load_file(str(flux_kohya(tmp_path / "flux.safetensors")))
    f = Factory(9)
    f.kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 8, 2, alpha=1)
    for block in (0, 23):
        for layer, (out, inp) in T5_LAYERS.items():
            f.kohya(f"lora_te3_encoder_block_{block}_{layer.replace('.', '_')}", out, inp, 2, alpha=3)
    path = tmp_path / "flux_te.safetensors"
    save_file({**tensors, **f.tensors}, str(path))
    return path


def test_flux_t5_names_both_ways(tmp_path: Path) -> None:
    source = flux_with_text_encoders(tmp_path)
    diffusers_file = tmp_path / "diffusers.safetensors"
    convert(source, diffusers_file, "diffusers")
    ours = load_adapter(diffusers_file)
    t5 = sorted(n for n in ours.modules if n.startswith("text_encoder_2."))
    assert len(t5) == 10 and "text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wi_1" in t5
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in ours.modules
    # every T5 path is a module of transformers' own T5 encoder (24 blocks, gated feed-forward as in T5 v1.1)
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=8, d_model=16, d_kv=4, d_ff=32, num_layers=24, num_heads=2,
                      feed_forward_proj="gated-gelu")
    real = dict(T5EncoderModel(config).named_modules())
    for name in t5:
        layer = real[name[len("text_encoder_2."):]]
        B, A = ours.factors(name)
        assert isinstance(layer, torch.nn.Linear) and tuple(layer.weight.shape) == (B.shape[0], A.shape[1]), name
    # diffusers' converter: same transformer layers as ours; it leaves lora_te3_ out
    expected = oracle_modules(conversion._convert_kohya_flux_lora_to_diffusers(load_file(str(source))))
    assert not any(n.startswith("text_encoder_2.") for n in expected)
    original = load_adapter(source)
    for name in t5:  # the T5 updates equal the kohya file's
        kohya_name = "lora_te3_" + name[len("text_encoder_2."):].replace(".", "_")
        B, A = original.factors(kohya_name, torch.float64)
        B2, A2 = ours.factors(name, torch.float64)
        scale, scale2 = original.modules[kohya_name].scale, ours.modules[name].scale
        assert relative_difference(scale2 * B2, A2, scale * B, A) < TOLERANCE, name
    assert {n for n in ours.modules if n.startswith("transformer.")} == set(expected)
    for name, (B_ref, A_ref) in expected.items():
        B, A = ours.factors(name, torch.float64)
        assert relative_difference(ours.modules[name].scale * B, A, B_ref, A_ref) < TOLERANCE, name
    # and back: the kohya names of the input, lora_te1_ / lora_te3_ included
    back = tmp_path / "back.safetensors"
    convert(diffusers_file, back, "kohya")
    keys = {k for k in load_file(str(back)) if k.endswith(".lora_down.weight")}
    assert keys == {k for k in load_file(str(source)) if k.endswith(".lora_down.weight")}
