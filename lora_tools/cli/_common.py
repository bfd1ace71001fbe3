"""What every command shares: options, the error boundary, JSON output, progress bars."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from lora_tools.errors import InvalidOptionError, LoraToolsError, user_message
from lora_tools.jsonsafe import finite_json

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
force_option = click.option("--force", is_flag=True, help="Overwrite existing outputs.")
# The readers' names (lora_tools.formats.FORMATS), listed here so that `--help` needs no import of the readers.
INPUT_FORMATS = ["peft", "kohya", "diffusers", "lora_diffusion", "lycoris", "peft_lycoris", "gguf"]
format_option = click.option("--format", "format_", type=click.Choice(INPUT_FORMATS),
                             default=None, help="Input format (default: detected).")
EXAMPLES = {"minilm": "all-MiniLM-L6-v2 encoder, r=16", "llm": "SmolLM2-135M-Instruct, r=8, all seven linear kinds"}


def adapter_argument(func: Callable[..., Any]) -> Callable[..., Any]:
    """PATH (optional; a local adapter or a cached Hub id org/name[@rev][:subfolder]) plus --example, which
    picks the bundled adapter used without PATH; --example is read back by ``default_adapter``."""

    def remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            ctx.meta["loratools.example"] = value
        return value

    func = click.option("--example", type=click.Choice(list(EXAMPLES)), default=None, expose_value=False,
                        callback=remember, help="Without PATH, use this bundled example adapter (default minilm): "
                        + "; ".join(f"{k}: {v}" for k, v in EXAMPLES.items()) + ".")(func)
    return click.argument("path", required=False, type=click.Path(path_type=Path))(func)


def default_adapter(path: Path | None) -> Path:
    """PATH resolved (a Hub id from the local cache only), else the --example adapter (default: minilm)."""
    context = click.get_current_context(silent=True)
    example = context.meta.get("loratools.example") if context is not None else None
    if path is not None:
        if example is not None:
            raise InvalidOptionError(f"{path}: give an adapter PATH or --example {example}, not both")
        from lora_tools.model.resolve import resolve_adapter_reference

        return resolve_adapter_reference(path)
    from lora_tools.data import example_adapter_path

    return example_adapter_path(example or "minilm")


def fail(message: str, as_json: bool = False) -> None:
    """One ``error: ...`` line on stderr and exit status 1; with --json also a JSON error object on stdout, so a
    script reading stdout gets a document either way."""
    click.echo(f"error: {message}", err=True)
    if as_json:
        with contextlib.suppress(OSError):
            click.echo(json.dumps({"error": message, "exit_status": 1}))
    sys.exit(1)


def quiet_broken_pipe() -> None:
    """`loratools inspect --json | head`: the reader went away with what it wanted. Not an error: exit 0, and point
    stdout at /dev/null so that the interpreter's final flush does not print "Exception ignored ... BrokenPipe"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


def error_boundary(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map the library's errors (and OS errors) to one `error: ...` line and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("LORATOOLS_DEBUG") == "1":
            return func(*args, **kwargs)
        as_json = bool(kwargs.get("as_json"))
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:
            quiet_broken_pipe()
        except (LoraToolsError, OSError, MemoryError) as exc:
            fail(user_message(exc), as_json)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def resolve_output(output: Path, format: str) -> Path:
    """The output path a writer of ``format`` will use (``.safetensors`` added to a bare file name, a file name
    for a folder format refused), said on stderr (even with --quiet) when it differs from what was typed."""
    from lora_tools.formats.output import output_path

    path, note = output_path(output, format)
    if note:
        click.echo(note, err=True)
    return path


def _one_line(text: str) -> str:
    return " ".join(text.split())


def dump_json(document: dict[str, Any]) -> str:
    """Strict JSON (NaN/Inf become null)."""
    return json.dumps(finite_json(document), indent=2, allow_nan=False)


def echo_json(document: dict[str, Any]) -> None:
    click.echo(dump_json(document))


@contextlib.contextmanager
def progress_bar(length: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (shown only on a terminal and without --quiet)."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update
