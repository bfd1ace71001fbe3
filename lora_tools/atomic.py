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
    if parent.exists() and not parent.is_dir():
        raise LoraToolsError(f"{path}: output folder {parent} is a file, not a folder")
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
        with _named_as_target(tmp, path):
            yield tmp
            _default_permissions(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _named_as_target(tmp: Path, path: Path) -> Iterator[None]:
    """Errors raised while writing name the output the user asked for, never the hidden temporary file or folder
    (``.out.safetensors.k3j2.tmp`` means nothing to a user and is gone by the time they look)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            exc.filename = hide_temp_name(str(exc.filename), tmp, path)
        if exc.filename2 is not None:
            exc.filename2 = hide_temp_name(str(exc.filename2), tmp, path)
        raise
    except LoraToolsError as exc:
        message = str(exc)
        if str(tmp) in message or tmp.name in message:
            raise type(exc)(hide_temp_name(message, tmp, path)) from exc
        raise


def hide_temp_name(text: str, tmp: Path, path: Path) -> str:
    """``text`` with the temporary path (or its bare name) replaced by the target's."""
    return text.replace(str(tmp), str(path)).replace(tmp.name, path.name)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give outputs the permissions a plain open() would."""
    mask = _current_umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def check_not_input(path: Path, inputs: tuple[Path, ...]) -> None:
    """Refuse an output that is an input, or a folder holding one (overwriting it would destroy the input)."""
    target = path.resolve()
    for source in inputs:
        if not source.exists():
            continue
        resolved = source.resolve()
        if resolved == target or target in resolved.parents:
            raise LoraToolsError(f"{path}: output would overwrite the input {source}; choose another output path")


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes ``path``'s place (``move_into_place``).

    On any exception the temporary folder is removed and ``path`` is left as it was.
    """
    import shutil

    check_output(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _named_as_target(tmp, path):
            yield tmp
            _default_permissions(tmp)
            move_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(staged: Path, path: Path) -> None:
    """Put a finished file or folder ``staged`` (in ``path``'s folder) at ``path``, replacing what is there.

    A folder cannot be swapped in one rename over an existing entry, so the old one is renamed aside first and
    removed only after the new one is in place; if the second rename fails the old one is put back.
    """
    import shutil

    if staged.is_file() and not (path.is_dir() and not path.is_symlink()):
        os.replace(staged, path)
        return
    old: Path | None = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        old.rmdir()
        os.replace(path, old)
    try:
        os.replace(staged, path)
    except OSError:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
