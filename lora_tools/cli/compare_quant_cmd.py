"""`loratools compare-quant`: SVD truncation vs INT8/INT4 rounding, measured on real layer outputs."""

from __future__ import annotations

from pathlib import Path

import click

from lora_tools.cli._common import (
    adapter_argument,
    default_adapter,
    dump_json,
    echo_json,
    error_boundary,
    force_option,
    format_option,
    json_option,
    progress_bar,
    quiet_option,
)


@click.command("compare-quant")
@adapter_argument
@click.option("--base", "base", type=click.Path(path_type=Path), default=None, metavar="MODEL",
              help="A local transformers folder, a .gguf model file, or a Hub id org/name[@rev] already in the "
                   "local Hugging Face cache (default: the adapter's base_model_name_or_path, resolved the same way; "
                   "the bundled MiniLM / SmolLM2 bases when it names them).")
@click.option("--target", type=click.Choice(["delta", "merged", "base"]), default="delta", show_default=True,
              help="What is stored: the update s·B·A, W0 + s·B·A, or W0 alone.")
@click.option("--ranks", default=None, metavar="LIST",
              help="Ranks for truncation, e.g. 1,2,4,8 (default: 1,2,4,8 for delta, 8,32,128 otherwise).")
@click.option("--schemes", default=None, metavar="LIST",
              help="Quantization schemes (default: int8-tensor,int8-channel,int8-g128,int4-g128,int4-channel).")
@click.option("--calib", default=None, metavar="FILE|random",
              help="Calibration text (blank-line-separated documents), or 'random' for Gaussian inputs "
                   "(default: the bundled standard-library docstrings).")
@click.option("--max-tokens", type=int, default=8192, show_default=True, help="Tokens used in all.")
@click.option("--holdout", type=float, default=0.25, show_default=True,
              help="Share of sequences held out (never used to fit); each side needs at least as many tokens as "
                   "the widest layer has inputs. 0: no hold-out, every error reported in-sample.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Dtype of the model's forward pass (the comparison itself runs in float32/float64).")
@click.option("--end-to-end/--no-end-to-end", "end_to_end", default=None,
              help="Also run every whole-adapter variant through the full model and compare what it predicts with "
                   "the unmodified adapter (KL of next-token distributions, top-1, perplexity; pooled-embedding "
                   "cosine for encoders). Default: on for causal LMs.")
@click.option("--max-kl", type=float, default=None, metavar="X",
              help="Recommend the fewest bytes whose mean per-token KL to the adapter is at most X (nats).")
@click.option("--budget", type=int, default=None, metavar="BYTES",
              help="Recommend the smallest KL (1 − cos for encoders) within BYTES of stored adapter.")
@click.option("--e2e-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Held-out tokens run through the full model for every variant.")
@click.option("--offload", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
              help="Run the base block by block, holding one decoder block's weights at a time (safetensors "
                   "checkpoints of Llama-family models): auto streams when the model does not fit --max-memory.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory budget for --offload auto, e.g. 4GB (default: what the device has free).")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write report.md, report.json and PNG plots to DIR.")
@format_option
@json_option
@quiet_option
@force_option
@error_boundary
def compare_quant_command(path: Path | None, base: Path | None, target: str, ranks: str | None,
                          schemes: str | None, calib: str | None, max_tokens: int, holdout: float, device: str,
                          dtype: str, end_to_end: bool | None, max_kl: float | None, budget: int | None,
                          e2e_tokens: int, offload: str, max_memory: str | None, report_dir: Path | None, format_: str | None, as_json: bool, quiet: bool,
                          force: bool) -> None:
    """Is SVD truncation or integer quantization the smaller error on what each layer outputs?

    Without PATH, runs on the bundled example adapter and MiniLM with the bundled calibration corpus
    (`--example llm`: the bundled SmolLM2 adapter, judged end to end by the model's next-token distributions).
    """
    from lora_tools.compare import CompareOptions, parse_ranks, parse_schemes, prepare_compare
    from lora_tools.compare.frontier import check_recommendation_options
    from lora_tools.formats import load_adapter
    from lora_tools.model.offload import parse_memory
    from lora_tools.report.compare_md import check_report_dir, render_compare_markdown, write_compare_report

    options = CompareOptions(target=target, ranks=parse_ranks(ranks), schemes=parse_schemes(schemes),
                             calib=calib, max_tokens=max_tokens, holdout=holdout, device=device, dtype=dtype,
                             end_to_end=end_to_end, max_kl=max_kl, budget=budget, e2e_tokens=e2e_tokens,
                             offload=offload, max_memory=parse_memory(max_memory),
                             plan_sink=None if quiet else lambda line: click.echo(line, err=True))
    check_recommendation_options(max_kl, budget)
    if report_dir is not None:
        check_report_dir(report_dir, force)
    adapter = load_adapter(default_adapter(path), format_)
    job = prepare_compare(adapter, base, options)
    if job.random:
        click.echo("note: --calib random: errors are measured on synthetic Gaussian inputs N(0, I), not on inputs "
                   "captured from the base model", err=True)
    if job.base_note:
        click.echo(f"note: {job.base_note}", err=True)
    if job.evaluation == "in-sample":
        click.echo(f"warning: --holdout 0: nothing is held out; every error reported is IN-SAMPLE (measured on the "
                   f"{job.counts.calibration} calibration tokens the fits used)", err=True)
    with progress_bar(job.steps, "compare-quant", quiet) as advance:
        report = job.run(progress=advance)
    if report.get("update_note"):
        click.echo(f"note: {report['update_note']}", err=True)
    if report_dir is not None:
        write_compare_report(report, report_dir, force=force, json_text=dump_json(report))
        click.echo(f"wrote {report_dir}/report.md, report.json and plots", err=True)
    if as_json:
        echo_json(report)
        return
    click.echo(render_compare_markdown(report, summary_only=True))
