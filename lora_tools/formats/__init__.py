"""Format registry and detection.

Each format module has the same small surface: ``sniff_keys(keys) -> bool``, ``read(path) -> Adapter`` and
``write(adapter, path, force=...)`` (atomic; ``save_adapter`` below adds the output checks). Adding a format means one file and one line in ``FORMATS``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from lora_tools.adapter import Adapter
from lora_tools.errors import AdapterFormatError, InvalidOptionError
from lora_tools.formats import diffusers, gguf_lora, kohya, lora_diffusion, lycoris, peft, peft_lycoris
from lora_tools.formats.common import refuse_non_lora
from lora_tools.tensorfile import open_tensor_file

# Order matters for sniffing: the first format whose sniff_keys accepts the keys wins.
FORMATS: dict[str, ModuleType] = {"peft": peft, "kohya": kohya, "diffusers": diffusers,
                                   "lora_diffusion": lora_diffusion}
# Structured updates read as exact LoRA (issue 10); their adapters report the naming they use (kohya, peft).
FORMATS.update({"lycoris": lycoris, "peft_lycoris": peft_lycoris})
FORMATS["gguf"] = gguf_lora  # llama.cpp GGUF LoRA (issue 11); detected by its magic, not by tensor names
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _weights_in_folder(path: Path) -> Path:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise AdapterFormatError(
            f"{path}: no adapter files here (expected adapter_config.json + adapter_model.safetensors, "
            "or a .safetensors/.bin LoRA file)"
        )
    safetensors_files = [p for p in files if p.suffix == ".safetensors"]
    chosen = (safetensors_files or files)
    if len(chosen) > 1:
        names = ", ".join(p.name for p in chosen)
        raise AdapterFormatError(f"{path}: several weight files ({names}); pass one of them")
    return chosen[0]


def resolve(path: Path) -> tuple[Path, str]:
    """The file or folder to read and its format, from the path and the tensor names."""
    if not path.exists():
        raise AdapterFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        if peft.sniff(path):
            return path, "peft_lycoris" if peft_lycoris.sniff(path) else "peft"
        path = _weights_in_folder(path)
    if peft.sniff(path):
        return path, "peft_lycoris" if peft_lycoris.sniff(path) else "peft"
    if gguf_lora.sniff(path):
        return path, "gguf"
    keys = list(open_tensor_file(path).infos())
    if lycoris.sniff_keys(keys):  # LyCORIS tensors (hada_*, lokr_*, lora_mid, .diff, norm diffs)
        return path, "lycoris"
    refuse_non_lora(path, keys)
    for name, module in FORMATS.items():
        if module.sniff_keys(keys):
            return path, name
    sample = ", ".join(keys[:3]) or "no tensors"
    raise AdapterFormatError(f"{path}: not a recognised LoRA adapter (no lora_A/lora_B, lora_down/lora_up or "
                             f"lora.down/lora.up tensors; first keys: {sample})")


def detect(path: str | Path) -> str:
    return resolve(Path(path))[1]


def load_adapter(path: str | Path, format: str | None = None) -> Adapter:
    """Read an adapter file or folder in any supported format (auto-detected unless ``format`` is given)."""
    path = Path(path)
    if format is not None:
        if format not in FORMATS:
            raise InvalidOptionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        if not path.exists():
            raise AdapterFormatError(f"{path}: no such file or directory")
        return FORMATS[format].read(path)
    target, name = resolve(path)
    adapter = FORMATS[name].read(target)
    adapter.path = path
    return adapter


def save_adapter(adapter: Adapter, path: str | Path, format: str | None = None, *, force: bool = False,
                 inputs: tuple[Path, ...] = ()) -> Path:
    """Write ``adapter`` in ``format`` (default: its own) atomically; ``inputs`` are paths it must not overwrite."""
    from lora_tools.atomic import check_not_input, check_output
    from lora_tools.formats.output import output_path

    format = format or adapter.format
    if format not in FORMATS:
        raise InvalidOptionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    path, _ = output_path(Path(path), format)  # the CLI shows the note; callers get the path actually written
    check_not_input(path, inputs)
    check_output(path, force, inputs)
    return FORMATS[format].write(adapter, path, force=force)
