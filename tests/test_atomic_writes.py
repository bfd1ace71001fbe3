"""Every writing command is atomic and leaves its inputs alone.

For each one, the writer is made to fail half-way (part of the file written, then "No space left on device"):
the command must exit 1 with one error line, leave no OUT and no temporary file, and every input must be byte
for byte what it was (sha256). A successful run must not touch the inputs either.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import lora_tensors, run_cli, write_peft

MODULE = "model.q_proj"


def _inputs(folder: Path) -> dict[str, Path]:
    """Two adapters, a one-file base model and a fine-tuned copy of it, all under ``folder``."""
    folder.mkdir()
    first = write_peft(folder / "a", lora_tensors({MODULE: (8, 6, 2)}, seed=1), r=2, lora_alpha=4)
    second = write_peft(folder / "b", lora_tensors({MODULE: (8, 6, 2)}, seed=2), r=2, lora_alpha=4)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, generator=gen)
    save_file({f"{MODULE}.weight": weight, "model.norm.weight": torch.ones(6)}, str(folder / "base.safetensors"))
    save_file({f"{MODULE}.weight": weight + 0.1 * torch.randn(8, 6, generator=gen),
               "model.norm.weight": torch.ones(6)}, str(folder / "ft.safetensors"))
    return {"a": first, "b": second, "base": folder / "base.safetensors", "ft": folder / "ft.safetensors"}


# command -> (arguments given the inputs and the output path, output name, what the injection breaks)
COMMANDS: dict[str, tuple[Callable[[dict[str, Path], Path], list[str]], str, str]] = {
    "truncate": (lambda i, o: ["truncate", str(i["a"]), "-o", str(o), "--rank", "1"], "out", "safetensors"),
    "truncate-kohya": (lambda i, o: ["truncate", str(i["a"]), "-o", str(o), "--rank", "1", "--to", "kohya"],
                       "out.safetensors", "safetensors"),
    "merge": (lambda i, o: ["merge", str(i["a"]), str(i["b"]), "-o", str(o), "--method", "svd"], "out",
              "safetensors"),
    "convert": (lambda i, o: ["convert", str(i["a"]), "-o", str(o), "--to", "kohya"], "out.safetensors",
                "safetensors"),
    "fold": (lambda i, o: ["fold", str(i["a"]), "--base", str(i["base"]), "-o", str(o)], "out.safetensors",
             "safetensors"),
    "extract": (lambda i, o: ["extract", "--base", str(i["base"]), "--finetuned", str(i["ft"]), "-o", str(o),
                              "--rank", "2"], "out", "safetensors"),
    "spectrum-plot": (lambda i, o: ["spectrum", str(i["a"]), "--plot", str(o)], "plot.png", "png"),
    "similarity-plot": (lambda i, o: ["similarity", str(i["a"]), str(i["b"]), "--plot", str(o)], "plot.png",
                        "png"),
    "compare-quant-report": (lambda i, o: ["compare-quant", str(i["a"]), "--calib", "random", "--max-tokens",
                                           "64", "--device", "cpu", "--report", str(o)], "report", "png"),
}


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _half_then_fail(write: Callable[[Path], None]) -> Callable[[Path], None]:
    """Run the real writer into a scratch file, copy half of its bytes to the target, then fail like a full disk."""
    def broken(target: Path) -> None:
        scratch = Path(f"{target}.scratch")
        write(scratch)
        data = scratch.read_bytes()
        scratch.unlink()
        Path(target).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    return broken


def _inject(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    if what == "safetensors":
        import safetensors.torch

        real = safetensors.torch.save_file

        def save_file_fails(tensors, filename, metadata=None):  # noqa: ANN001, ANN202 - save_file's signature
            _half_then_fail(lambda p: real(tensors, str(p), metadata=metadata))(Path(filename))

        monkeypatch.setattr(safetensors.torch, "save_file", save_file_fails)
    else:
        from matplotlib.figure import Figure

        real_savefig = Figure.savefig

        def savefig_fails(self, fname, *args, **kwargs):  # noqa: ANN001, ANN202 - savefig's signature
            _half_then_fail(lambda p: real_savefig(self, p, *args, **kwargs))(Path(fname))

        monkeypatch.setattr(Figure, "savefig", savefig_fails)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_failure_half_way_leaves_no_output_and_the_inputs_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                command: str) -> None:
    build, out_name, what = COMMANDS[command]
    inputs = _inputs(tmp_path / "in")
    before = _digests(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / out_name
    _inject(monkeypatch, what)
    result = run_cli(*build(inputs, out))
    assert result.exit_code == 1, result.output
    # compare-quant --calib random adds a `note:` line before the error; anything else is one error line
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0], lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no OUT, no .out.*.tmp, no staging folder
    assert _digests(tmp_path / "in") == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_success_leaves_the_inputs_intact(tmp_path: Path, command: str) -> None:
    build, out_name, _ = COMMANDS[command]
    inputs = _inputs(tmp_path / "in")
    before = _digests(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / out_name
    result = run_cli(*build(inputs, out))
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert _digests(tmp_path / "in") == before
