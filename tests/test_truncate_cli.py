"""`loratools truncate`: report on stdout, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_tools.data import example_adapter_path
from lora_tools.formats import load_adapter
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft


@pytest.fixture
def adapter_folder(tmp_path: Path) -> Path:
    return write_peft(tmp_path / "in", lora_tensors({"model.q_proj": (16, 24, 4), "model.v_proj": (8, 24, 4)}))


def test_json_report_and_written_adapter(tmp_path: Path, adapter_folder: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("truncate", str(adapter_folder), "-o", str(out), "--rank", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_modules"] == 2 and report["output_format"] == "peft"
    for row in report["modules"]:
        assert {"name", "old_rank", "new_rank", "retained_energy", "rel_fro_error"} <= set(row)
        assert (row["old_rank"], row["new_rank"]) == (4, 2)
        assert row["rel_fro_error"] == math.sqrt(1 - row["retained_energy"])
    assert report["params_before"] == 2 * 4 * 24 + 4 * (16 + 8)
    assert report["params_after"] == report["params_before"] // 2
    assert report["bytes_after"] < report["bytes_before"]
    assert {m.rank for m in load_adapter(out).modules.values()} == {2}


def test_table_report_and_kohya_output(tmp_path: Path, adapter_folder: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = run_cli("truncate", str(adapter_folder), "-o", str(out), "--method", "sv_cumulative",
                     "--threshold", "0.5", "--to", "kohya", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "model.q_proj" in result.stdout and "retained energy" in result.stdout
    written = load_adapter(out)
    assert written.format == "kohya"
    assert {m.a_info.dtype for m in written.modules.values()} == {"F16"}


def test_avg_rank_spends_the_budget_of_that_rank(tmp_path: Path, adapter_folder: Path) -> None:
    result = run_cli("truncate", str(adapter_folder), "-o", str(tmp_path / "out"), "--avg-rank", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params_after"] <= 2 * (24 + 16) + 2 * (24 + 8)


@pytest.mark.skipif(not (example_adapter_path() / "adapter_config.json").exists(),
                    reason="bundled example adapter not present")
def test_bundled_example_truncates_to_rank_4(tmp_path: Path) -> None:
    result = run_cli("truncate", "-o", str(tmp_path / "out"), "--rank", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert {m.rank for m in load_adapter(tmp_path / "out").modules.values()} == {4}


@pytest.mark.parametrize(("args", "fragment"), [
    (["--rank", "0"], "--rank"), (["--rank", "-3"], "--rank"), (["--rank", "2.5"], "--rank"),
    (["--rank", "x"], "--rank"), (["--energy", "0"], "--energy"), (["--energy", "1.01"], "--energy"),
    (["--energy", "nan"], "--energy"), (["--method", "sv_fro"], "--threshold"),
    (["--threshold", "0.5"], "--method"), (["--rank", "2", "--energy", "0.5"], "--rank and --energy"),
    (["--rank", "2", "--avg-rank", "2"], "--avg-rank"), ([], "--rank K"),
    (["--method", "sv_ratio", "--threshold", "0.5"], "sv_ratio"), (["--avg-rank", "1.5"], "--avg-rank"),
])
def test_bad_options_give_one_line_and_write_nothing(tmp_path: Path, adapter_folder: Path, args: list[str],
                                                     fragment: str) -> None:
    out = tmp_path / "out"
    result = run_cli("truncate", str(adapter_folder), "-o", str(out), *args)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_output_guards(tmp_path: Path, adapter_folder: Path) -> None:
    before = {p.name: p.read_bytes() for p in adapter_folder.iterdir()}
    assert_one_line_error(run_cli("truncate", str(adapter_folder), "-o", str(adapter_folder), "--rank", "2",
                                  "--force"), "input")
    assert_one_line_error(run_cli("truncate", str(adapter_folder), "-o", str(tmp_path / "no" / "such"),
                                  "--rank", "2"), "does not exist")
    existing = tmp_path / "existing"
    existing.mkdir()
    assert_one_line_error(run_cli("truncate", str(adapter_folder), "-o", str(existing), "--rank", "2"), "--force")
    assert list(existing.iterdir()) == []
    assert run_cli("truncate", str(adapter_folder), "-o", str(existing), "--rank", "2", "--force").exit_code == 0
    assert (existing / "adapter_config.json").exists()
    assert {p.name: p.read_bytes() for p in adapter_folder.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nonfinite_weights(tmp_path: Path) -> None:
    tensors = lora_tensors({"model.q_proj": (8, 8, 4)})
    tensors["base_model.model.model.q_proj.lora_A.weight"][1, 2] = float("inf")
    folder = write_peft(tmp_path / "in", tensors)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("truncate", str(folder), "-o", str(out), "--rank", "2"), "--allow-nonfinite")
    assert not out.exists()
    result = run_cli("truncate", str(folder), "-o", str(out), "--rank", "2", "--allow-nonfinite", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["modules"][0]
    assert row["new_rank"] == 4 and row["retained_energy"] is None
    assert torch.isinf(load_adapter(out).factors("model.q_proj")[1]).any()


def test_conv1d_to_kohya_is_refused_cleanly(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "in", lora_tensors({"transformer.h.0.attn.c_attn": (24, 8, 4)}),
                        fan_in_fan_out=True, target_modules=["c_attn"])
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("truncate", str(folder), "-o", str(out), "--rank", "2", "--to", "kohya"),
                          "--to peft")
    assert not out.exists()


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    """Temporary files are created 0600; the finished output must not stay private by accident."""
    import os
    import stat


    source = write_peft(tmp_path / "in", lora_tensors({"q_proj": (8, 8, 4)}))
    out = tmp_path / "out"
    result = run_cli("truncate", str(source), "-o", str(out), "--rank", "2")
    assert result.exit_code == 0, result.output
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~mask


def test_zero_update_is_flagged(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 4), "v_proj": (8, 8, 4)})
    tensors["base_model.model.q_proj.lora_B.weight"].zero_()
    source = write_peft(tmp_path / "in", tensors)
    result = run_cli("truncate", str(source), "-o", str(tmp_path / "out"), "--energy", "0.9", "--json")
    assert result.exit_code == 0, result.output
    rows = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    assert rows["q_proj"]["flags"] == ["zero_update"] and rows["q_proj"]["new_rank"] == 1
    assert rows["v_proj"]["flags"] == []
