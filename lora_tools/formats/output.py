"""Output names that match what a format writes: a PEFT adapter is a folder, kohya and diffusers files are one
``.safetensors`` file.

Two silent surprises this prevents: ``-o lora.safetensors --to peft`` used to create a *folder* called
``lora.safetensors`` (and with ``--force`` replace a file of that name by it), and ``-o lora --to kohya`` wrote an
extension-less file that loaders skip.
"""

from __future__ import annotations

from pathlib import Path

from lora_tools.errors import InvalidOptionError

FOLDER_FORMATS = frozenset({"peft"})
FILE_SUFFIX = ".safetensors"
FORMAT_SUFFIX = {"gguf": ".gguf"}  # llama.cpp GGUF LoRA
# Suffixes that name a single weights file: never a good name for a folder output.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def output_path(path: Path, format: str) -> tuple[Path, str | None]:
    """(the path to write, a note for the user or None) for an output ``path`` in ``format``.

    Folder formats refuse a weights-file name; file formats get ``.safetensors`` added when the name has no
    suffix and refuse another weights suffix (the content would not match the name).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if format in FOLDER_FORMATS:
        if suffix in _FILE_SUFFIXES:
            raise InvalidOptionError(
                f"{path}: a {format} adapter is a folder (adapter_config.json + adapter_model.safetensors), but this "
                f"name ends in {path.suffix}; give a folder name such as {path.with_suffix('')}, or --to kohya / "
                "--to diffusers for a single .safetensors file")
        return path, None
    wanted = FORMAT_SUFFIX.get(format, FILE_SUFFIX)
    container = "GGUF" if wanted == ".gguf" else "safetensors"
    if suffix == wanted:
        return path, None
    if suffix in _FILE_SUFFIXES:
        raise InvalidOptionError(f"{path}: {format} output is written as {container}; name it "
                                 f"{path.with_suffix(wanted)}")
    if path.is_dir():
        raise InvalidOptionError(f"{path}: is a folder, but a {format} adapter is one {wanted} file; give a file "
                                 f"name such as {path / ('adapter' + wanted)}")
    named = path.with_name(path.name + wanted)
    return named, f"writing {named} ({format} adapters are single {wanted} files)"
