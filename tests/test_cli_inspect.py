"""`loratools inspect` and `loratools spectrum` driven through Click's CliRunner."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_tools.data import example_adapter_path
from tests.helpers import lora_tensors, run_cli, write_peft

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.1.self_attn.q_proj": (16, 16, 4),
           "model.layers.10.self_attn.q_proj": (16, 16, 4)}


@pytest.fixture
def small_adapter(tmp_path: Path) -> Path:
    tensors = lora_tensors(MODULES)
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] *= 10  # largest norm
    tensors["base_model.model.score.weight"] = torch.ones(2, 16)  # a modules_to_save copy
    return write_peft(tmp_path / "adapter", tensors, r=4, lora_alpha=8)


def test_json_document_has_the_documented_fields(small_adapter: Path) -> None:
    result = run_cli("inspect", str(small_adapter), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    for key in ("format", "base_model", "num_modules", "total_params", "modules", "extra_tensors", "warnings"):
        assert key in doc
    assert doc["format"] == "peft" and doc["num_modules"] == 3 and doc["base_model"] == "tiny/test"
    assert doc["total_params"] == 3 * (4 * 16 + 16 * 4)
    assert [e["key"] for e in doc["extra_tensors"]] == ["base_model.model.score.weight"]
    module = doc["modules"][0]
    for key in ("name", "shape", "rank", "alpha", "scale", "fro_norm", "sigma_max", "stable_rank", "effective_rank",
                "rank_90", "rank_99", "singular_values", "flags"):
        assert key in module
    assert module["scale"] == 2.0 and len(module["singular_values"]) == 4
    # natural order: layers.1 before layers.10
    assert [m["name"] for m in doc["modules"]] == list(MODULES)


def test_sort_by_norm_and_module_filter(small_adapter: Path) -> None:
    doc = json.loads(run_cli("inspect", str(small_adapter), "--json", "--sort", "norm").stdout)
    assert doc["modules"][0]["name"] == "model.layers.1.self_attn.q_proj"
    norms = [m["fro_norm"] for m in doc["modules"]]
    assert norms == sorted(norms, reverse=True)
    doc = json.loads(run_cli("inspect", str(small_adapter), "--json", "--module", "*layers.1?.*").stdout)
    assert [m["name"] for m in doc["modules"]] == ["model.layers.10.self_attn.q_proj"]
    assert doc["num_modules"] == 3 and doc["num_reported"] == 1


def test_table_output(small_adapter: Path) -> None:
    result = run_cli("inspect", str(small_adapter))
    assert result.exit_code == 0
    assert re.search(r"^format: +peft$", result.stdout, re.M)
    assert "model.layers.10.self_attn.q_proj" in result.stdout
    assert "stable rank" in result.stdout


def test_unmatched_module_glob_is_an_error(small_adapter: Path) -> None:
    result = run_cli("inspect", str(small_adapter), "--module", "nothing*")
    assert result.exit_code == 1 and "no module matches" in result.stderr


def test_spectrum_json_and_plot(small_adapter: Path, tmp_path: Path) -> None:
    plot = tmp_path / "spectra.png"
    result = run_cli("spectrum", str(small_adapter), "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["modules"]) == 3 and all(len(m["singular_values"]) == 4 for m in doc["modules"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("spectrum", str(small_adapter), "--plot", str(plot))
    assert again.exit_code == 1 and "--force" in again.stderr
    assert run_cli("spectrum", str(small_adapter), "--plot", str(plot), "--force").exit_code == 0


def test_nonfinite_values_are_flagged_not_fatal(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 2)})
    tensors["base_model.model.q_proj.lora_B.weight"][0, 0] = float("nan")
    folder = write_peft(tmp_path / "nan", tensors, r=2)
    result = run_cli("inspect", str(folder), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert "nonfinite" in doc["modules"][0]["flags"]
    assert doc["modules"][0]["singular_values"] == [None, None]
    assert any("NaN or Inf" in w for w in doc["warnings"])


def test_zero_b_is_flagged_untrained(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 2)})
    tensors["base_model.model.q_proj.lora_B.weight"].zero_()
    doc = json.loads(run_cli("inspect", str(write_peft(tmp_path / "z", tensors, r=2)), "--json").stdout)
    row = doc["modules"][0]
    assert "zero_B" in row["flags"] and row["singular_values"] == [0.0, 0.0] and row["effective_rank"] == 0


@pytest.mark.skipif(not example_adapter_path().joinpath("adapter_config.json").exists(),
                    reason="bundled example not built")
def test_no_path_inspects_the_bundled_example() -> None:
    result = run_cli("inspect", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "peft" and doc["num_modules"] == 36
    assert all(m["rank"] == 16 for m in doc["modules"])
    assert all("zero_B" not in m["flags"] for m in doc["modules"])
    # A trained adapter: energy concentrates in fewer than r directions somewhere.
    assert any(m["rank_90"] < 16 for m in doc["modules"])


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from lora_tools.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_python_dash_m_entry_point(small_adapter: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lora_tools", "inspect", str(small_adapter), "--json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["num_modules"] == 3
