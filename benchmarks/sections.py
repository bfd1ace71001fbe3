"""Shared by the benchmark scripts: replace one `## section` of reports/benchmarks.md, leave the others alone."""

from __future__ import annotations

import datetime as dt
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
