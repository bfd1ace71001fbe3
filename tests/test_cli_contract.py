"""The contract every command keeps with scripts and shells: output names that match the format, a JSON error
object with --json, quiet exit on a closed pipe, no temporary file names in messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import lora_tensors, run_cli, write_peft

MODULE = "model.q_proj"


def _adapter(tmp: Path) -> Path:
    return write_peft(tmp / "in", lora_tensors({MODULE: (8, 6, 2)}), r=2, lora_alpha=4)


def test_file_format_without_suffix_gets_safetensors_and_says_so(tmp_path: Path) -> None:
    result = run_cli("truncate", str(_adapter(tmp_path)), "-o", str(tmp_path / "small"), "--to", "kohya",
                     "--rank", "1", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "small.safetensors").is_file()
    assert not (tmp_path / "small").exists()
    assert "small.safetensors" in result.stderr
    assert json.loads(result.stdout)["output"].endswith("small.safetensors")


def test_convert_to_file_format_without_suffix(tmp_path: Path) -> None:
    result = run_cli("convert", str(_adapter(tmp_path)), "-o", str(tmp_path / "k"), "--to", "diffusers", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k.safetensors").is_file() and not (tmp_path / "k").exists()


def test_save_adapter_library_call_returns_the_real_path(tmp_path: Path) -> None:
    from lora_tools import load_adapter, save_adapter
    from lora_tools.errors import InvalidOptionError

    adapter = load_adapter(_adapter(tmp_path))
    written = save_adapter(adapter, tmp_path / "plain", "kohya")
    assert written == tmp_path / "plain.safetensors" and written.is_file()
    with pytest.raises(InvalidOptionError, match="is a folder"):
        save_adapter(adapter, tmp_path / "p.safetensors", "peft")
    assert not (tmp_path / "p.safetensors").exists()


def test_json_failure_prints_a_json_error_object_on_stdout(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / "missing"), "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert "missing" in document["error"] and document["exit_status"] == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "error: " + document["error"]


def test_without_json_stdout_stays_empty_on_failure(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / "missing"))
    assert result.exit_code == 1 and result.stdout == ""


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`loratools inspect --json | head -0`: the reader is gone before anything is written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_tools", "inspect", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Broken pipe" not in stderr and "Traceback" not in stderr and "error" not in stderr, stderr


def test_write_errors_name_the_output_not_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lora_tools.formats.kohya as kohya

    def no_space(tensors: object, path: Path, metadata: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(kohya, "write_safetensors", no_space)
    out = tmp_path / "out.safetensors"
    result = run_cli("truncate", str(_adapter(tmp_path)), "-o", str(out), "--to", "kohya", "--rank", "1")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(out) in line and ".tmp" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_every_reader_can_be_chosen_with_format() -> None:
    from lora_tools.cli._common import INPUT_FORMATS
    from lora_tools.formats import FORMATS

    assert sorted(INPUT_FORMATS) == sorted(FORMATS)
