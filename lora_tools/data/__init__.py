"""Bundled data: the example adapter (a real PEFT LoRA trained on all-MiniLM-L6-v2)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def example_adapter_path() -> Path:
    """Folder of the bundled example adapter (PEFT format)."""
    return DATA_DIR / "example_adapter"
