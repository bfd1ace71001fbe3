"""`loratools truncate`: the best rank-k approximation of every module, written as a new adapter."""

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
    resolve_output,
)


@click.command("truncate")
@adapter_argument
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), metavar="OUT",
              help="Output: a folder for --to peft, a .safetensors file for kohya/diffusers.")
# Ranks and fractions are parsed by the library so that "2.5" or "0" get the same one-line error as any other
# bad value (exit 1), not Click's usage error.
@click.option("--rank", default=None, metavar="K", help="Every module to rank min(K, its rank).")
@click.option("--energy", default=None, metavar="F", help="Per module, the smallest rank keeping F of Σσ² (0<F<=1).")
@click.option("--method", default=None, type=click.Choice(["sv_ratio", "sv_fro", "sv_cumulative"]),
              help="kohya resize_lora's dynamic rules (without its extra rank); needs --threshold.")
@click.option("--threshold", default=None, metavar="T", help="Threshold of --method.")
@click.option("--avg-rank", "avg_rank", default=None, metavar="K",
              help="Global budget: the parameters of rank K everywhere, spread for the most retained energy.")
@click.option("--to", "to_format", default=None, type=click.Choice(["peft", "kohya", "diffusers"]),
              help="Output format (default: the input's).")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(["keep", "fp16", "bf16", "fp32"]),
              help="dtype of the written factors.")
@click.option("--allow-nonfinite", is_flag=True, help="Copy modules with NaN/Inf factors unchanged instead of failing.")
@click.option("--base", type=click.Path(path_type=Path), default=None, metavar="MODEL",
              help="Activation-aware: the base model to run: a local transformers folder, a .gguf model file, or "
                   "a Hub id in the local cache (default with --calib: the adapter's base_model_name_or_path, "
                   "resolved the same way).")
@click.option("--calib", default=None, metavar="FILE",
              help="Activation-aware: plain-text calibration file (blank-line-separated documents), or "
                   "'bundled' for the bundled corpus. Minimises the error on layer outputs instead of ‖ΔW − ΔŴ‖.")
@click.option("--max-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Calibration tokens to run (activation-aware only).")
@click.option("--offload", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
              help="Activation-aware: run the base block by block, one decoder block's weights at a time "
                   "(safetensors Llama-family checkpoints); auto streams when the model does not fit --max-memory.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory budget for --offload auto, e.g. 4GB (default: what the machine has free).")
@format_option
@json_option
@quiet_option
@force_option
@error_boundary
def truncate_command(path: Path | None, output: Path, rank: str | None, energy: str | None, method: str | None,
                     threshold: str | None, avg_rank: str | None, to_format: str | None, dtype: str,
                     allow_nonfinite: bool, base: Path | None, calib: str | None, max_tokens: int,
                     offload: str, max_memory: str | None, format_: str | None, as_json: bool, quiet: bool, force: bool) -> None:
    """Truncate the adapter at PATH (default: the bundled example) and write it to OUT.

    Each module's update s·B·A is replaced by its best rank-k approximation (Eckart–Young), computed exactly from
    the factors (QR of B and Aᵀ plus an r x r SVD; the out x in update is never formed). The report gives, per
    module, the kept share of Σσ² and the relative Frobenius error sqrt(1 − that).

    With --base/--calib the rank-k update instead minimises the error on the layer's outputs for real inputs,
    ‖(ΔW − ΔŴ)X‖ (X: the layer's inputs when the base model, adapter applied, runs on the calibration text),
    through an r x r eigenproblem per module; conv and embedding modules keep plain SVD truncation.
    """
    from lora_tools.atomic import check_not_input, check_output
    from lora_tools.formats import load_adapter, save_adapter
    from lora_tools.report.tables import render_truncate_table
    from lora_tools.truncate import select_rule, truncate

    # Validate everything cheap before reading tensors, so that bad options fail fast and write nothing.
    select_rule(rank=rank, energy=energy, method=method, threshold=threshold, avg_rank=avg_rank)
    from lora_tools.model.offload import parse_memory

    memory_budget = parse_memory(max_memory)
    source = default_adapter(path)
    adapter = load_adapter(source, format_)
    inputs = tuple(p for p in (source, adapter.weights_path) if p is not None)
    output = resolve_output(output, to_format or adapter.format)
    check_not_input(output, inputs)
    check_output(output, force, inputs)
    calibration = None
    if base is not None or calib is not None:
        from lora_tools.calibration import collect_covariances

        calib_path = None if calib in (None, "bundled") else Path(calib)
        if not quiet:
            click.echo(f"calibrating: running the base model on up to {max_tokens} tokens", err=True)
        calibration = collect_covariances(adapter, base, calib_path, max_tokens=max_tokens, offload=offload,
                                          max_memory=memory_budget,
                                          plan_sink=None if quiet else lambda line: click.echo(line, err=True))
    with progress_bar(len(adapter.modules), "truncating modules", quiet) as advance:
        result = truncate(adapter, rank=rank, energy=energy, method=method, threshold=threshold,
                          avg_rank=avg_rank, dtype=dtype, allow_nonfinite=allow_nonfinite,
                          covariances=calibration.covariances if calibration else None, progress=advance)
    if calibration is not None:
        result.report["calibration"] = {"base_model": str(calibration.base_path), "source": calibration.source,
                                        "tokens": calibration.tokens, "plain_svd_modules": calibration.skipped}
    save_adapter(result.adapter, output, to_format, force=force, inputs=inputs)
    report = {**result.report, "output": str(output), "output_format": to_format or adapter.format}
    if as_json:
        echo_json(report)
    else:
        click.echo(render_truncate_table(report))
    if not quiet:
        click.echo(f"wrote {output}", err=True)
