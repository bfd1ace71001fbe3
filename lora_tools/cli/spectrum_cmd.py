"""`loratools spectrum`: singular values of every module's update, as a table, JSON or a plot."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._common import (
    adapter_argument,
    default_adapter,
    echo_json,
    error_boundary,
    force_option,
    format_option,
    json_option,
    progress_bar,
    quiet_option,
)


@click.command("spectrum")
@adapter_argument
@click.option("--module", "module_glob", default=None, metavar="GLOB", help="Only modules matching this pattern.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, metavar="FILE.png",
              help="Write a plot of the normalised spectra (log scale).")
@format_option
@json_option
@quiet_option
@force_option
@error_boundary
def spectrum_command(path: Path | None, module_glob: str | None, plot_path: Path | None, format_: str | None,
                     as_json: bool, quiet: bool, force: bool) -> None:
    """Exact singular values of s·B·A for each module of the adapter at PATH (default: the bundled example)."""
    from lora_tools.analysis import inspect_adapter, select_modules
    from lora_tools.atomic import check_not_input, check_output
    from lora_tools.formats import load_adapter
    from lora_tools.report.tables import render_spectrum_table

    source = default_adapter(path)
    adapter = load_adapter(source, format_)
    if plot_path is not None:
        # --force must never let the plot replace the adapter it was drawn from
        inputs = tuple(p for p in (source, adapter.weights_path) if p is not None)
        check_not_input(plot_path, inputs)
        check_output(plot_path, force, inputs)
    count = len(select_modules(adapter, module_glob))
    with progress_bar(count, "computing spectra", quiet) as advance:
        report = inspect_adapter(adapter, module_glob=module_glob, progress=advance)
    if plot_path is not None:
        from lora_tools.report.plots import plot_spectra

        plot_spectra(report, plot_path, force=force)
        click.echo(f"wrote {plot_path}", err=True)
    if as_json:
        keep = ("name", "shape", "rank", "scale", "sigma_max", "fro_norm", "singular_values", "flags")
        echo_json({
            "path": report["path"], "format": report["format"], "num_modules": report["num_modules"],
            "modules": [{k: row[k] for k in keep} for row in report["modules"]],
        })
        return
    click.echo(render_spectrum_table(report["modules"]))
