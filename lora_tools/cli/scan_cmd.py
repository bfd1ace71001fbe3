"""`loratools scan`: audit, and optionally right-size, a whole collection of adapters (local pool or Ray)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from lora_tools.cli._common import INPUT_FORMATS, error_boundary, force_option, quiet_option


def _ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--ray`` alone (or ``--ray local``) -> "" (start a local instance); ``--ray ADDRESS`` -> ADDRESS."""
    if value is None:
        return None
    if value in ("", "local"):
        return ""
    if Path(value).exists() and "://" not in value:
        raise click.BadParameter(f"{value!r} is a path, not a Ray address: put --ray after the paths "
                                 "(loratools scan DIR --ray), or write --ray local", ctx=ctx, param=param)
    return value


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Results as JSON lines, sorted by path (default: stdout). Written atomically at the end; "
                   "finished lines go to FILE.partial as they come.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Also write DIR/report.md, report.json and plots.")
@click.option("--energy", default=0.99, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of Σσ² that rank_at_energy keeps, per module (and the report's savings).")
@click.option("--truncate-energy", default=None, metavar="F",
              help="Right-size: per module, the smallest rank keeping F of Σσ²; needs --out-dir.")
@click.option("--avg-rank", default=None, metavar="K",
              help="Right-size: per adapter, the parameters of rank K everywhere, spread for the most energy.")
@click.option("--max-rank", default=None, metavar="R", help="Right-size: every module to rank min(R, its rank).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Where right-sized copies go: each at its place below its searched folder, in its own format.")
@click.option("--jobs", "-j", type=int, default=None, metavar="N",
              help="Worker processes (default: the cores available). With --ray and no address: the local "
                   "instance's CPUs.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              callback=_ray_address,
              help="Run as Ray tasks (pip install 'loratools[ray]'): on the cluster at ADDRESS (auto, "
                   "ray://head:10001), or on a local instance without one. Put it after the paths.")
@click.option("--resume", is_flag=True, help="Skip adapters already in --output (or its .partial file).")
@click.option("--format", "format_", type=click.Choice(INPUT_FORMATS), default=None,
              help="Read every adapter as this format (default: detected per adapter).")
@quiet_option
@force_option
@error_boundary
def scan_command(paths: tuple[str, ...], output: Path | None, report_dir: Path | None, energy: float,
                 truncate_energy: str | None, avg_rank: str | None, max_rank: str | None, out_dir: Path | None,
                 jobs: int | None, ray_address: str | None, resume: bool, format_: str | None, quiet: bool,
                 force: bool) -> None:
    """Scan every adapter under PATH... and write one JSON line per adapter.

    PATH is a folder (searched recursively: a folder with adapter_config.json is one PEFT adapter, elsewhere each
    .safetensors/.bin/.pt/.pth file is one), a glob ('fleet/**/*.safetensors'), a text file listing paths or Hub
    ids (one per line), '-' for that list on stdin, or a Hub id org/name[@rev][:subfolder] from the local cache.

    Each line has path, format, base_model, num_modules, ranks, params, bytes, rank_at_energy (per module),
    flags, error (null or inspect's one-line message), and per module the effective ranks. A file that cannot be
    read is an error line, never the end of the scan.
    """
    from lora_tools.scan.run import check_truncation_options, run_scan
    from lora_tools.scan.worker import ScanOptions

    truncation = check_truncation_options(energy=truncate_energy, avg_rank=avg_rank, max_rank=max_rank,
                                          out_dir=out_dir)
    if report_dir is not None:
        from lora_tools.scan.report import check_report_folder

        check_report_folder(report_dir, force)
    options = ScanOptions(energy=energy, format=format_, truncate=truncation,
                          out_dir=str(out_dir) if out_dir is not None else None, force=force)
    with _progress(quiet) as (on_total, on_result):
        try:
            run = run_scan(paths, options, output=output, jobs=jobs, ray_address=ray_address, resume=resume,
                           force=force, stdin=sys.stdin, on_total=on_total, on_result=on_result)
        except KeyboardInterrupt:
            if output is not None:
                click.echo(f"\ninterrupted: the finished lines are in {output}.partial; rerun the same command "
                           "with --resume to finish the scan", err=True)
            else:
                click.echo("\ninterrupted", err=True)
            sys.exit(130)
    if output is None:
        for text in run.store.lines():
            click.echo(text)
    if report_dir is not None:
        from lora_tools.scan.report import write_report
        from lora_tools.scan.summary import summarize

        summary = summarize(run.lines(), energy)
        written = write_report(summary, report_dir, force=force)
        if not quiet:
            click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)
    if not quiet:
        errors = sum(1 for line in run.lines() if line["error"])
        rate = run.scanned / run.seconds if run.seconds > 0 else 0.0
        resumed = f", {run.resumed} already done" if run.resumed else ""
        click.echo(f"scanned {run.scanned} adapter(s){resumed} in {run.seconds:.1f} s ({rate:.1f} adapters/s, "
                   f"{run.engine}); {errors} error line(s) of {run.total}"
                   + (f"; wrote {output}" if output is not None else ""), err=True)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[tuple[Callable[[int], None], Callable[[dict[str, Any]], None]]]:
    """A bar on stderr with adapters/s and the ETA (only on a terminal, and not with --quiet)."""
    if quiet or not sys.stderr.isatty():
        yield (lambda total: None), (lambda line: None)
        return
    state: dict[str, Any] = {"bar": None, "start": time.perf_counter(), "done": 0}

    def on_total(total: int) -> None:
        bar = click.progressbar(length=max(total, 1), label="scanning", file=sys.stderr, show_eta=True,
                                item_show_func=lambda text: text)
        state["bar"] = bar.__enter__()
        state["start"] = time.perf_counter()

    def on_result(line: dict[str, Any]) -> None:
        state["done"] += 1
        elapsed = time.perf_counter() - state["start"]
        rate = state["done"] / elapsed if elapsed > 0 else 0.0
        state["bar"].update(1, current_item=f"{rate:.1f} adapters/s")

    try:
        yield on_total, on_result
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
