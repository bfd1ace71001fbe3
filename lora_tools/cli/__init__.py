"""The ``loratools`` command group. Commands load lazily so that ``loratools --help`` never imports torch."""

from __future__ import annotations

import importlib
from typing import Any

import click

from lora_tools import __version__

# command name -> (module, attribute), in the order `--help` lists them.
COMMANDS = {
    "inspect": ("lora_tools.cli.inspect_cmd", "inspect_command"),
    "spectrum": ("lora_tools.cli.spectrum_cmd", "spectrum_command"),
    "truncate": ("lora_tools.cli.truncate_cmd", "truncate_command"),
}

SHORT_HELP = {
    "inspect": "Structure, scales and exact spectra of every module of an adapter.",
    "spectrum": "Singular values per module, optionally plotted.",
    "truncate": "Best rank-k approximation of every module (fixed, energy, dynamic, global budget).",
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
    return cli.main(args=argv, prog_name="loratools")
