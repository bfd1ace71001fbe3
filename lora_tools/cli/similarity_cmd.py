"""`loratools similarity`: subspace similarity and cosine of two adapters' updates, per common module."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._common import echo_json, error_boundary, force_option, json_option


@click.command("similarity")
@click.argument("adapter_a", type=click.Path(path_type=Path))
@click.argument("adapter_b", type=click.Path(path_type=Path))
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path), metavar="FILE.png",
              help="Heat-maps of φ(i, j) (left and right singular subspaces) for one module.")
@click.option("--module", "module_name", default=None, metavar="NAME",
              help="The module to plot (default: the first common one).")
@click.option("--grids/--no-grids", default=True, show_default=True, help="Full φ grids in the --json output.")
@json_option
@force_option
@error_boundary
def similarity_command(adapter_a: Path, adapter_b: Path, plot_path: Path | None, module_name: str | None,
                       grids: bool, as_json: bool, force: bool) -> None:
    """Compare ADAPTER_A and ADAPTER_B module by module, from the factors.

    φ(i, j) = ‖U_Aᵢᵀ U_Bⱼ‖_F² / min(i, j) between the top-i and top-j singular subspaces of the two updates
    (Hu et al. 2021), left (U) and right (V), and the cosine between the two updates as vectors.
    """
    from lora_tools.errors import ModuleMismatchError
    from lora_tools.formats import load_adapter
    from lora_tools.report.merge import render_similarity_table
    from lora_tools.similarity import similarity

    a, b = load_adapter(adapter_a), load_adapter(adapter_b)
    if plot_path is not None:
        from lora_tools.atomic import check_not_input, check_output

        # --force must never let the plot replace one of the adapters it compares
        inputs = tuple(p for x, path in ((a, adapter_a), (b, adapter_b)) for p in (path, x.weights_path) if p)
        check_not_input(plot_path, inputs)
        check_output(plot_path, force, inputs)
    report = similarity(a, b, grids=grids or plot_path is not None)
    if plot_path is not None:
        from lora_tools.report.plots import plot_similarity

        rows = report["modules"]
        chosen = rows[0] if module_name is None else next((r for r in rows if module_name in (r["name"],
                                                                                              r["name_b"])), None)
        if chosen is None:
            raise ModuleMismatchError(f"--module {module_name}: not a module common to both adapters")
        if chosen["phi_left"] is None:
            raise ModuleMismatchError(f"module {chosen['name']}: one update is zero ({', '.join(chosen['flags'])}); "
                                      "it has no singular subspace to plot")
        plot_similarity(chosen, plot_path, force=force)
        if not grids:
            for row in rows:
                row.pop("phi_left", None)
                row.pop("phi_right", None)
    if as_json:
        echo_json(report)
    else:
        click.echo(render_similarity_table(report))
