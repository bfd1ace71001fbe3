"""Run a scan's per-adapter function as Ray tasks (``pip install 'loratools[ray]'``).

The same function as the local pool (``worker.scan_adapter``) becomes a Ray task with ``max_retries``: when the
worker process running it dies (killed, out of memory, its node lost) Ray reruns it elsewhere, and only a task
whose worker died on every try becomes an error line. Each result is taken once, as its task finishes, and tasks
are submitted in a bounded window so that 100,000 adapters never sit in the object store at once.

Without an address, ``ray.init()`` starts a local instance (its CPUs limited to ``jobs`` when given) and shuts it
down at the end; with one (``auto``, ``ray://head:10001``) the scan joins that cluster. Every node must see the
adapter paths (a shared file system) and have loratools installed.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from lora_tools.errors import InvalidOptionError
from lora_tools.scan.discover import ScanTask
from lora_tools.scan.local import ResultCallback, ScanFunction
from lora_tools.scan.worker import ScanOptions, error_line, error_message, scan_adapter, worker_init

logger = logging.getLogger(__name__)

MAX_RETRIES = 3
TASKS_PER_CPU = 2  # Ray tasks in flight per cluster CPU: enough to hide scheduling latency, bounded for memory


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidOptionError("--ray needs Ray: pip install 'loratools[ray]' (or pip install ray)") from None
    return ray


def _run_chunk(func: ScanFunction, tasks: list[ScanTask], options: ScanOptions) -> list[dict[str, Any]]:
    worker_init()  # cheap after the first call in a worker process
    return [func(task, options) for task in tasks]


def chunk_size(count: int, cpus: int) -> int:
    """Adapters per Ray task: one each for small scans; for large ones enough that a task lasts about a second
    (a Ray task costs ~1 ms to schedule, an adapter ~10-100 ms to scan), while leaving every CPU at least 8
    tasks to balance the load."""
    return max(1, min(16, count // max(1, cpus * 8)))


def run_ray(tasks: list[ScanTask], options: ScanOptions, on_result: ResultCallback, address: str | None = None,
            jobs: int | None = None, func: ScanFunction = scan_adapter, max_retries: int = MAX_RETRIES) -> None:
    """Call ``on_result(index, line)`` once per task, running ``func`` as Ray tasks."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                     "logging_level": logging.WARNING}
        if address:
            init_args["address"] = address
        elif jobs is not None:
            init_args["num_cpus"] = jobs
        ray.init(**init_args)
    try:
        _submit_all(ray, tasks, options, on_result, func, max_retries)
    finally:
        if started_here:
            ray.shutdown()


def _submit_all(ray: Any, tasks: list[ScanTask], options: ScanOptions, on_result: ResultCallback,
                func: ScanFunction, max_retries: int) -> None:
    # retry_exceptions=False: func returns error lines for bad adapters; only a lost worker is worth a retry.
    remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(_run_chunk)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = chunk_size(len(tasks), cpus)
    chunks = deque(list(range(start, min(start + size, len(tasks)))) for start in range(0, len(tasks), size))
    window = max(2, cpus * TASKS_PER_CPU)
    func_ref, options_ref = ray.put(func), ray.put(options)
    in_flight: dict[Any, list[int]] = {}
    try:
        while chunks or in_flight:
            while chunks and len(in_flight) < window:
                indices = chunks.popleft()
                in_flight[remote.remote(func_ref, [tasks[i] for i in indices], options_ref)] = indices
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                indices = in_flight.pop(ref)
                try:
                    lines = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died on every try, or the task failed
                    if len(indices) > 1:  # one adapter may be killing its workers: retry each alone, first
                        chunks.extendleft([i] for i in reversed(indices))
                        continue
                    logger.warning("Ray task for %s failed: %s", tasks[indices[0]].path, type(exc).__name__)
                    lines = [error_line(tasks[indices[0]], _lost_message(ray, tasks[indices[0]], exc, max_retries))]
                for index, line in zip(indices, lines, strict=True):
                    on_result(index, line)
    except BaseException:
        for ref in in_flight:  # Ctrl-C or an error: do not leave tasks running on the cluster
            ray.cancel(ref, force=True)
        raise


def _lost_message(ray: Any, task: ScanTask, exc: BaseException, max_retries: int) -> str:
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return (f"{task.path}: the Ray worker died while scanning it, {max_retries + 1} times "
                "(killed, out of memory or crashed)")
    cause = getattr(exc, "cause", None)
    return error_message(cause) if isinstance(cause, BaseException) else error_message(exc)
