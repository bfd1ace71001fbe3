"""rank_pattern/alpha_pattern that every PEFT from 0.10 on resolves alike, and the PEFT reader's warnings/errors.

Each PEFT rule is re-implemented below from PEFT's source as a reference; the newest one is also PEFT's own
``get_pattern_key``. Truncated real adapters are written and loaded with ``PeftModel`` in the installed PEFT and,
in a subprocess, in the oldest PEFT we support (pip-installed once into a cache folder; the test skips when the
package index cannot be reached). ``make test-compat`` runs that load test against more PEFT versions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
# The oldest PEFT we claim (pyproject: peft>=0.10); LORATOOLS_COMPAT_PEFT="0.10.0 0.13.2 0.14.0" tests several.
OLDEST_PEFT = "0.10.0"
COMPAT_VERSIONS = os.environ.get("LORATOOLS_COMPAT_PEFT", OLDEST_PEFT).split()
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]

# --- the rules of each PEFT version (references) -----------------------------------------------------------


def _resolve(config: dict[str, Any], name: str, regex: str, combined: bool) -> tuple[int, float]:
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def first(keys: list[str]) -> str:  # no match: PEFT looks the module name itself up in the dict
        return next((key for key in keys if re.match(regex.replace("KEY", key), name)), name)

    if combined:
        key = first(list(rank_pattern) + list(alpha_pattern))
        return rank_pattern.get(key, config["r"]), alpha_pattern.get(key, config["lora_alpha"])
    return (rank_pattern.get(first(list(rank_pattern)), config["r"]),
            alpha_pattern.get(first(list(alpha_pattern)), config["lora_alpha"]))


def peft_010_013(config: dict[str, Any], name: str) -> tuple[int, float]:
    # PEFT v0.10.0-v0.13.2, tuners/lora/model.py _create_and_replace: ONE search over the rank keys followed by
    # the alpha keys, with re.match(rf".*\.{key}$", name); the key found is looked up in both dicts.
    return _resolve(config, name, r".*\.KEY$", combined=True)


def peft_014(config: dict[str, Any], name: str) -> tuple[int, float]:
    # PEFT v0.14.0, utils/other.py get_pattern_key: the same regex, one search per dict.
    return _resolve(config, name, r".*\.KEY$", combined=False)


def peft_015(config: dict[str, Any], name: str) -> tuple[int, float]:
    # PEFT >= v0.15.0 get_pattern_key: re.match(rf"(.*\.)?({key})$", name), one search per dict.
    return _resolve(config, name, r"(.*\.)?(KEY)$", combined=False)


def peft_installed(config: dict[str, Any], name: str) -> tuple[int, float]:
    """The installed PEFT's own function (the newest rule)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    return (rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"]),
            alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"]))


OLD_RULES = {"0.10-0.13": peft_010_013, "0.14": peft_014}
NEW_RULES = {">=0.15": peft_015, "installed": peft_installed}


def written_config(values: dict[str, tuple[int, float]], caplog: pytest.LogCaptureFixture | None = None,
                   ) -> dict[str, Any]:
    """config_for on modules with these (rank, alpha), through JSON as a reader sees it."""
    from lora_tools.formats.peft import config_for

    modules = {n: SimpleNamespace(rank=rank, scale=alpha / rank) for n, (rank, alpha) in values.items()}
    adapter = SimpleNamespace(path=Path("mem"), modules=modules)
    return json.loads(json.dumps(config_for(adapter, {"peft_type": "LORA"})))  # type: ignore[arg-type]


def wrong_under(rule: Any, config: dict[str, Any], values: dict[str, tuple[int, float]]) -> list[str]:
    wrong = []
    for name, (rank, alpha) in values.items():
        got_rank, got_alpha = rule(config, name)
        if got_rank != rank or not math.isclose(got_alpha, alpha, rel_tol=1e-12):
            wrong.append(f"{name}: ({got_rank}, {got_alpha}) != ({rank}, {alpha})")
    return wrong


def assert_every_rule_agrees(config: dict[str, Any], values: dict[str, tuple[int, float]]) -> None:
    for label, rule in {**OLD_RULES, **NEW_RULES}.items():
        assert not wrong_under(rule, config, values), (label, config, wrong_under(rule, config, values))
    assert not any("\\" in key for key in [*config["rank_pattern"], *config["alpha_pattern"]]), config


def llama(value: Any, layers: int = 30) -> dict[str, tuple[int, float]]:
    return {f"model.layers.{i}.{p}": value(i, p) for i in range(layers) for p in PROJ}


def gpt2(value: Any, layers: int = 12) -> dict[str, tuple[int, float]]:
    return {f"transformer.h.{i}.{p}": value(i, p) for i in range(layers) for p in ("attn.c_attn", "attn.c_proj")}


# --- defect 3: what the writer puts in rank_pattern / alpha_pattern -----------------------------------------


def test_one_key_covers_thirty_layers() -> None:
    values = llama(lambda i, p: (2, 4) if "down_proj" in p else (8, 16))
    config = written_config(values)
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert config["rank_pattern"] == {"down_proj": 2} and config["alpha_pattern"] == {"down_proj": 4}
    assert_every_rule_agrees(config, values)


def test_an_exception_is_listed_before_the_collapsed_key() -> None:
    values = llama(lambda i, p: ((4, 8) if i == 5 else (2, 4)) if "down_proj" in p else (8, 16))
    config = written_config(values)
    assert list(config["rank_pattern"].items()) == [("layers.5.mlp.down_proj", 4), ("down_proj", 2)]
    assert_every_rule_agrees(config, values)


def test_gpt2_single_layer_gets_a_plain_name_that_old_peft_matches() -> None:
    """The issue's case: ``transformer\\.h\\.0\\.attn\\.c_attn`` matched nothing before PEFT 0.15."""
    values = gpt2(lambda i, p: (2, 0.5) if (i, p) == (0, "attn.c_attn") else (4, 1))
    config = written_config(values)
    assert config["rank_pattern"] == {"h.0.attn.c_attn": 2}
    assert_every_rule_agrees(config, values)


def test_alpha_only_differences_leave_rank_pattern_empty() -> None:
    values = llama(lambda i, p: (8, 32) if "q_proj" in p else (8, 16), layers=4)
    config = written_config(values)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {"q_proj": 32}
    assert_every_rule_agrees(config, values)


def test_combined_search_of_peft_before_014() -> None:
    """Rank set for all q_proj, alpha for one of them: separate keys would give layer 0's q_proj the default
    alpha in PEFT 0.10-0.13, which looks the rank key up in alpha_pattern too."""
    values = llama(lambda i, p: ((4, 2) if i == 0 else (4, 8)) if "q_proj" in p else (8, 16), layers=4)
    config = written_config(values)
    assert_every_rule_agrees(config, values)
    naive = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4},
             "alpha_pattern": {"layers.0.self_attn.q_proj": 2, "q_proj": 8}}
    assert wrong_under(peft_010_013, naive, values) and not wrong_under(peft_015, naive, values)


@pytest.mark.parametrize("values", [
    # a name that ends another one at a dot, two or more segments deeper
    {"attn.c_attn": (2, 2), "x.h.attn.c_attn": (4, 4), "y.h.attn.c_attn": (4, 4), "lm_head": (3, 3)},
    # one segment deeper: only the full name tells them apart, through PEFT's fallback lookup
    {"attn.c_attn": (2, 2), "h.attn.c_attn": (4, 4), "lm_head": (2, 2)},
    {"attn.c_attn": (4, 4), "h.attn.c_attn": (2, 2), "lm_head": (2, 2), "x.q": (2, 2)},
    # top-level modules (no dot: the old regex never matches them)
    {"lm_head": (2, 2), **gpt2(lambda i, p: (4, 4), layers=2)},
], ids=["deeper", "one-deeper", "one-deeper-other-default", "top-level"])
def test_names_that_end_one_another(values: dict[str, tuple[int, float]]) -> None:
    assert_every_rule_agrees(written_config(values), values)


def test_a_dot_that_would_match_another_character_is_escaped() -> None:
    """Keys are regexes: plain ``q.proj`` would also match ``m.q_proj``."""
    values = {"m.q.proj": (2, 2), "m.k.proj": (4, 4), "m.q_proj": (4, 4)}
    config = written_config(values)
    assert config["rank_pattern"] == {r"q\.proj": 2}, config
    for label, rule in {**OLD_RULES, **NEW_RULES}.items():
        assert not wrong_under(rule, config, values), (label, config)


def test_no_pattern_for_old_peft_is_said_not_written_silently(caplog: pytest.LogCaptureFixture) -> None:
    """Three names nested at dot boundaries with three ranks: no key set works for PEFT < 0.15."""
    values = {"proj": (2, 2), "block.proj": (4, 4), "outer.block.proj": (6, 6), "other": (4, 4), "more": (4, 4)}
    with caplog.at_level(logging.WARNING, logger="lora_tools.formats.peft"):
        config = written_config(values)
    for rule in NEW_RULES.values():
        assert not wrong_under(rule, config, values)
    assert wrong_under(peft_010_013, config, values)  # the warning tells the truth
    assert any("older than 0.15" in r.getMessage() and "block.proj" in r.getMessage() for r in caplog.records)


def test_adapter_with_no_nesting_is_never_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    values = gpt2(lambda i, p: (i % 3 + 1, 2 * (i % 3 + 1)) if p == "attn.c_attn" else (4, 4))
    with caplog.at_level(logging.WARNING, logger="lora_tools.formats.peft"):
        assert_every_rule_agrees(written_config(values), values)
    assert not caplog.records


# Single-letter segments make names end one another often, and their dots always sit where a key's dots do.
names = st.lists(st.sampled_from("abh01"), min_size=1, max_size=4).map(".".join)
modules = st.dictionaries(names, st.sampled_from([(1, 1.0), (2, 4.0), (2, 2.0), (4, 8.0)]), min_size=1,
                          max_size=12)


@settings(max_examples=150, deadline=None)
@given(values=modules)
def test_every_module_resolves_right_or_the_writer_says_which_not(values: dict[str, tuple[int, float]]) -> None:
    from lora_tools.formats.peft_patterns import choose_patterns

    patterns = choose_patterns(values)
    config = json.loads(json.dumps(patterns.as_config()))
    for rule in NEW_RULES.values():
        assert not wrong_under(rule, config, values), config
    nested = any(other.endswith("." + name) for name in values for other in values)
    wrong = {label: wrong_under(rule, config, values) for label, rule in OLD_RULES.items()}
    reported = {line.split(": ", 1)[1].split(" gets ")[0] for line in patterns.old_peft_mismatches}
    assert reported == {w.split(": ")[0] for ws in wrong.values() for w in ws}, (config, wrong)
    if not nested:
        assert not reported, config


# --- defect 8: the PEFT reader's warnings and errors --------------------------------------------------------


def gpt2_tensors(layers: int = 3) -> dict[str, Any]:
    from tests.helpers import lora_tensors

    return lora_tensors({f"transformer.h.{i}.{p}": (out, 4, 2) for i in range(layers)
                         for p, out in (("attn.c_attn", 12), ("attn.c_proj", 4), ("mlp.c_fc", 16))})


def test_fan_in_fan_out_mismatch_is_one_warning_per_adapter(tmp_path: Path) -> None:
    from lora_tools.formats import load_adapter
    from tests.helpers import lora_tensors, write_peft

    adapter = load_adapter(write_peft(tmp_path / "gpt2", gpt2_tensors(), r=2, fan_in_fan_out=False))
    lines = [w for w in adapter.warnings if "fan_in_fan_out" in w]
    assert len(lines) == 1, adapter.warnings
    assert "fan_in_fan_out=false" in lines[0] and "9 module(s)" in lines[0]
    assert "transformer.h.0.attn.c_attn" in lines[0]
    assert all(m.kind == "conv1d" and "fifo_mismatch" in m.flags for m in adapter.modules.values())

    names = {f"model.layers.{i}.self_attn.q_proj": (8, 8, 2) for i in range(4)}
    adapter = load_adapter(write_peft(tmp_path / "llama", lora_tensors(names), r=2, fan_in_fan_out=True))
    lines = [w for w in adapter.warnings if "fan_in_fan_out" in w]
    assert len(lines) == 1 and "fan_in_fan_out=true" in lines[0] and "4 module(s)" in lines[0], lines
    assert all(m.kind == "linear" for m in adapter.modules.values())


def test_no_config_means_no_config_says_warning(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lora_tools.formats import load_adapter

    tmp_path.joinpath("weights").mkdir()
    save_file(gpt2_tensors(), str(tmp_path / "weights" / "adapter_model.safetensors"))
    adapter = load_adapter(tmp_path / "weights", format="peft")
    assert not [w for w in adapter.warnings if "config says" in w], adapter.warnings
    assert len([w for w in adapter.warnings if "Conv1D" in w]) == 1, adapter.warnings
    assert any("no adapter_config.json" in w for w in adapter.warnings)
    assert all(m.kind == "conv1d" and "fifo_mismatch" not in m.flags for m in adapter.modules.values())


def diffusers_file(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora"
    save_file({f"{key}.down.weight": torch.ones(2, 8), f"{key}.up.weight": torch.ones(8, 2)}, str(path))
    return path


def test_format_peft_on_a_folder_without_config_names_the_real_problem(tmp_path: Path) -> None:
    from tests.helpers import assert_one_line_error, run_cli

    folder = diffusers_file(tmp_path / "sd" / "pytorch_lora_weights.safetensors").parent
    result = run_cli("inspect", "--format", "peft", str(folder))
    assert_one_line_error(result, str(folder), "no adapter_config.json", "looks like a diffusers adapter")
    assert "has adapter_config.json" not in result.stderr
    # The file itself: its names, not "another scheme".
    result = run_cli("inspect", "--format", "peft", str(folder / "pytorch_lora_weights.safetensors"))
    assert_one_line_error(result, "no adapter_config.json", "looks like a diffusers adapter")
    # PEFT names in a file not called adapter_model.*: weights without a config.
    from safetensors.torch import save_file

    (tmp_path / "bare").mkdir()
    save_file(gpt2_tensors(), str(tmp_path / "bare" / "weights.safetensors"))
    assert_one_line_error(run_cli("inspect", "--format", "peft", str(tmp_path / "bare")),
                          "no adapter_config.json", "PEFT-named weights without a config", "weights.safetensors")
    # Nothing recognisable: still the missing config first.
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("inspect", "--format", "peft", str(tmp_path / "empty")),
                          "not a PEFT adapter: no adapter_config.json")


# --- defect 3 end to end: PeftModel loads what we write, in the newest and the oldest PEFT -------------------

TINY_GPT2 = {"n_embd": 2, "n_layer": 2, "n_head": 2, "vocab_size": 8, "n_positions": 8}
GPT2 = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 8, "vocab_size": 8, "n_positions": 8}
OPT125M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 8, "vocab_size": 8,
           "max_position_embeddings": 8, "word_embed_proj_dim": 768}
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}
REAL = [("peft-tiny-gpt2-ironhack", "gpt2", TINY_GPT2, 0.999), ("peft-gpt2-r4-cattn-ironhack", "gpt2", GPT2, 0.9),
        ("peft-opt125m-qv", "opt", OPT125M, 0.9)]


def build_base(kind: str, config: dict[str, Any]) -> Any:
    """A base model with random weights from a config (also run inside the old-PEFT subprocess)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "nested":  # module names that end one another at a dot: proj, block.proj, outer.block.proj
        base = torch.nn.Module()
        base.proj, base.block, base.outer = torch.nn.Linear(8, 8), torch.nn.Module(), torch.nn.Module()
        base.block.proj, base.outer.block = torch.nn.Linear(8, 8), torch.nn.Module()
        base.outer.block.proj = torch.nn.Linear(8, 8)
        return base
    classes = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "opt": ("OPTConfig", "OPTForCausalLM"),
               "llama": ("LlamaConfig", "LlamaForCausalLM")}[kind]
    model_config = getattr(transformers, classes[0])(**config)
    return getattr(transformers, classes[1])(model_config).eval()


def peft_view(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Load each adapter folder with PeftModel onto its base; per module: r, scaling, ‖ΔW‖_F as PEFT has them."""
    import warnings

    import peft
    import torch
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    known = set(LoraConfig.__dataclass_fields__)
    views: dict[str, Any] = {"version": peft.__version__}
    for spec in specs:
        folder = Path(spec["folder"])
        config = json.loads((folder / "adapter_config.json").read_text())
        unknown = sorted(set(config) - known)
        if unknown:  # fields of a newer PEFT, which this one refuses whatever the patterns say
            copy = folder.with_name(f"{folder.name}-peft-{peft.__version__}")
            copy.mkdir(exist_ok=True)
            shutil.copy(folder / "adapter_model.safetensors", copy)
            config = {k: v for k, v in config.items() if k in known}
            (copy / "adapter_config.json").write_text(json.dumps(config))
            folder = copy
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(build_base(spec["kind"], spec["config"]), str(folder))
        except Exception as exc:  # noqa: BLE001 - a size mismatch is the finding; report it, do not crash
            views[spec["folder"]] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        modules = {}
        for name, layer in model.base_model.model.named_modules():
            if isinstance(layer, LoraLayer) and "default" in layer.r:
                delta = layer.get_delta_weight("default").detach().double()
                modules[name] = [layer.r["default"], layer.scaling["default"], float(torch.linalg.norm(delta))]
        views[spec["folder"]] = {"modules": modules, "dropped_fields": unknown}
    return views


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Adapters written by loratools with rank_pattern in play, and what each module must be in PEFT."""
    import torch

    from lora_tools.formats import load_adapter, save_adapter
    from lora_tools.truncate import truncate
    from tests.conftest import make_peft_adapter
    from tests.helpers import lora_tensors, write_peft

    tmp = tmp_path_factory.mktemp("written")
    specs, expected = [], {}
    for name, kind, config, energy in REAL:
        if (REALDATA / name).is_dir():
            adapter = load_adapter(REALDATA / name)
            result = truncate(adapter, energy=energy)
            assert len({m.rank for m in result.adapter.modules.values()}) > 1  # patterns are needed
            specs.append({"folder": str(save_adapter(result.adapter, tmp / name)), "kind": kind, "config": config})
    # A Llama whose down_proj all have one rank (one collapsed key) and one q_proj another.
    source, _ = make_peft_adapter(tmp, "llama", target_modules=[p.split(".")[1] for p in PROJ], r=8,
                                  lora_alpha=16, rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 4})
    out = save_adapter(load_adapter(source), tmp / "llama-written")
    specs.append({"folder": str(out), "kind": "llama", "config": LLAMA})
    # Names ending one another: block.proj and outer.block.proj share a rank, proj has another.
    tensors = lora_tensors({"proj": (8, 8, 2), "block.proj": (8, 8, 4), "outer.block.proj": (8, 8, 4)})
    source = write_peft(tmp / "nested-in", tensors, r=4, lora_alpha=8, target_modules=["proj"],
                        rank_pattern={"outer.block.proj": 4, "block.proj": 4, "proj": 2})
    specs.append({"folder": str(save_adapter(load_adapter(source), tmp / "nested")), "kind": "nested",
                  "config": {}})
    for spec in specs:
        adapter = load_adapter(spec["folder"])
        expected[spec["folder"]] = {n: (m.rank, m.scale, float(torch.linalg.norm(adapter.delta_weight(
            n, torch.float64)))) for n, m in adapter.modules.items()}
    return specs, expected


def check_views(views: dict[str, Any], expected: dict[str, Any]) -> None:
    for folder, want in expected.items():
        view = views[folder]
        assert "error" not in view, (views["version"], folder, view)
        assert set(view["modules"]) == set(want), (views["version"], folder)
        for name, (rank, scale, norm) in want.items():
            got_rank, got_scale, got_norm = view["modules"][name]
            assert got_rank == rank, (views["version"], folder, name, got_rank, rank)
            assert got_scale == pytest.approx(scale, rel=1e-12), (views["version"], folder, name)
            assert got_norm == pytest.approx(norm, rel=1e-5), (views["version"], folder, name)


def test_written_llama_config_has_the_collapsed_keys(written: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    folder = next(Path(spec["folder"]) for spec in written[0] if spec["kind"] == "llama")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"layers.1.self_attn.q_proj": 4, "down_proj": 2}, config["rank_pattern"]
    assert (config["r"], config["lora_alpha"]) == (8, 16)


def test_installed_peft_loads_what_we_write(written: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    specs, expected = written
    check_views(peft_view(specs), expected)


def old_peft(version: str) -> Path:
    """PEFT ``version`` pip-installed (without dependencies) into a cache folder reused across runs."""
    cache = Path(os.environ.get("LORATOOLS_TEST_CACHE", Path(tempfile.gettempdir()) / "loratools-test-cache"))
    target = cache / f"peft-{version}"
    if (target / "peft" / "__init__.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".peft-{version}-"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
               "--target", str(staging), f"peft=={version}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"cannot pip-install peft=={version} (no package index?): "
                    f"{done.stderr.strip().splitlines()[-1:] if done else 'timed out'}")
    try:
        staging.rename(target)
    except OSError:  # another run installed it meanwhile
        pass
    return target


@pytest.mark.parametrize("version", COMPAT_VERSIONS)
def test_old_peft_loads_what_we_write(written: tuple[list[dict[str, Any]], dict[str, Any]], version: str) -> None:
    specs, expected = written
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old_peft(version)), str(ROOT)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, json.dumps(specs)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if done.returncode == 3:
        pytest.skip(f"peft {version} does not import here: {done.stdout.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    views = json.loads(done.stdout.strip().splitlines()[-1])
    assert views["version"] == version
    check_views(views, expected)


if __name__ == "__main__":  # the old-PEFT side of test_old_peft_loads_what_we_write
    try:
        import peft  # noqa: F401
        from peft import PeftModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "this PEFT does not run here"
        print(f"{type(exc).__name__}: {exc}")
        sys.exit(3)
    print(json.dumps(peft_view(json.loads(sys.argv[1]))))
