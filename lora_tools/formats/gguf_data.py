"""The data section of a GGUF LoRA: stored factor bytes copied in large runs, other tensors encoded one by one,
the writes done on a thread of their own while the next bytes are read and checked.

Most factors of a LoRA go into a GGUF unchanged (same float type, no reordering, no baked scale). Those are copied
straight from the input file: tensors that lie back to back in the input and in the output form one run, read in
CHUNK-sized pieces into a few reused buffers, checked for NaN/Inf there and handed to the writer. Reusing buffers
that fit in the CPU's last-level cache keeps the check off main memory and avoids the page faults of fresh
allocations, which on a virtual machine cost more than the copy itself. Tensors that change (q/k rows reordered,
a scale baked in, a cast, a quantization) are produced by ``encode`` one at a time and handed to ``check``, which
decodes exactly those bytes and compares them with the input before they are written. Nothing is read back from
the output: the bytes written are the ones checked (or the input's stored bytes, unchanged), so a read-back would
only test the operating system's write(2); what the code could get wrong about where they go (where each tensor
starts, how long it is) the caller checks by parsing the header back and comparing the file's size with the
layout.

The writer thread only ever appends, in the order the tensors were handed over; write(2), the reads and the
vectorised checks release the GIL, so on two cores the write (new page-cache pages, the largest cost) overlaps
the reading and checking of the next pieces.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.errors import AdapterFormatError, ModuleMismatchError
from lora_tools.formats.gguf_layout import TensorEntry, padded

CHUNK = 2 << 20  # bytes per piece of a copied run (2 MiB: measured a little faster than 1 or 4 here)


@dataclass
class TensorJob:
    """One tensor to write: ``copy`` = (offset, bytes) of its stored data in the input file when it is written
    unchanged (``dtype``: that data's float type, for the NaN/Inf check), else None (``encode`` makes its bytes);
    ``heads`` and ``transposed``: how its values are laid out differently from the adapter's factor."""

    entry: TensorEntry
    module: str
    role: str  # "lora_a" | "lora_b"
    copy: tuple[int, int] | None = None
    dtype: str = "F32"
    stored: tuple[int, int] | None = None  # (offset, bytes) of the factor it is made from, when in the input file
    heads: int = 0  # B rows in llama.cpp's rotary order for this many heads
    transposed: bool = False  # token_embd's lora_a holds A transposed


def _runs(jobs: list[TensorJob]) -> list[list[TensorJob]]:
    """Consecutive jobs whose bytes are one contiguous range in the input and in the output (no padding between
    them, same float type); a job that is not a copy is a run of its own."""
    runs: list[list[TensorJob]] = []
    for job in jobs:
        last = runs[-1][-1] if runs else None
        if (job.copy is not None and last is not None and last.copy is not None and last.dtype == job.dtype
                and last.copy[0] + last.copy[1] == job.copy[0] and last.entry.nbytes == padded(last.entry.nbytes)):
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def _finite(piece: Any, dtype: str) -> bool:
    """No NaN/Inf among the values of a byte buffer (see finite_values)."""
    import torch

    from lora_tools.tensorfile import torch_dtype

    return finite_values(torch.from_numpy(piece).view(torch_dtype(dtype))) if len(piece) else True


def finite_values(values: Any) -> bool:
    """No NaN/Inf in a tensor. A finite sum proves it (NaN and Inf propagate through a sum); only when the sum is
    not finite, which large finite values can also cause (an fp16 sum overflows at 65504), is every value looked
    at. The sum in the tensor's own type is one vectorised pass: on fp16, 2x faster than a float32 sum or
    aminmax and 13x faster than a float64 sum."""
    import torch

    if bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


def same_bytes(x: Any, y: Any) -> bool:
    """Two flat uint8 arrays hold the same bytes."""
    import numpy as np

    if len(x) % 8 == 0:  # eight bytes per comparison: an 8x smaller temporary than a byte-wise one
        return bool(np.array_equal(x.view(np.uint64), y.view(np.uint64)))
    return bool(np.array_equal(x, y))


class _Writer:
    """Appends to an open file on a thread of its own, in the order the pieces are handed over (``submit``).

    ``release()`` runs once a piece is written (also after an error), so the buffer it came from can be reused.
    The first error stops the writing; ``submit`` and ``close`` raise it in the calling thread."""

    DEPTH = 8  # pieces waiting to be written, at most

    def __init__(self, fd: int, position: int, path: Path):
        self.fd, self.position, self.path = fd, position, path
        self.error: BaseException | None = None
        self._tasks: queue.Queue[Any] = queue.Queue(self.DEPTH)
        self._thread = threading.Thread(target=self._run, name="gguf-writer", daemon=True)
        self._thread.start()

    def submit(self, data: Any, release: Callable[[], None] | None = None) -> None:
        if self.error is not None:
            if release is not None:
                release()
            raise self.error
        self._tasks.put((data, release))

    def pad(self, nbytes: int) -> None:
        if padded(nbytes) > nbytes:
            self.submit(bytes(padded(nbytes) - nbytes))

    def close(self, raise_error: bool = True) -> int:
        """Wait for every piece to be written; return the end of the file (raise the writer's error)."""
        self._tasks.put(None)
        self._thread.join()
        if raise_error and self.error is not None:
            raise self.error
        return self.position

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            data, release = task
            try:
                if self.error is None:
                    self._append(data)
            except BaseException as exc:  # re-raised in the calling thread
                self.error = exc
            finally:
                if release is not None:
                    release()

    def _append(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.position += len(view)


def write_tensors(fd: int, position: int, path: Path, jobs: list[TensorJob], source_path: Path | None,
                  encode: Callable[[TensorJob, Any], tuple[Any, Any]], check_finite: bool, where: Path,
                  check: Callable[[TensorJob, Any, Any], None] | None = None) -> int:
    """Write the jobs' data at ``position`` (the end of the header) of the open file ``fd``; return the end.
    ``source_path``: the input file the copies come from; ``encode(job, raw)``: (the bytes of a job that is not a
    copy, a uint8 array of ``job.entry.nbytes`` whose values are already checked; the factor they were made from),
    ``raw`` the stored bytes of that factor when ``job.stored`` says where they are, else None;
    ``check(job, factor, bytes)``: called with each such job's encoded bytes before they are written; ``where``:
    the input, for messages."""
    import numpy as np

    free: queue.Queue[Any] = queue.Queue()  # copy buffers not in the writer's hands
    for _ in range(_Writer.DEPTH // 2):
        free.put(np.empty(CHUNK, dtype=np.uint8))
    source = os.open(source_path, os.O_RDONLY) if source_path is not None and any(
        j.copy or j.stored for j in jobs) else None
    out = _Writer(fd, position, path)
    try:
        for run in _runs(jobs):
            if run[0].copy is None:
                job = run[0]
                raw = None
                if job.stored is not None and source is not None:  # one positioned read, no open per tensor
                    raw = np.empty(job.stored[1], dtype=np.uint8)
                    if os.preadv(source, [raw], job.stored[0]) != len(raw):
                        raise AdapterFormatError(f"{where}: cut short while converting (file changed or truncated)")
                data, factor = encode(job, raw)
                if len(data) != job.entry.nbytes:
                    raise ModuleMismatchError(f"{where}: {job.entry.name}: {len(data)} bytes encoded for a "
                                              f"{job.entry.nbytes}-byte tensor")
                if check is not None:  # decoded and compared with the input here, while earlier pieces are written
                    check(job, factor, data)
                out.submit(data)
                out.pad(job.entry.nbytes)
                continue
            start, end = run[0].copy[0], run[-1].copy[0] + run[-1].copy[1]  # type: ignore[index]
            for offset in range(start, end, CHUNK):
                buffer = free.get()  # waits while every buffer is queued for writing
                piece = buffer[:min(CHUNK, end - offset)]
                if os.preadv(source, [piece], offset) != len(piece):  # type: ignore[arg-type]
                    raise AdapterFormatError(f"{where}: cut short while converting (file changed or truncated)")
                if check_finite and not _finite(piece, run[0].dtype):
                    raise ModuleMismatchError(f"{where}: module {_module_at(run, offset, piece)}: LoRA factors "
                                              "contain NaN or Inf; refusing to convert (pass --allow-nonfinite to "
                                              "copy them unchanged)")
                out.submit(piece, release=functools.partial(free.put, buffer))
            out.pad(run[-1].entry.nbytes)
    except BaseException:
        out.close(raise_error=False)
        raise
    finally:
        if source is not None:
            os.close(source)
    return out.close()


def _module_at(run: list[TensorJob], offset: int, piece: Any) -> str:
    """The first module of a run with a NaN/Inf among its bytes in ``piece`` (read from ``offset``)."""
    for job in run:
        begin, size = job.copy  # type: ignore[misc]
        low, high = max(begin, offset) - offset, min(begin + size, offset + len(piece)) - offset
        if low < high and not _finite(piece[low:high], job.dtype):
            return job.module
    return run[0].module
