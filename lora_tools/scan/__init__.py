"""``loratools scan``: audit (and optionally right-size) a whole collection of adapters, locally or on Ray.

discover.py   PATH arguments -> sorted ScanTasks (folders, globs, lists, stdin, cached Hub ids)
worker.py     the per-adapter function (inspect's analysis + optional truncation), never raising
local.py      process pool that survives killed workers; ray_engine.py: the same function as Ray tasks
results.py    JSONL lines written as they arrive, sorted atomically at the end, resumable
summary.py    collection totals, problems, groups, histograms, serving memory; report.py renders them
run.py        one scan from start to end
"""

from __future__ import annotations

from lora_tools.scan.discover import ScanTask, discover
from lora_tools.scan.run import ScanRun, run_scan
from lora_tools.scan.worker import ScanOptions, scan_adapter

__all__ = ["ScanOptions", "ScanRun", "ScanTask", "discover", "run_scan", "scan_adapter"]
