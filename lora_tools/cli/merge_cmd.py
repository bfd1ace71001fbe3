"""`loratools merge`: combine several adapters into one, exactly where possible."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._common import (
    echo_json,
    error_boundary,
    force_option,
    json_option,
    progress_bar,
    quiet_option,
    resolve_output,
)

METHOD_HELP = """Methods (--method):

\b
  cat         exact: B = [w1·s1·B1, w2·s2·B2, ...], A = [A1; A2; ...], rank Σ r_i, scale 1.
  svd         exact best rank-R (or energy-F) approximation of Σ w_i·ΔW_i from the stacked factors
              (QR + small core SVD, never the dense update; default R = largest input rank).
  rank1-topk  keep the R largest weighted rank-one components σ_j·u_j·v_jᵀ pooled from every input's exact
              SVD (default R = mean input rank); data-free and cheap, not optimal: the report shows its
              error next to svd's at the same rank.
  ties        TIES-Merging (Yadav et al. 2023): trim to --density, elect signs, disjoint mean.
  dare        DARE (Yu et al. 2023): random drop to --density, rescale by 1/density, weighted sum (--seed).
  magnitude   magnitude pruning of each w_i·ΔW_i to --density, then the weighted sum.

ties, dare and magnitude are defined entry-wise on ΔW: they build each module's dense out x in update (one module
at a time, so memory stays bounded by one module) and end with a dense rank-R SVD (default R = largest input
rank). Default --density 0.2.

\b
Refused unless told otherwise:
  - inputs of different base models (base_model_name_or_path, kohya ss_base_model_version), or an input that
    shares no module with the others: --allow-different-bases merges them anyway (e.g. disjoint layers);
  - inputs carrying different whole tensors (modules_to_save copies such as a classification head): --heads first
    keeps the first adapter's, average their mean, drop none (then modules_to_save and a SEQ_CLS/TOKEN_CLS/
    QUESTION_ANS task_type are removed from the config). One input's, or identical, heads are kept as they are.
"""


@click.command("merge", epilog=METHOD_HELP)
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), metavar="OUT",
              help="Output: a folder for PEFT, a .safetensors file for kohya/diffusers.")
# Parsed by the library, so that a bad value gets the same one-line error (exit 1) as any other bad input.
@click.option("--method", default="cat", show_default=True, metavar="M",
              help="cat, svd, rank1-topk, ties, dare or magnitude (see below).")
@click.option("--weights", default=None, metavar="W1,W2,...", help="One weight per adapter (default 1 each).")
@click.option("--rank", default=None, metavar="R", help="Output rank per module (not for cat).")
@click.option("--energy", default=None, metavar="F", help="Per module, the smallest rank keeping F of Σσ² (0<F<=1).")
@click.option("--density", default=None, metavar="D", help="Share of entries kept by ties/dare/magnitude, in (0, 1].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of DARE's random masks.")
@click.option("--to", "to_format", default=None, type=click.Choice(["peft", "kohya", "diffusers"]),
              help="Output format (default: the first adapter's).")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(["keep", "fp16", "bf16", "fp32"]),
              help="dtype of the written factors (keep: the widest input dtype of each module).")
@click.option("--heads", default=None, metavar="first|average|drop",
              help="What to keep of modules_to_save heads that differ between the inputs (see below).")
@click.option("--allow-different-bases", is_flag=True,
              help="Merge adapters of different (or unrelated) base models anyway.")
@json_option
@quiet_option
@force_option
@error_boundary
def merge_command(adapters: tuple[Path, ...], output: Path, method: str, weights: str | None, rank: str | None,
                  energy: str | None, density: str | None, seed: int, to_format: str | None, dtype: str,
                  heads: str | None, allow_different_bases: bool, as_json: bool, quiet: bool, force: bool) -> None:
    """Merge ADAPTERS into OUT (one adapter with weight 1 is reproduced by cat and svd).

    The merged update of each module is Σ w_i·ΔW_i over the adapters that have it (ΔW_i with each adapter's own
    rank, alpha, rsLoRA and rank/alpha patterns). The report gives, per module, the input and output ranks, the
    relative Frobenius error against that exact weighted sum, and how much the inputs interfere.
    """
    from lora_tools.atomic import check_not_input, check_output
    from lora_tools.formats import load_adapter, save_adapter
    from lora_tools.merge.run import merge_adapters, validate_options
    from lora_tools.report.merge import render_merge_table

    validate_options(method, len(adapters), weights=weights, rank=rank, energy=energy, density=density,
                     dtype=dtype, heads=heads)
    loaded = [load_adapter(path) for path in adapters]
    inputs = tuple(p for a, path in zip(loaded, adapters, strict=True) for p in (path, a.weights_path) if p)
    output = resolve_output(output, to_format or loaded[0].format)
    check_not_input(output, inputs)
    check_output(output, force, inputs)
    total = len({name for a in loaded for name in a.modules})
    with progress_bar(total, "merging modules", quiet) as advance:
        result = merge_adapters(loaded, method, weights=weights, rank=rank, energy=energy, density=density,
                                seed=seed, dtype=dtype, heads=heads, allow_different_bases=allow_different_bases,
                                progress=advance)
    save_adapter(result.adapter, output, to_format, force=force, inputs=inputs)
    report = {**result.report, "output": str(output), "output_format": to_format or result.adapter.format}
    if as_json:
        echo_json(report)
    else:
        click.echo(render_merge_table(report))
    if not quiet:
        click.echo(f"wrote {output}", err=True)
