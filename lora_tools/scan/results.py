"""The JSONL results of a scan: written as they arrive, sorted once at the end, resumable after an interruption.

While a scan runs, each line is appended (and flushed) to ``OUTPUT.partial`` the moment its adapter finishes, in
completion order. Only when every adapter has a line is ``OUTPUT`` written, sorted by path, atomically (temp file
then rename), and the partial file removed. So whatever stops a scan (Ctrl-C, a kill, a lost machine), ``OUTPUT``
is either absent, the previous complete result, or the new complete result, and the partial file holds every line
finished so far; at worst its last line is cut short, and that line is ignored on ``--resume``.

``--resume`` reads the lines already in ``OUTPUT`` and ``OUTPUT.partial``, skips their adapters, appends the
others to the partial file and writes the sorted ``OUTPUT`` at the end: one line per adapter, whatever happened.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lora_tools.atomic import atomic_path
from lora_tools.errors import InvalidOptionError, OutputExistsError
from lora_tools.jsonsafe import finite_json

logger = logging.getLogger(__name__)


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def dump_line(line: dict[str, Any]) -> str:
    """One strict JSON line (NaN/Inf as null, non-ASCII kept)."""
    return json.dumps(finite_json(line), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class ResultStore:
    """Lines of one scan, kept on disk (``output`` given) or in memory (results to stdout).

    On disk only an index (path -> file, offset, length) stays in memory, so 100,000 adapters of 200 modules
    each cost a few MB here, not the gigabytes of their lines.
    """

    def __init__(self, output: Path | None, wanted: set[str], *, resume: bool = False, force: bool = False):
        self.output = output
        self.wanted = wanted
        self._memory: dict[str, str] = {}
        self._index: dict[str, tuple[Path, int, int]] = {}
        self._handle: IO[bytes] | None = None
        self.resumed = 0
        if output is None:
            if resume:
                raise InvalidOptionError("--resume needs -o/--output: the results file to resume")
            return
        partial = partial_path(output)
        if not resume and output.exists() and not force:
            raise OutputExistsError(f"{output}: already exists; pass --force to overwrite it, or --resume to "
                                    "finish an interrupted scan")
        if output.exists() and output.is_dir():
            raise InvalidOptionError(f"{output}: is a folder; -o names the results file (JSON lines)")
        if resume:
            for source in (output, partial):
                if source.is_file():
                    self._read_existing(source)
            self.resumed = len(self._index)
            self._handle = partial.open("ab")
        else:
            self._handle = partial.open("wb")  # a stale partial file from another scan is not this one's

    @property
    def done(self) -> set[str]:
        return set(self._index) | set(self._memory)

    def _read_existing(self, source: Path) -> None:
        """Index the complete, valid lines of a previous run; a line cut short by the interruption is dropped
        (from the partial file too, so that the next line appended does not glue onto it)."""
        offset = 0
        good_end = 0
        with source.open("rb") as handle:
            for raw in handle:
                length = len(raw)
                if raw.endswith(b"\n"):
                    good_end = offset + length
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        line = None
                    path = line.get("path") if isinstance(line, dict) else None
                    if isinstance(path, str) and path in self.wanted and path not in self._index:
                        self._index[path] = (source, offset, length)
                offset += length
        if source == partial_path(self.output) and good_end < offset:  # type: ignore[arg-type]
            with source.open("r+b") as handle:
                handle.truncate(good_end)

    def add(self, line: dict[str, Any]) -> None:
        """Record one finished adapter (the first line for a path wins; a repeat is dropped)."""
        path = line["path"]
        if path in self._index or path in self._memory:
            logger.warning("%s: a second result for this adapter was dropped", path)
            return
        text = dump_line(line)
        if self._handle is None:
            self._memory[path] = text
            return
        data = (text + "\n").encode("utf-8")
        offset = self._handle.tell()
        self._handle.write(data)
        self._handle.flush()  # on disk (in the OS) before the next adapter: a Ctrl-C loses nothing finished
        self._index[path] = (partial_path(self.output), offset, len(data))  # type: ignore[arg-type]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def lines(self) -> Iterator[str]:
        """Every line, sorted by path (read back from disk one at a time)."""
        if self._handle is not None:
            self._handle.flush()
        if self.output is None:
            for path in sorted(self._memory):
                yield self._memory[path]
            return
        handles: dict[Path, IO[bytes]] = {}
        try:
            for path in sorted(self._index):
                source, offset, length = self._index[path]
                if source not in handles:
                    handles[source] = source.open("rb")
                handles[source].seek(offset)
                yield handles[source].read(length).decode("utf-8").rstrip("\n")
        finally:
            for handle in handles.values():
                handle.close()

    def finish(self) -> None:
        """Write the sorted output atomically, then drop the partial file (results on disk only)."""
        if self.output is None:
            return
        self.close()
        index: dict[str, tuple[Path, int, int]] = {}
        with atomic_path(self.output, force=True) as tmp, tmp.open("wb") as handle:
            for path, text in zip(sorted(self._index), self.lines(), strict=True):
                data = (text + "\n").encode("utf-8")
                index[path] = (self.output, handle.tell(), len(data))
                handle.write(data)
        self._index = index  # lines() now reads the sorted output, the partial file being gone
        partial = partial_path(self.output)
        if partial.exists():
            os.unlink(partial)
