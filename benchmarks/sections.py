"""Shared by the benchmark scripts: replace one `## section` of reports/benchmarks.md, leave the others alone; run a
child process with its peak memory sampled."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPORT = REPO_ROOT / "reports" / "benchmarks.md"


def write_section(report: Path, title: str, command: str, body: str) -> None:
    """Replace (or append) the section ``title`` with the date, the exact command and ``body``."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"{title}\n\nDate: {now}\n\nCommand (from the repository root):\n\n```\n{command}\n```\n\n{body}\n"
    text = report.read_text() if report.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        new_text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        new_text = "".join(lines[:start]) + section + ("\n" + after if after else "")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(new_text)
    print(f"updated section '{title}' in {report}")


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, int, str]:
    """(wall s, sampled peak RSS MiB, kernel max RSS MiB, exit status, stdout) of one child process.

    RSS is sampled every 20 ms with psutil (short spikes can be missed); the kernel's own maximum comes from
    wait4 for this child alone (not all children of the benchmark)."""
    import psutil

    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, env={**os.environ, **(env or {})})
        handle = psutil.Process(child.pid)
        peak = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out.seek(0)
        return (wall, peak / 2**20, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status),
                out.read().decode())
