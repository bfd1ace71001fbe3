"""Property-based fuzzing of every reader: mutated or truncated files either read or raise LoraToolsError.

Anything else (a crash, a bare RuntimeError from a library, a hang) is a bug. The example counts here keep the
suite fast; set LORATOOLS_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_tools.analysis import inspect_adapter
from lora_tools.errors import LoraToolsError
from lora_tools.formats import load_adapter

EXAMPLES = int(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _seed_files() -> dict[str, bytes]:
    """Valid files of each format, built once, as bytes."""
    gen = torch.Generator().manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    try:
        peft = {"base_model.model.q.lora_A.weight": torch.randn(2, 6, generator=gen),
                "base_model.model.q.lora_B.weight": torch.randn(5, 2, generator=gen).half()}
        save_file(peft, str(tmp / "peft.safetensors"))
        kohya = {"lora_te_a.lora_down.weight": torch.randn(2, 6, generator=gen),
                 "lora_te_a.lora_up.weight": torch.randn(5, 2, generator=gen),
                 "lora_te_a.alpha": torch.tensor(1.0)}
        save_file(kohya, str(tmp / "kohya.safetensors"), metadata={"ss_network_dim": "2"})
        diffusers = {"unet.b.to_q.lora.down.weight": torch.randn(2, 6, generator=gen),
                     "unet.b.to_q.lora.up.weight": torch.randn(5, 2, generator=gen)}
        save_file(diffusers, str(tmp / "diffusers.safetensors"))
        torch.save(peft, tmp / "peft.bin")
        # LyCORIS keys (issue 10): LoHa with Tucker cores, LoKr full + factored, LoCon-Tucker, full diffs, norms
        lycoris = {"lora_unet_c.hada_w1_a": torch.randn(2, 5, generator=gen),
                   "lora_unet_c.hada_w1_b": torch.randn(2, 3, generator=gen),
                   "lora_unet_c.hada_w2_a": torch.randn(2, 5, generator=gen),
                   "lora_unet_c.hada_w2_b": torch.randn(2, 3, generator=gen),
                   "lora_unet_c.hada_t1": torch.randn(2, 2, 3, 3, generator=gen),
                   "lora_unet_c.hada_t2": torch.randn(2, 2, 3, 3, generator=gen), "lora_unet_c.alpha": torch.tensor(1.0),
                   "lora_unet_k.lokr_w1": torch.randn(2, 3, generator=gen),
                   "lora_unet_k.lokr_w2_a": torch.randn(4, 1, generator=gen),
                   "lora_unet_k.lokr_w2_b": torch.randn(1, 2, generator=gen).half(),
                   "lora_unet_k.alpha": torch.tensor(2.0), "lora_unet_k.dora_scale": torch.randn(8, 1, generator=gen),
                   "lora_unet_m.lora_down.weight": torch.randn(2, 3, 1, 1, generator=gen),
                   "lora_unet_m.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=gen),
                   "lora_unet_m.lora_up.weight": torch.randn(4, 2, 1, 1, generator=gen),
                   "lora_unet_f.diff": torch.randn(3, 4, generator=gen), "lora_unet_f.diff_b": torch.randn(3),
                   "lora_unet_n.w_norm": torch.randn(4, generator=gen)}
        save_file(lycoris, str(tmp / "lycoris.safetensors"))
        return {p.name: p.read_bytes() for p in tmp.iterdir()}
    finally:
        shutil.rmtree(tmp)


SEEDS = _seed_files()
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False, "fan_in_fan_out": False,
          "rank_pattern": {"q": 2}, "alpha_pattern": {}, "target_modules": ["q"]}


def read_and_inspect(path: Path) -> None:
    try:
        inspect_adapter(load_adapter(path))
    except LoraToolsError:
        pass


mutation = st.tuples(st.integers(0, 10_000), st.integers(0, 255))


@FUZZ
@given(name=st.sampled_from(sorted(SEEDS)), flips=st.lists(mutation, min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_mutated_weight_files(name: str, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(SEEDS[name])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(bytes(data))
        read_and_inspect(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(CONFIG) + ["r", "lora_alpha", "peft_type"]), json_values,
                               max_size=3),
       raw_cut=st.one_of(st.none(), st.integers(0, 300)))
def test_mutated_peft_configs(changes: dict, raw_cut: int | None) -> None:
    config = dict(CONFIG, **changes)
    text = json.dumps(config)
    if raw_cut is not None:
        text = text[:raw_cut]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "adapter_config.json").write_text(text)
        (folder / "adapter_model.safetensors").write_bytes(SEEDS["peft.safetensors"])
        read_and_inspect(folder)


LYCORIS_CONFIGS = {
    "LOHA": ({"peft_type": "LOHA", "r": 2, "alpha": 4, "rank_pattern": {}, "alpha_pattern": {"q": 2},
              "target_modules": ["q"]},
             {"base_model.model.q.hada_w1_a": (5, 2), "base_model.model.q.hada_w1_b": (2, 6),
              "base_model.model.q.hada_w2_a": (5, 2), "base_model.model.q.hada_w2_b": (2, 6)}),
    "ADALORA": ({"peft_type": "ADALORA", "init_r": 3, "lora_alpha": 8, "target_modules": ["q"],
                 "rank_pattern": None},
                {"base_model.model.q.lora_A": (3, 6), "base_model.model.q.lora_B": (5, 3),
                 "base_model.model.q.lora_E": (3, 1)}),
}


@FUZZ
@given(kind=st.sampled_from(sorted(LYCORIS_CONFIGS)),
       changes=st.dictionaries(st.sampled_from(["r", "alpha", "init_r", "lora_alpha", "peft_type", "rank_pattern",
                                                "alpha_pattern", "fan_in_fan_out"]), json_values, max_size=3),
       shapes=st.dictionaries(st.integers(0, 3), st.tuples(st.integers(0, 7), st.integers(1, 7)), max_size=2))
def test_mutated_peft_lycoris_folders(kind: str, changes: dict, shapes: dict) -> None:
    """PEFT LoHa/AdaLoRA folders (issue 10) with mutated configs and tensor shapes read or raise LoraToolsError."""
    config, tensors = LYCORIS_CONFIGS[kind]
    keys = sorted(tensors)
    shaped = {k: shapes.get(i, tensors[k]) for i, k in enumerate(keys)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "adapter_config.json").write_text(json.dumps(dict(config, **changes)))
        save_file({k: torch.randn(*shape) for k, shape in shaped.items()}, str(folder / "adapter_model.safetensors"))
        read_and_inspect(folder)
