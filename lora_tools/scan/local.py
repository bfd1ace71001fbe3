"""Run a scan's per-adapter function on a local process pool, surviving killed workers.

A worker that dies (killed, out of memory, a crash in native code) breaks a ``ProcessPoolExecutor``: every
future still in flight fails with ``BrokenProcessPool``. The results that did arrive are kept; the tasks that
were in flight become suspects and are rerun one at a time on a fresh pool, so an innocent task finishes and a
task that kills its worker again, alone, is an error line. No task is lost, and none is reported twice: a result
is accepted only for a task index that has none yet.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from lora_tools.scan.discover import ScanTask
from lora_tools.scan.worker import ScanOptions, error_line, error_message, scan_adapter, worker_init

logger = logging.getLogger(__name__)

ScanFunction = Callable[[ScanTask, ScanOptions], dict[str, Any]]
ResultCallback = Callable[[int, dict[str, Any]], None]
# Tasks queued per worker: enough to keep every worker busy between two results, few enough that a broken pool
# leaves only a handful of suspects to rerun.
QUEUED_PER_WORKER = 2


def pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it: workers fork from a server that imported loratools (and torch)
    once, instead of each importing it (spawn), and without inheriting the parent's threads (fork)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Imported once in the server, so each worker starts in milliseconds instead of importing torch again.
        context.set_forkserver_preload(["lora_tools.scan.worker", "lora_tools.analysis", "lora_tools.formats",
                                        "lora_tools.truncate"])
        return context
    return multiprocessing.get_context("spawn")


def run_local(tasks: list[ScanTask], options: ScanOptions, jobs: int, on_result: ResultCallback,
              func: ScanFunction = scan_adapter) -> None:
    """Call ``on_result(index, line)`` exactly once per task (in completion order), running ``func`` on ``jobs``
    worker processes."""
    pending = deque(range(len(tasks)))
    suspects: deque[int] = deque()
    done: set[int] = set()

    def accept(index: int, line: dict[str, Any]) -> None:
        if index not in done:
            done.add(index)
            on_result(index, line)

    while pending or suspects:
        executor = ProcessPoolExecutor(max_workers=jobs, mp_context=pool_context(), initializer=worker_init)
        try:
            broken = False
            while suspects and not broken:
                index = suspects.popleft()
                if not _run_alone(executor, tasks[index], options, func, index, accept):
                    accept(index, error_line(tasks[index], f"{tasks[index].path}: the worker process died while "
                                                            "scanning it, twice (killed, out of memory or crashed)"))
                    broken = True  # this pool is gone: the next round starts a fresh one
            if not broken and pending:
                suspects.extend(_run_batch(executor, tasks, options, func, jobs, pending, accept))
        finally:
            _stop(executor)


def _run_alone(executor: ProcessPoolExecutor, task: ScanTask, options: ScanOptions, func: ScanFunction,
               index: int, accept: ResultCallback) -> bool:
    """Rerun a suspect with nothing else in flight; False when its worker died again."""
    try:
        accept(index, executor.submit(func, task, options).result())
        return True
    except BrokenProcessPool:
        return False


def _run_batch(executor: ProcessPoolExecutor, tasks: list[ScanTask], options: ScanOptions, func: ScanFunction,
               jobs: int, pending: deque[int], accept: ResultCallback) -> list[int]:
    """Run pending tasks until none is left (returns []) or the pool breaks (returns the tasks in flight)."""
    in_flight: dict[Future[dict[str, Any]], int] = {}
    while pending or in_flight:
        while pending and len(in_flight) < jobs * QUEUED_PER_WORKER:
            index = pending.popleft()
            try:
                in_flight[executor.submit(func, tasks[index], options)] = index
            except BrokenProcessPool:
                pending.appendleft(index)
                return _collect_after_break(in_flight, accept)
        finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            exc = future.exception()
            if isinstance(exc, BrokenProcessPool):
                return _collect_after_break(in_flight, accept)
            index = in_flight.pop(future)
            # func never raises for a bad adapter; what can is the transport (a result that does not pickle).
            accept(index, future.result() if exc is None else error_line(tasks[index], error_message(exc)))
    return []


def _collect_after_break(in_flight: dict[Future[dict[str, Any]], int], accept: ResultCallback) -> list[int]:
    """After a worker died: keep every result that did arrive; the rest are suspects, in task order."""
    suspects = []
    for future, index in in_flight.items():
        if future.done() and not future.cancelled() and future.exception() is None:
            accept(index, future.result())
        else:
            suspects.append(index)
    logger.warning("a scan worker process died; rerunning the %d adapter(s) it may have been reading",
                   len(suspects))
    return sorted(suspects)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Shut the pool down now: on Ctrl-C or a broken pool, workers still busy are terminated (they ignore
    SIGINT, see worker_init, so that the parent alone decides)."""
    # The executor has no public handle on its processes; _processes is the one it keeps itself.
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
