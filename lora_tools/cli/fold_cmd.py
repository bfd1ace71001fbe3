"""`loratools fold` (adapter into base weights) and `loratools extract` (adapter out of a fine-tuned model)."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._common import (
    echo_json,
    error_boundary,
    force_option,
    format_option,
    json_option,
    quiet_option,
)


@click.command("fold")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path), metavar="MODEL",
              help="The base model: a model folder with *.safetensors (layout kept), or one safetensors file.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), metavar="OUT",
              help="Output folder (or file, for a single-file base).")
@format_option
@json_option
@quiet_option
@force_option
@error_boundary
def fold_command(adapter: Path, base: Path, output: Path, format_: str | None, as_json: bool, quiet: bool,
                 force: bool) -> None:
    """Fold ADAPTER into the base weights: W0 + s·B·A (Conv1D/fan_in_fan_out aware, DoRA applied as DoRA).

    Written in the base's layout (same shards, keys and dtypes, other files copied); untouched tensors are copied
    bit for bit. Equals PEFT's merge_and_unload.
    """
    from lora_tools.fold import fold
    from lora_tools.formats import load_adapter
    from lora_tools.model.resolve import resolve_weights_reference
    from lora_tools.report.merge import render_fold_report

    base = resolve_weights_reference(base)  # a cached Hub id -> its snapshot folder
    report = fold(load_adapter(adapter, format_), base, output, force=force)
    if as_json:
        echo_json(report)
    else:
        click.echo(render_fold_report(report))
    if not quiet:
        click.echo(f"wrote {output}", err=True)


@click.command("extract")
@click.option("--base", required=True, type=click.Path(path_type=Path), metavar="MODEL", help="The base model.")
@click.option("--finetuned", required=True, type=click.Path(path_type=Path), metavar="MODEL",
              help="The fine-tuned model (same architecture).")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), metavar="OUT",
              help="Output PEFT adapter folder (or .safetensors with --to kohya/diffusers).")
@click.option("--rank", default=None, metavar="R", help="Rank of every extracted module.")
@click.option("--energy", default=None, metavar="F", help="Per module, the smallest rank keeping F of ‖ΔW‖² (0<F<=1).")
@click.option("--to", "to_format", default="peft", show_default=True,
              type=click.Choice(["peft", "kohya", "diffusers"]), help="Output format.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp16", "bf16", "fp32"]),
              help="dtype of the written factors.")
@click.option("--include-other", is_flag=True,
              help="Also store the changed tensors outside linear layers (norms, embeddings, biases) the way PEFT's "
                   "modules_to_save does (whole modules), and LoRA layers' bias changes as lora_B.bias.")
@json_option
@quiet_option
@force_option
@error_boundary
def extract_command(base: Path, finetuned: Path, output: Path, rank: str | None, energy: str | None,
                    to_format: str, dtype: str, include_other: bool, as_json: bool, quiet: bool,
                    force: bool) -> None:
    """Extract a LoRA adapter: for each linear weight that differs, the best rank-R (or energy-F) approximation
    of W_ft − W0 (truncated SVD; randomized with an accuracy check for large layers at a fixed rank). The report
    gives each module's retained energy and lists every other tensor that differs with its relative change."""
    from lora_tools.atomic import check_output
    from lora_tools.errors import InvalidOptionError
    from lora_tools.extract import extract, select
    from lora_tools.formats import save_adapter
    from lora_tools.model.resolve import resolve_weights_reference
    from lora_tools.report.extract import render_extract_report

    base, finetuned = resolve_weights_reference(base), resolve_weights_reference(finetuned)  # Hub ids: cache
    select(rank, energy)
    if include_other and to_format != "peft":
        raise InvalidOptionError(f"--include-other stores PEFT modules_to_save tensors; {to_format} files have no "
                                 "place for them (use --to peft)")
    check_output(output, force, (base, finetuned))
    adapter, report = extract(base, finetuned, rank=rank, energy=energy, dtype=dtype, include_other=include_other)
    save_adapter(adapter, output, to_format, force=force, inputs=(base, finetuned))
    if as_json:
        echo_json({**report, "output": str(output)})
    else:
        click.echo(render_extract_report(report))
    if not quiet:
        click.echo(f"wrote {output}", err=True)
