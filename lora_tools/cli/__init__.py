"""The ``loratools`` command group. Commands load lazily so that ``loratools --help`` never imports torch."""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from lora_tools import __version__

# command name -> (module, attribute), in the order `--help` lists them.
COMMANDS = {
    "inspect": ("lora_tools.cli.inspect_cmd", "inspect_command"),
    "spectrum": ("lora_tools.cli.spectrum_cmd", "spectrum_command"),
    "compare-quant": ("lora_tools.cli.compare_quant_cmd", "compare_quant_command"),
    "truncate": ("lora_tools.cli.truncate_cmd", "truncate_command"),
    "merge": ("lora_tools.cli.merge_cmd", "merge_command"),
    "similarity": ("lora_tools.cli.similarity_cmd", "similarity_command"),
    "convert": ("lora_tools.cli.convert_cmd", "convert_command"),
    "fold": ("lora_tools.cli.fold_cmd", "fold_command"),
    "extract": ("lora_tools.cli.fold_cmd", "extract_command"),
    "scan": ("lora_tools.cli.scan_cmd", "scan_command"),
}

SHORT_HELP = {
    "inspect": "Structure, scales and exact spectra of every module of an adapter.",
    "spectrum": "Singular values per module, optionally plotted.",
    "compare-quant": "SVD truncation vs INT8/INT4 quantization, measured on real layer outputs.",
    "truncate": "Best rank-k approximation of every module (fixed, energy, dynamic, global budget).",
    "merge": "Merge adapters: exact cat/svd from the factors, or TIES, DARE, magnitude, rank1-topk.",
    "similarity": "Subspace similarity (Hu et al. 2021) and cosine of two adapters' updates, per module.",
    "convert": "Lossless, verified conversion between PEFT, kohya and diffusers.",
    "fold": "Fold an adapter into the base weights (W0 + s·B·A, like PEFT's merge_and_unload).",
    "extract": "Extract a LoRA adapter from a fine-tuned model: best rank-R approximation of W_ft − W0.",
    "scan": "Audit (and right-size) thousands of adapters: JSON lines + report, local pool or Ray.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from a table, not from importing every command (which would import torch).
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP.get(name, "")) for name in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratools")
def cli() -> None:
    """Analyse and compress LoRA adapters (PEFT, kohya/sd-scripts, diffusers), exactly and fast.

    Set LORATOOLS_DEBUG=1 to see a traceback on errors.
    """


def main(argv: list[str] | None = None) -> Any:
    # Before torch (and its OpenMP runtime) is imported by a command: idle OpenMP workers sleep instead of
    # spinning. On a shared 2-core machine spinning workers made compare-quant 4.5x slower (117 s vs 26 s) and
    # tiny QRs 100x slower; on an idle machine the difference is within noise. A user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return cli.main(args=argv, prog_name="loratools")
    except BrokenPipeError:
        from lora_tools.cli._common import quiet_broken_pipe

        quiet_broken_pipe()
