"""`loratools inspect`: structure and exact spectra of an adapter, no base model needed."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._common import (
    adapter_argument,
    default_adapter,
    echo_json,
    error_boundary,
    format_option,
    json_option,
    progress_bar,
    quiet_option,
)


@click.command("inspect")
@adapter_argument
@click.option("--module", "module_glob", default=None, metavar="GLOB",
              help="Only modules whose name matches this shell-style pattern (e.g. '*q_proj').")
@click.option("--sort", type=click.Choice(["name", "norm", "rank"]), default="name", show_default=True,
              help="Order of the module table.")
@format_option
@json_option
@quiet_option
@error_boundary
def inspect_command(path: Path | None, module_glob: str | None, sort: str, format_: str | None, as_json: bool,
                    quiet: bool) -> None:
    """Inspect the LoRA adapter at PATH (a PEFT folder, or a kohya/diffusers/PEFT file).

    Without PATH, inspects the bundled example adapter. Singular values are exact, computed from the factors
    (QR of B and Aᵀ plus an r x r SVD) without forming the out x in update.
    """
    from lora_tools.analysis import inspect_adapter, select_modules
    from lora_tools.formats import load_adapter
    from lora_tools.report.tables import render_inspect_table, render_summary, render_warnings

    adapter = load_adapter(default_adapter(path), format_)
    count = len(select_modules(adapter, module_glob))
    with progress_bar(count, "analysing modules", quiet) as advance:
        report = inspect_adapter(adapter, module_glob=module_glob, sort=sort, progress=advance)
    if as_json:
        echo_json(report)
        return
    click.echo(render_summary(report))
    click.echo()
    click.echo(render_inspect_table(report["modules"]))
    warnings = render_warnings(report["warnings"])
    if warnings:
        click.echo()
        click.echo(warnings)
