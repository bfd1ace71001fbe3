"""One error hierarchy for the whole toolkit.

Every failure that a user can cause (a bad file, a bad option) is a ``LoraToolsError``; the CLI turns it into one
``error: ...`` line on stderr and exit status 1. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class LoraToolsError(Exception):
    """Base class of every error loratools raises on purpose."""


class AdapterFormatError(LoraToolsError, ValueError):
    """An input file or folder is not a readable adapter (corrupt, truncated, inconsistent)."""


class UnsupportedAdapterError(AdapterFormatError):
    """A well-formed adapter of a kind loratools does not handle (IA3, LoHa, LoKr, AdaLoRA, ...)."""


class UnsafeFileError(AdapterFormatError):
    """A file whose loading would execute code (a pickle with objects other than tensors)."""


class ModuleMismatchError(LoraToolsError, ValueError):
    """Factors, configs or adapters that do not fit together (shapes, ranks, module sets)."""


class OutputExistsError(LoraToolsError, FileExistsError):
    """An output path exists and --force was not given."""


class InvalidOptionError(LoraToolsError, ValueError):
    """An option value that parses but makes no sense (rank <= 0, energy outside (0, 1], ...)."""


class BaseModelError(LoraToolsError, ValueError):
    """A base model that cannot be found, loaded or matched to the adapter (missing files, unknown name)."""


def user_message(exc: BaseException) -> str | None:
    """The one line a user sees after ``error:`` for a failure of theirs (bad input: our errors, OS errors, memory),
    or None for an exception that is a bug. The CLI's error boundary and ``scan``'s error lines both use it, so a
    file reads the same in either."""
    if isinstance(exc, LoraToolsError):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        text = f"{where}{exc.strerror or exc}"
    elif isinstance(exc, MemoryError):
        text = "out of memory"
    else:
        return None
    return " ".join(text.split())
