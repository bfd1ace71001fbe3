"""One scan from start to end: find the adapters, check the outputs, run the per-adapter function (local pool or
Ray), keep the results (resumable), and return what the report needs."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lora_tools.errors import InvalidOptionError, LoraToolsError
from lora_tools.scan.discover import Discovery, ScanTask, discover
from lora_tools.scan.results import ResultStore, partial_path
from lora_tools.scan.worker import ScanOptions, scan_adapter


@dataclass
class ScanRun:
    """What a finished (or interrupted) scan did; ``store`` reads the sorted lines back."""

    store: ResultStore
    total: int
    resumed: int = 0
    scanned: int = 0
    seconds: float = 0.0
    engine: str = "local"
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    def lines(self) -> Iterator[dict[str, Any]]:
        for text in self.store.lines():
            yield json.loads(text)


def default_jobs() -> int:
    """The cores this process may use (its CPU affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_truncation_options(*, energy: Any = None, avg_rank: Any = None, max_rank: Any = None,
                             out_dir: Path | None = None) -> dict[str, Any]:
    """The keyword arguments of ``truncate`` for the scan's right-sizing options (validated), or {}."""
    from lora_tools.truncate import select_rule

    given = {key: value for key, value in (("energy", energy), ("avg_rank", avg_rank), ("rank", max_rank))
             if value is not None}
    if not given:
        if out_dir is not None:
            raise InvalidOptionError("--out-dir needs a rule: --truncate-energy F, --avg-rank K or --max-rank R")
        return {}
    if len(given) > 1:
        names = {"energy": "--truncate-energy", "avg_rank": "--avg-rank", "rank": "--max-rank"}
        raise InvalidOptionError(f"choose one right-sizing rule; got {' and '.join(names[k] for k in given)}")
    if out_dir is None:
        raise InvalidOptionError("right-sizing writes new adapters: give --out-dir DIR")
    select_rule(**given)  # the same validation (and messages) as `loratools truncate`
    return given


def run_scan(arguments: Iterable[str], options: ScanOptions, *, output: Path | None = None, jobs: int | None = None,
             ray_address: str | None = None, resume: bool = False, force: bool = False,
             stdin: TextIO | None = None, on_total: Callable[[int], None] | None = None,
             on_result: Callable[[dict[str, Any]], None] | None = None,
             func: Callable[[ScanTask, ScanOptions], dict[str, Any]] = scan_adapter) -> ScanRun:
    """Scan every adapter the arguments name. ``ray_address`` "" starts a local Ray instance, None runs the local
    pool. On Ctrl-C the lines finished so far stay in OUTPUT.partial (``--resume`` finishes the scan) and
    KeyboardInterrupt propagates after the workers are stopped."""
    if jobs is not None and jobs < 1:
        raise InvalidOptionError(f"--jobs must be at least 1, found {jobs}")
    found = discover(arguments, stdin)
    if not found.tasks:
        raise InvalidOptionError("no adapters found under the given paths (folders are searched for "
                                 "adapter_config.json and .safetensors/.bin/.pt/.pth files)")
    if output is not None:
        _refuse_output_among_inputs(output, found)
    if options.out_dir is not None:
        _refuse_out_dir_over_inputs(Path(options.out_dir), found)
    store = ResultStore(output, {task.path for task in found.tasks}, resume=resume, force=force)
    done = store.done
    todo = [task for task in found.tasks if task.path not in done]
    run = ScanRun(store=store, total=len(found.tasks), resumed=len(found.tasks) - len(todo),
                  engine="ray" if ray_address is not None else "local")
    if on_total:
        on_total(len(todo))

    def record(index: int, line: dict[str, Any]) -> None:
        store.add(line)
        run.scanned += 1
        if on_result:
            on_result(line)

    start = time.perf_counter()
    try:
        if not todo:
            pass
        elif ray_address is not None:
            from lora_tools.scan.ray_engine import run_ray

            run_ray(todo, options, record, address=ray_address or None, jobs=jobs, func=func)
        else:
            from lora_tools.scan.local import run_local

            run_local(todo, options, min(jobs or default_jobs(), len(todo)), record, func=func)
    except KeyboardInterrupt:
        run.interrupted = True
        store.close()
        raise
    finally:
        run.seconds = time.perf_counter() - start
    store.finish()
    return run


def _refuse_output_among_inputs(output: Path, found: Discovery) -> None:
    """-o must not be (or sit inside) an adapter or list file being read: writing it would destroy an input."""
    targets = {output.resolve(), partial_path(output).resolve()}
    for source in [*found.list_files, *(Path(task.source) for task in found.tasks)]:
        try:
            resolved = source.resolve()
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13): not the output
            continue
        for target in targets:
            if target == resolved or resolved in target.parents:
                raise LoraToolsError(f"{output}: output would overwrite the input {source}; choose another "
                                     "output path")


def _refuse_out_dir_over_inputs(out_dir: Path, found: Discovery) -> None:
    """--out-dir mirrors each adapter's place below its searched folder: it must not map an adapter onto itself."""
    for task in found.tasks:
        try:
            same = (out_dir / task.relative).resolve() == Path(task.source).resolve()
        except (OSError, RuntimeError):  # a link loop: an error line later, never a copy
            continue
        if task.error is None and same:
            raise LoraToolsError(f"--out-dir {out_dir}: the right-sized copy of {task.path} would replace it; "
                                 "choose another folder")
