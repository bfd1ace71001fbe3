"""`loratools convert`: PEFT <-> kohya <-> diffusers, and to llama.cpp GGUF, verified before anything is written."""

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
    resolve_output,
)
from lora_tools.errors import InvalidOptionError


@click.command("convert")
@click.argument("source", type=click.Path(path_type=Path), metavar="IN")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), metavar="OUT",
              help="Output: a folder for --to peft, a .safetensors file for kohya/diffusers, a .gguf file for gguf.")
@click.option("--to", "to_format", required=True, type=click.Choice(["peft", "kohya", "diffusers", "gguf"]),
              help="Target format (gguf: a llama.cpp LoRA for the base model).")
@click.option("--base", default=None, metavar="MODEL",
              help="Resolve kohya names against this base model: a transformers model folder, a diffusers "
                   "pipeline folder, or any safetensors file listing the base's weights. For --to gguf: the base "
                   "(model folder, .gguf file or cached Hub id) whose architecture and tensor names the LoRA gets; "
                   "default: the adapter's base_model_name_or_path.")
@click.option("--dtype", "dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16", "q8_0"]),
              help="--to gguf only: store factors as this type (default: as stored). q8_0 applies where a row "
                   "holds a multiple of 32 values; other tensors are written as fp16 (said in the output).")
@click.option("--prefix", default=None, metavar="unet|te|te1|te2",
              help="Which model a PEFT adapter belongs to (kohya lora_<prefix>_ names, diffusers component); "
                   "for --to peft, the component to take from a multi-model file.")
@click.option("--allow-partial", is_flag=True,
              help="Drop kohya modules whose names cannot be resolved; write a fused layer (Flux qkv/linear1) whose "
                   "file lacks some parts with zero rows for them.")
@click.option("--allow-nonfinite", is_flag=True, help="Copy modules with NaN/Inf factors as stored instead of failing.")
@format_option
@json_option
@quiet_option
@force_option
@error_boundary
def convert_command(source: Path, output: Path, to_format: str, base: str | None, dtype: str | None,
                    prefix: str | None, allow_partial: bool, allow_nonfinite: bool, format_: str | None,
                    as_json: bool, quiet: bool, force: bool) -> None:
    """Convert the adapter IN to another format, losslessly.

    Factors are copied as stored; each module's scale is carried over (PEFT rank/alpha patterns and rsLoRA,
    kohya per-module .alpha, diffusers network alphas). kohya names lost their dots, so kohya input is resolved
    against real module names: those loratools recorded when it wrote the file, --base, or built-in SD UNet /
    CLIP text-encoder / SDXL / Flux / Wan lists; unresolvable names are listed and refused unless --allow-partial.
    SDXL, Flux.1 and Wan adapters change naming with the format (kohya/ComfyUI: the model's own layers; diffusers
    and PEFT: diffusers' layers); Flux's fused layers are split (B by rows; A too when B is block-diagonal) or
    fused (A stacked, B block-diagonal) exactly. Every conversion
    is written to a staging file, read back, and compared module by module with the input (factors bit for bit,
    scales exactly or to a reported relative difference) before it is moved to OUT.
    """
    from lora_tools.convert.run import convert
    from lora_tools.report.merge import render_convert_report

    if dtype is not None and to_format != "gguf":
        raise InvalidOptionError(f"--dtype applies to --to gguf only (convert --to {to_format} copies factors as "
                                 "stored)")
    output = resolve_output(output, to_format)
    # --to gguf resolves Hub ids and bundled names itself; the other targets take a local path
    base_arg = base if to_format == "gguf" or base is None else Path(base)
    report = convert(source, output, to_format, base=base_arg, prefix=prefix, allow_partial=allow_partial,
                     force=force, input_format=format_, allow_nonfinite=allow_nonfinite, dtype=dtype)
    if as_json:
        echo_json(report)
    else:
        click.echo(render_convert_report(report))
    if not quiet:
        click.echo(f"wrote {output}", err=True)
