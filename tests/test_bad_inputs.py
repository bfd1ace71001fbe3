"""Bad input: one `error: ...` line naming the file and the problem, exit 1, no traceback, nothing written."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_one_line_error, lora_tensors, raw_safetensors, run_cli, write_peft


def valid_header() -> dict:
    return {"a.lora_down.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
            "a.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}


def test_nonexistent_path(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("inspect", str(tmp_path / "missing")), "missing", "no such file")


def test_directory_without_adapter_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    assert_one_line_error(run_cli("inspect", str(tmp_path)), str(tmp_path), "no adapter files")


def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "no adapter weights")


def test_empty_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_one_line_error(run_cli("inspect", str(path)), "empty.safetensors", "empty file")


@pytest.mark.parametrize("cut", [4, 20, -10])
def test_truncated_safetensors(tmp_path: Path, cut: int) -> None:
    """Cut inside the length field, inside the header, and inside the data."""
    whole = raw_safetensors(tmp_path / "whole.safetensors", valid_header(), bytes(64)).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:cut])
    assert_one_line_error(run_cli("inspect", str(path)), "cut.safetensors")


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "long.safetensors", valid_header(), bytes(64), header_len=10_000)
    assert_one_line_error(run_cli("inspect", str(path)), "long.safetensors", "larger than the file")


def test_header_not_json(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "x.safetensors", b"{not json", b"")
    assert_one_line_error(run_cli("inspect", str(path)), "x.safetensors", "not valid JSON")


def test_header_lies_about_sizes(tmp_path: Path) -> None:
    header = valid_header()
    header["a.lora_up.weight"]["shape"] = [4, 3]  # 48 bytes, offsets cover 32
    path = raw_safetensors(tmp_path / "lie.safetensors", header, bytes(64))
    assert_one_line_error(run_cli("inspect", str(path)), "lie.safetensors", "a.lora_up.weight", "needs 48 bytes")


def test_offsets_outside_the_data(tmp_path: Path) -> None:
    header = valid_header()
    header["a.lora_up.weight"]["data_offsets"] = [32, 96]
    header["a.lora_up.weight"]["shape"] = [8, 2]
    path = raw_safetensors(tmp_path / "out.safetensors", header, bytes(64))
    assert_one_line_error(run_cli("inspect", str(path)), "out.safetensors", "outside the data")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = valid_header()
    header["a.lora_up.weight"]["data_offsets"] = [16, 48]
    path = raw_safetensors(tmp_path / "overlap.safetensors", header, bytes(64))
    assert_one_line_error(run_cli("inspect", str(path)), "overlap.safetensors", "overlap")


def test_lfs_pointer(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "adapter_model.safetensors", "Git LFS pointer")


def test_factors_that_do_not_chain(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 4)})
    tensors["base_model.model.q_proj.lora_B.weight"] = torch.zeros(8, 3)
    folder = write_peft(tmp_path / "a", tensors)
    assert_one_line_error(run_cli("inspect", str(folder)), "adapter_model.safetensors", "q_proj", "do not chain")


def test_config_rank_differs_from_tensor_rank(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}), r=8)
    assert_one_line_error(run_cli("inspect", str(folder)), "q_proj", "rank 8", "rank 4")


def test_factor_on_one_side_only(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 4)})
    del tensors["base_model.model.q_proj.lora_B.weight"]
    folder = write_peft(tmp_path / "a", tensors)
    assert_one_line_error(run_cli("inspect", str(folder)), "q_proj", "no B factor")


@pytest.mark.parametrize("r", [0, -2, "four", 2.5, True])
def test_bad_rank_in_config(tmp_path: Path, r: object) -> None:
    folder = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}), r=r)
    assert_one_line_error(run_cli("inspect", str(folder)), "adapter_config.json", "r must be a positive integer")


def test_non_numeric_alpha(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}), lora_alpha="big")
    assert_one_line_error(run_cli("inspect", str(folder)), "lora_alpha must be a finite number")


def test_missing_alpha_uses_peft_default(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}))
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    doc = json.loads(run_cli("inspect", str(folder), "--json").stdout)
    assert doc["modules"][0]["alpha"] == 8 and doc["modules"][0]["scale"] == 2.0
    assert any("lora_alpha missing" in w for w in doc["warnings"])


def test_config_not_json(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}))
    (folder / "adapter_config.json").write_text("{oops")
    assert_one_line_error(run_cli("inspect", str(folder)), "adapter_config.json", "not valid JSON")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_non_float_factors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 4)})
    tensors["base_model.model.q_proj.lora_A.weight"] = torch.ones(4, 8).to(dtype)
    folder = write_peft(tmp_path / "a", tensors)
    assert_one_line_error(run_cli("inspect", str(folder)), "q_proj", "floating point")


def test_one_dimensional_factor(tmp_path: Path) -> None:
    tensors = lora_tensors({"q_proj": (8, 8, 4)})
    tensors["base_model.model.q_proj.lora_A.weight"] = torch.ones(32)
    folder = write_peft(tmp_path / "a", tensors)
    assert_one_line_error(run_cli("inspect", str(folder)), "q_proj", "1-D")


def test_unknown_peft_type(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", lora_tensors({"q_proj": (8, 8, 4)}), peft_type="MYSTERY")
    assert_one_line_error(run_cli("inspect", str(folder)), "peft_type is 'MYSTERY'")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does on load
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({"base_model.model.q.lora_A.weight": torch.ones(4, 4), "x": _Exploit(marker)},
               folder / "adapter_model.bin")
    assert_one_line_error(run_cli("inspect", str(folder)), "adapter_model.bin", "unsafe pickle")
    assert not marker.exists()


def test_pickle_of_non_tensor_objects(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"a": object}))
    assert_one_line_error(run_cli("inspect", str(path)), "weights.bin")


def test_traceback_with_debug(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / "missing"), env={"LORATOOLS_DEBUG": "1"})
    assert result.exit_code != 0 and result.exception is not None


def test_usage_errors_keep_click_status(tmp_path: Path) -> None:
    assert run_cli("inspect", "--sort", "bogus").exit_code == 2
