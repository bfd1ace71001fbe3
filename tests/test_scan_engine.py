"""`loratools scan` execution: killed workers (local pool and Ray) lose and duplicate nothing; Ctrl-C then
--resume ends with exactly one line per adapter; Ray gives the local pool's lines."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lora_tools.scan.discover import ScanTask
from lora_tools.scan.run import run_scan
from lora_tools.scan.worker import ScanOptions, scan_adapter
from tests.helpers import lora_tensors, write_peft

REPO = Path(__file__).resolve().parents[1]


def kill_worker(marker: str, always: bool, task: ScanTask, options: ScanOptions) -> dict[str, Any]:
    """The scan function, except that the worker reading a 'victim' adapter is killed (SIGKILL, as the OOM killer
    does) the first time (or every time); ``marker`` records that the first kill happened."""
    if "victim" in task.path and (always or not os.path.exists(marker)):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return scan_adapter(task, options)


def make_fleet(root: Path, count: int, modules: int = 2) -> list[str]:
    paths = []
    for index in range(count):
        name = "victim" if index == count // 2 else f"adapter{index:03d}"
        spec = {f"layers.{i}.q_proj": (16, 16, 4) for i in range(modules)}
        paths.append(str(write_peft(root / name, lora_tensors(spec, seed=index))))
    return sorted(paths)


def collect(root: Path, **kwargs: Any) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    run_scan([str(root)], ScanOptions(), on_result=lines.append, **kwargs)
    return lines


def test_killed_local_worker_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    paths = make_fleet(tmp_path / "fleet", 12)
    marker = tmp_path / "killed"
    lines = collect(tmp_path / "fleet", jobs=2, func=functools.partial(kill_worker, str(marker), False))
    assert marker.exists()  # a worker really died mid-scan
    assert sorted(line["path"] for line in lines) == paths  # each adapter exactly once
    assert all(line["error"] is None for line in lines)


def test_adapter_that_kills_every_worker_is_an_error_line(tmp_path: Path) -> None:
    paths = make_fleet(tmp_path / "fleet", 6)
    lines = collect(tmp_path / "fleet", jobs=2, func=functools.partial(kill_worker, str(tmp_path / "k"), True))
    assert sorted(line["path"] for line in lines) == paths
    errors = {line["path"]: line["error"] for line in lines if line["error"]}
    assert list(errors) == [str(tmp_path / "fleet" / "victim")]
    assert "worker process died" in errors[str(tmp_path / "fleet" / "victim")]


def test_sigint_then_resume_gives_one_line_per_adapter(tmp_path: Path) -> None:
    paths = make_fleet(tmp_path / "fleet", 40, modules=16)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    command = [sys.executable, "-m", "lora_tools", "scan", str(tmp_path / "fleet"), "-o", str(out), "--jobs", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the scan ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    done_before = {json.loads(text)["path"] for text in partial.read_text().splitlines() if text.endswith("}")}
    assert 3 <= len(done_before) < len(paths), (len(done_before), stderr)
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_before)} already done" in resumed.stderr
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    assert [line["path"] for line in lines] == paths
    assert all(line["error"] is None for line in lines)
    assert not partial.exists()


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # any import failure, not only a missing module: CI does not install ray
        pytest.skip("ray not installed (pip install 'loratools[ray]')")
    return ray


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    """One local 2-CPU Ray instance for this module's Ray tests (starting one takes seconds)."""
    ray = _ray()
    # Ray workers import this test module to run kill_worker: they need the repository on their path.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), previous) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def test_ray_gives_the_local_pools_lines(tmp_path: Path, ray_instance: Any) -> None:
    make_fleet(tmp_path / "fleet", 8)
    (tmp_path / "fleet" / "junk.safetensors").write_bytes(b"junk")

    def comparable(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(({k: v for k, v in line.items() if k != "seconds"} for line in lines),
                      key=lambda line: line["path"])

    local = comparable(collect(tmp_path / "fleet", jobs=2))
    remote = comparable(collect(tmp_path / "fleet", ray_address=""))
    assert remote == local and len(local) == 9


def test_killed_ray_worker_loses_and_duplicates_nothing(tmp_path: Path, ray_instance: Any) -> None:
    paths = make_fleet(tmp_path / "fleet", 10)
    marker = tmp_path / "killed"
    lines = collect(tmp_path / "fleet", ray_address="", func=functools.partial(kill_worker, str(marker), False))
    assert marker.exists()
    assert sorted(line["path"] for line in lines) == paths
    assert all(line["error"] is None for line in lines)


def test_ray_adapter_that_kills_every_worker_is_the_only_error_line(tmp_path: Path, ray_instance: Any) -> None:
    """Adapters travel in chunks; a chunk whose worker keeps dying is retried adapter by adapter, so only the
    adapter that kills its worker becomes an error line."""
    from lora_tools.scan.discover import discover
    from lora_tools.scan.ray_engine import chunk_size, run_ray

    paths = make_fleet(tmp_path / "fleet", 40, modules=1)
    assert chunk_size(40, 2) > 1
    tasks = discover([str(tmp_path / "fleet")]).tasks
    lines: dict[str, dict[str, Any]] = {}

    def record(index: int, line: dict[str, Any]) -> None:
        assert tasks[index].path not in lines  # never twice
        lines[tasks[index].path] = line

    run_ray(tasks, ScanOptions(), record, func=functools.partial(kill_worker, str(tmp_path / "k"), True),
            max_retries=1)
    assert sorted(lines) == paths
    errors = [path for path, line in lines.items() if line["error"]]
    assert errors == [str(tmp_path / "fleet" / "victim")]
    assert "Ray worker died" in lines[errors[0]]["error"]
