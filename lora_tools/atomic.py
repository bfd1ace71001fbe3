"""Atomic outputs: write to a temporary file beside the target, then ``os.replace`` it into place.

A crash or an exception half-way leaves the target as it was (absent, or the old file), never a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_tools.errors import LoraToolsError, OutputExistsError


def check_output(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an existing output without ``force`` and an output that is one of the inputs."""
    for source in inputs:
        if path.exists() and source.exists() and path.resolve() == source.resolve():
            raise LoraToolsError(f"{path}: output is the same as the input; choose another output path")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LoraToolsError(f"{path}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LoraToolsError(f"{path}: output folder {parent} is not writable")


@contextlib.contextmanager
def atomic_path(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` atomically."""
    check_output(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
