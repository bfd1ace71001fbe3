"""The per-adapter function of a scan: read one adapter, analyse it as ``inspect`` does, optionally right-size it.

``scan_adapter`` is what the local process pool and Ray both run. It never raises for a bad adapter: every failure
is an error line carrying the one-line message ``loratools inspect`` prints for that file, so a bad file is one
line of the results, never the end of the scan.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.errors import LoraToolsError, user_message
from lora_tools.scan.discover import WEIGHT_SUFFIXES, ScanTask

# Slot ranks at which the worst module's retained energy is recorded (for the "cap the slot rank" table).
CAP_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LINE_FIELDS = ("path", "format", "base_model", "num_modules", "ranks", "params", "bytes", "target_modules",
               "rank_at_energy", "energy", "flags", "warnings", "modules", "energy_at_rank", "rank_unit_params",
               "params_at_energy", "truncation", "error", "seconds")


@dataclass(frozen=True)
class ScanOptions:
    """What every task of one scan shares (small and picklable: it travels with each task)."""

    energy: float = 0.99
    format: str | None = None
    # Right-sizing: keyword arguments of lora_tools.truncate.truncate ({"energy": F}, {"avg_rank": K} or
    # {"rank": R}), or empty for an analysis-only scan.
    truncate: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None
    force: bool = False


def error_message(exc: BaseException) -> str:
    """The line ``loratools inspect`` prints after ``error:`` for this exception (``errors.user_message``, the
    CLI's own mapping), or, for an exception inspect would not catch (a bug), its type and text."""
    return user_message(exc) or " ".join(f"internal error: {type(exc).__name__}: {exc}".split())


def error_line(task: ScanTask, message: str, seconds: float = 0.0) -> dict[str, Any]:
    line: dict[str, Any] = dict.fromkeys(LINE_FIELDS)
    line.update(path=task.path, flags=[], warnings=[], error=message, seconds=round(seconds, 6))
    return line


def scan_adapter(task: ScanTask, options: ScanOptions) -> dict[str, Any]:
    """One JSON-ready result line for ``task`` (an error line for anything that cannot be read)."""
    start = time.perf_counter()
    if task.error is not None:
        return error_line(task, task.error)
    try:
        _refuse_special_file(Path(task.source))
        return _scan(task, options, start)
    except (Exception, MemoryError) as exc:  # noqa: BLE001 -- a bad adapter is a line, never the scan's end
        return error_line(task, error_message(exc), time.perf_counter() - start)


def _refuse_special_file(path: Path) -> None:
    """A fifo or device with a weights name would block the reader forever (inspect would hang on it too)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing or unreadable: the reader reports it in inspect's words
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"
        raise LoraToolsError(f"{path}: not a regular file (a {kind}); not read")


def _scan(task: ScanTask, options: ScanOptions, start: float) -> dict[str, Any]:
    import torch

    from lora_tools.analysis import inspect_adapter
    from lora_tools.formats import load_adapter
    from lora_tools.linalg.metrics import energy_rank
    from lora_tools.model.resolve import resolve_adapter_reference

    adapter = load_adapter(resolve_adapter_reference(Path(task.source)), options.format)
    report = inspect_adapter(adapter)  # exactly inspect's analysis: flags, effective ranks, exact spectra
    rank_at_energy: dict[str, int | None] = {}
    worst_at_cap: dict[int, float] = {}
    modules = []
    flags: set[str] = set()
    max_rank = max((row["rank"] for row in report["modules"]), default=0)
    caps = [cap for cap in CAP_RANKS if cap < max_rank]
    rank_unit_params = params_at_energy = 0
    for row in report["modules"]:
        flags.update(row["flags"])
        out_features, in_features = row["shape"]
        rank_unit_params += out_features + in_features  # parameters per unit of rank: a column of B, a row of A
        values = row["singular_values"]
        if any(v is None for v in values):
            needed = None  # NaN/Inf factors: no spectrum (flagged "nonfinite")
        else:
            S = torch.tensor(values, dtype=torch.float64)
            top = float(S.max()) if S.numel() else 0.0
            ratios = S / top if top > 0 else S  # σ/σ_max: extreme alphas neither overflow nor underflow
            needed = energy_rank(ratios, options.energy)
            energy = ratios.square()
            total = float(energy.sum())
            for cap in caps:
                kept = float(energy[:cap].sum()) / total if total > 0 else 1.0
                worst_at_cap[cap] = min(worst_at_cap.get(cap, 1.0), kept)
            params_at_energy += needed * (out_features + in_features)
        rank_at_energy[row["name"]] = needed
        modules.append({
            "name": row["name"], "kind": row["kind"], "update": row["update"], "shape": row["shape"],
            "rank": row["rank"], "effective_rank": row["effective_rank"], "rank_90": row["rank_90"],
            "rank_99": row["rank_99"], "numerical_rank": row["numerical_rank"], "rank_at_energy": needed,
            "flags": row["flags"],
        })
    line: dict[str, Any] = dict.fromkeys(LINE_FIELDS)
    line.update(
        path=task.path, format=report["format"], base_model=report["base_model"],
        num_modules=report["num_modules"], ranks=sorted({m.rank for m in adapter.modules.values()}),
        params=report["total_params"], bytes=report["file_size"],
        target_modules=sorted({_target_name(m["name"]) for m in modules}),
        rank_at_energy=rank_at_energy, energy=options.energy, flags=sorted(flags), warnings=report["warnings"],
        modules=modules, energy_at_rank={str(cap): kept for cap, kept in sorted(worst_at_cap.items())},
        rank_unit_params=rank_unit_params,
        params_at_energy=None if None in rank_at_energy.values() else params_at_energy,
    )
    if options.truncate:
        line["truncation"] = _right_size(task, options, adapter)
    line["seconds"] = round(time.perf_counter() - start, 6)
    return line


def _target_name(module_name: str) -> str:
    """The layer name a ``target_modules`` list would use: the last non-index part of the module path
    (``layers.3.self_attn.q_proj`` -> q_proj, ``attn1.to_out.0`` -> to_out); for kohya's flattened names, what
    follows the last block index (``lora_unet_down_blocks_0_attn1_to_q`` -> attn1_to_q)."""
    if "." in module_name:
        parts = [part for part in module_name.split(".") if not part.isdigit()]
        return parts[-1] if parts else module_name
    return re.split(r"_\d+_", module_name)[-1]


def _right_size(task: ScanTask, options: ScanOptions, adapter: Any) -> dict[str, Any]:
    """Truncate and write under --out-dir in the adapter's own format; what was kept, or why nothing was."""
    from lora_tools.formats import save_adapter
    from lora_tools.truncate import truncate

    try:
        result = truncate(adapter, **options.truncate)
        target = output_location(Path(options.out_dir or "."), task.relative, adapter.format)
        target.parent.mkdir(parents=True, exist_ok=True)
        inputs = tuple(p for p in (Path(task.source), adapter.weights_path) if p is not None)
        written = save_adapter(result.adapter, target, force=options.force, inputs=inputs)
    except (Exception, MemoryError) as exc:  # noqa: BLE001 -- the analysis above still stands
        return {"output": None, "error": error_message(exc)}
    report = result.report
    return {
        "output": str(written), "selection": report["selection"], "retained_energy": report["retained_energy"],
        "params_before": report["params_before"], "params_after": report["params_after"],
        "bytes_before": report["bytes_before"], "bytes_after": report["bytes_after"],
        "ranks": {row["name"]: row["new_rank"] for row in report["modules"]}, "error": None,
    }


def output_location(out_dir: Path, relative: str, format: str) -> Path:
    """Where the right-sized copy of an adapter found at ``relative`` goes: the same place under ``out_dir``, named
    as its format's writer names outputs (a folder for PEFT, one .safetensors file otherwise)."""
    from lora_tools.formats.output import FOLDER_FORMATS

    path = out_dir / relative
    if format in FOLDER_FORMATS:
        if path.suffix.lower() in WEIGHT_SUFFIXES:  # a PEFT weights file named directly: its folder's name
            path = path.parent if Path(relative).parent != Path(".") else path.with_suffix("")
        return path
    return path.with_suffix(".safetensors") if path.suffix.lower() in WEIGHT_SUFFIXES else \
        path.with_name(path.name + ".safetensors")


def worker_init() -> None:
    """Each pool or Ray worker: one torch thread (the problems are tiny; the parallelism is across adapters)
    and Ctrl-C left to the parent, which stops the workers itself."""
    import signal

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (Ray may run tasks on another thread)
        pass
    import torch

    torch.set_num_threads(1)
