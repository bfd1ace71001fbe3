"""Which adapters a scan reads: PATH arguments (folders, globs, list files, ``-``, Hub ids) -> sorted tasks.

Rules, in the order they are tried for each argument:

* ``-``: one reference per line from stdin (blank lines and ``#`` comments skipped);
* an existing folder: searched recursively. A folder holding ``adapter_config.json`` is one (PEFT) adapter and is
  not searched further; elsewhere every file with a weights suffix (``.safetensors``, ``.bin``, ...) is one
  adapter candidate. Symbolic links are followed, but a folder already visited (same device and inode) is not
  entered again, so a link loop ends;
* an existing file with a weights suffix, or any file that is not plain text: one adapter candidate (a file that
  is not an adapter becomes an error line, with the message ``inspect`` gives);
* any other existing file: a list of references, one per line, each handled like a PATH argument;
* a pattern with ``*``, ``?`` or ``[``: expanded (``**`` crosses folders), each match handled as above;
* a Hub id ``org/name[@rev][:subfolder]``: resolved in the local Hugging Face cache only; an id that is not cached
  is an error line.

Anything else is an error line too ("no such file or directory"), never the end of the scan.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

from lora_tools.errors import InvalidOptionError, LoraToolsError

CONFIG_NAME = "adapter_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ScanTask:
    """One adapter to scan. ``path`` is the name in the results (and their sort key); ``source`` is what is read
    (the cached snapshot for a Hub id); ``relative`` is where a right-sized copy goes under ``--out-dir``."""

    path: str
    source: str
    relative: str
    error: str | None = None  # known before reading (a Hub id not in the cache)


@dataclass
class Discovery:
    tasks: list[ScanTask]
    list_files: list[Path]  # files read as lists of references (an output must not overwrite them)
    roots: list[Path]  # folders searched


def discover(arguments: Iterable[str], stdin: TextIO | None = None) -> Discovery:
    """Expand PATH arguments into scan tasks, one per distinct path, sorted by path."""
    found = Discovery([], [], [])
    seen_lists: set[Path] = set()
    for argument in arguments:
        _expand(str(argument), found, seen_lists, stdin if stdin is not None else sys.stdin, depth=0)
    unique = {task.path: task for task in reversed(found.tasks)}  # the first mention of a path wins
    found.tasks = sorted(unique.values(), key=lambda task: task.path)
    return found


def _expand(reference: str, found: Discovery, seen_lists: set[Path], stdin: TextIO, depth: int) -> None:
    if depth > 8:  # a list naming a list naming a list ...: a cycle the resolved-path check missed
        raise InvalidOptionError(f"{reference}: lists of paths nested more than 8 deep")
    if reference == "-":
        if depth > 0:
            raise InvalidOptionError("'-' (stdin) can only be given on the command line, not inside a list file")
        for line in _references(stdin):
            _expand(line, found, seen_lists, stdin, depth + 1)
        return
    path = Path(reference)
    if path.is_dir():
        found.roots.append(path)
        found.tasks.extend(_walk(path))
        return
    if path.exists() or path.is_symlink():
        if _is_adapter_file(path):
            found.tasks.append(ScanTask(str(path), str(path), _relative(path)))
            return
        try:
            key = path.resolve()
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
            key = Path(os.path.abspath(path))
        if key in seen_lists:
            return
        seen_lists.add(key)
        found.list_files.append(path)
        try:
            with path.open(encoding="utf-8") as handle:
                lines = list(_references(handle))
        except OSError as exc:
            raise InvalidOptionError(f"{path}: cannot read the list of paths: {exc.strerror or exc}") from None
        for line in lines:
            _expand(line, found, seen_lists, stdin, depth + 1)
        return
    if _GLOB_CHARS & set(reference):
        for match in sorted(glob.glob(reference, recursive=True)):
            if Path(match).is_dir():
                found.roots.append(Path(match))
                found.tasks.extend(_walk(Path(match)))
            else:
                found.tasks.append(ScanTask(match, match, _relative(Path(match))))
        return
    found.tasks.append(_hub_task(reference))


def _hub_task(reference: str) -> ScanTask:
    """A Hub id from the local cache, or an error line (not cached, or not a path nor an id at all)."""
    from lora_tools.model.resolve import parse_hub_reference, resolve_adapter_reference

    hub = parse_hub_reference(reference)
    if hub is None:
        return ScanTask(reference, reference, _relative(Path(reference)), f"{reference}: no such file or directory")
    relative = str(PurePosixPath(hub.repo_id, hub.subfolder or ""))
    try:
        source = resolve_adapter_reference(Path(reference))
    except LoraToolsError as exc:
        return ScanTask(reference, reference, relative, " ".join(str(exc).split()))
    return ScanTask(reference, str(source), relative)


def _references(handle: TextIO) -> Iterator[str]:
    for line in handle:
        text = line.strip()
        if text and not text.startswith("#"):
            yield text


def _is_adapter_file(path: Path) -> bool:
    """A weights file, a PEFT config (its folder is the adapter) or anything binary: an adapter candidate.
    Only a plain-text file without a weights suffix is read as a list of paths."""
    if path.suffix.lower() in WEIGHT_SUFFIXES or path.name == CONFIG_NAME:
        return True
    try:
        if not path.is_file():
            return True  # a fifo, socket or broken link: the scan reports it, without blocking on it
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return True  # unreadable: the scan's error line says why, in inspect's words
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a multibyte character cut at the 4 KiB boundary
            return True
    return b"\0" in head


def _walk(root: Path) -> Iterator[ScanTask]:
    """Adapter candidates under ``root``, following links but entering each real folder once."""
    visited: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError:
            continue  # a dangling link to a folder: nothing to enter
        if (info.st_dev, info.st_ino) in visited:
            continue  # a link loop, or the same folder reached twice: enter it once
        visited.add((info.st_dev, info.st_ino))
        if (folder / CONFIG_NAME).is_file():
            yield ScanTask(str(folder), str(folder), _relative_to(folder, root))
            continue
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:  # an unreadable folder: one error line, the rest of the tree goes on
            message = f"{folder}: cannot list folder: {exc.strerror or exc}"
            yield ScanTask(str(folder), str(folder), _relative_to(folder, root), message)
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if _entry_is_dir(entry):
                subfolders.append(path)
            elif path.suffix.lower() in WEIGHT_SUFFIXES:
                yield ScanTask(str(path), str(path), _relative_to(path, root))
        stack.extend(reversed(subfolders))


def _entry_is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # ELOOP on a link to itself: not a folder we can enter
        return False


def _relative_to(path: Path, root: Path) -> str:
    """Where ``path`` goes under --out-dir: its place below the searched folder, under that folder's name."""
    name = root.resolve().name or "root"
    return str(PurePosixPath(name, *path.relative_to(root).parts))


def _relative(path: Path) -> str:
    """A file named directly (or by a list or glob): its path as given when that stays below the current folder,
    else the absolute path without its anchor."""
    if not path.is_absolute() and ".." not in path.parts:
        return str(PurePosixPath(*path.parts))
    absolute = Path(os.path.abspath(path))
    return str(PurePosixPath(*absolute.parts[1:]))
