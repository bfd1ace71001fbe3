"""Read a GGUF file's header (metadata and tensor table) without loading any weights.

Used to refuse a ``.gguf`` that is not a model (a GGUF LoRA adapter, a vocabulary-only file, garbage) before
transformers spends seconds on it, and to describe how the weights are stored (the note every report prints).

Layout, from the GGUF specification (ggml/docs/gguf.md): magic ``GGUF``, uint32 version (2 or 3), uint64
tensor count, uint64 metadata count; each metadata entry is a string key, a uint32 value type and the value
(arrays: uint32 element type, uint64 length, elements); then per tensor a string name, uint32 number of dims,
uint64 dims, uint32 ggml type, uint64 offset. Strings are a uint64 length and UTF-8 bytes; all little-endian.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.errors import BaseModelError

MAGIC = b"GGUF"
# value type -> struct format of the scalar types (8 = string, 9 = array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_STRUCTS: dict[str, struct.Struct] = {}
# A header larger than this is not a sane GGUF (SmolLM2's, with a 49k-token vocabulary, is ~2 MB).
_MAX_COUNT = 10_000_000


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    type_id: int
    offset: int = 0  # of its data, from the start of the data section


@dataclass
class GGUFInfo:
    """A GGUF header: scalar/string metadata (arrays reduced to their length) and the tensor table."""

    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)
    data_offset: int = 0  # where the data section starts: the header's end padded to general.alignment

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def file_type(self) -> str | None:
        """``general.type`` ("model", "adapter", "vocab", ...); absent in older files, which are models."""
        value = self.metadata.get("general.type")
        return value if isinstance(value, str) else None

    @property
    def has_tokenizer(self) -> bool:
        return self.array_lengths.get("tokenizer.ggml.tokens", 0) > 0

    def weight_types(self) -> Counter[str]:
        """How many 2-D (matrix) tensors each storage type holds, e.g. {"Q4_1": 211, "Q6_K": 1}."""
        return Counter(type_name(t.type_id) for t in self.tensors if len(t.shape) >= 2)


def type_name(type_id: int) -> str:
    """The ggml type's name (Q4_1, F16, ...), from the ``gguf`` package's table when installed."""
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type{type_id}"


class _Cursor:
    def __init__(self, buffer: Any, path: Path) -> None:
        self.buffer, self.offset, self.path = buffer, 0, path

    def unpack(self, fmt: str) -> Any:
        return self.unpack_many(fmt)[0]

    def unpack_many(self, fmt: str) -> tuple[Any, ...]:
        layout = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))  # compiled once per format
        try:
            values = layout.unpack_from(self.buffer, self.offset)
        except struct.error:
            raise BaseModelError(f"{self.path}: GGUF header is truncated at byte {self.offset}") from None
        self.offset += layout.size
        return values

    def count(self, what: str) -> int:
        value = self.unpack("<Q")
        if value > _MAX_COUNT:
            raise BaseModelError(f"{self.path}: corrupt GGUF header ({what} {value} at byte {self.offset - 8})")
        return value

    def string(self) -> str:
        length = self.count("string length")
        raw = bytes(self.buffer[self.offset:self.offset + length])
        if len(raw) != length:
            raise BaseModelError(f"{self.path}: GGUF header is truncated at byte {self.offset}")
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self.unpack(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        raise BaseModelError(f"{self.path}: corrupt GGUF header (unknown value type {type_id})")

    def skip_array(self, element_type: int, length: int) -> None:
        if element_type in _SCALARS:
            self.offset += struct.calcsize(_SCALARS[element_type]) * length
        elif element_type == _STRING:
            for _ in range(length):
                self.offset += 8 + self.unpack("<Q")
        else:  # nested arrays do not occur in models; refusing beats guessing sizes
            raise BaseModelError(f"{self.path}: unsupported GGUF array of type {element_type}")
        if self.offset > len(self.buffer):
            raise BaseModelError(f"{self.path}: GGUF header is truncated (array past the end of the file)")


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header of ``path``; ``BaseModelError`` when it is not a GGUF file."""
    if not path.is_file():
        raise BaseModelError(f"{path}: GGUF file not found")
    with path.open("rb") as handle:
        if handle.read(4) != MAGIC:
            raise BaseModelError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        handle.seek(0)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(buffer, path)


def _parse(buffer: Any, path: Path) -> GGUFInfo:
    cursor = _Cursor(buffer, path)
    cursor.offset = 4
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise BaseModelError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = cursor.count("tensor count")
    n_metadata = cursor.count("metadata count")
    info = GGUFInfo(path, version)
    for _ in range(n_metadata):
        key = cursor.string()
        type_id = cursor.unpack("<I")
        if type_id == _ARRAY:
            element_type = cursor.unpack("<I")
            length = cursor.count("array length")
            info.array_lengths[key] = length
            cursor.skip_array(element_type, length)
        else:
            info.metadata[key] = cursor.value(type_id)
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > 8:
            raise BaseModelError(f"{path}: corrupt GGUF tensor table ({name}: {n_dims} dimensions)")
        shape = cursor.unpack_many(f"<{n_dims}Q")
        type_id, offset = cursor.unpack_many("<IQ")
        info.tensors.append(GGUFTensor(name, shape, type_id, offset))
    alignment = info.metadata.get("general.alignment", 32)
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
    info.data_offset = -(-cursor.offset // alignment) * alignment
    return info


def check_gguf_model(path: Path) -> GGUFInfo:
    """The header of a GGUF *model* with weights and a tokenizer; anything else is a one-line error."""
    info = read_gguf_info(path)
    kind = info.file_type
    if kind == "adapter" or "adapter.type" in info.metadata or "adapter.lora.alpha" in info.metadata:
        raise BaseModelError(f"{path}: this GGUF is a LoRA adapter (general.type={kind!r}), not a base model; "
                             "pass it as the adapter, or pass the model it was made for as --base")
    if kind not in (None, "model"):
        raise BaseModelError(f"{path}: this GGUF is a {kind!r} file, not a model")
    if not info.tensors:
        raise BaseModelError(f"{path}: this GGUF holds no tensors (a vocabulary-only file?), not a model")
    if info.architecture is None:
        raise BaseModelError(f"{path}: this GGUF names no architecture (general.architecture), so transformers "
                             "cannot build a model from it")
    return info


# Bits per weight of the block formats a note should explain: (bits, block size).
_BLOCK_FORMATS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q8_0": (8, 32),
                  "Q2_K": (2, 256), "Q3_K": (3, 256), "Q4_K": (4, 256), "Q5_K": (5, 256), "Q6_K": (6, 256)}


def quantization_note(info: GGUFInfo) -> str | None:
    """One sentence on how the base's weights were stored, when they are quantized; None for F32/F16/BF16."""
    types = info.weight_types()
    quantized = {name: n for name, n in types.items() if name not in ("F32", "F16", "BF16")}
    if not quantized:
        return None
    main, _ = max(quantized.items(), key=lambda item: item[1])
    bits, block = _BLOCK_FORMATS.get(main, (None, None))
    stored = f"{main} ({bits}-bit, blocks of {block})" if bits else main
    others = sorted(set(quantized) - {main})
    extra = f"; also {', '.join(others)}" if others else ""
    return (f"base weights are {stored}{extra} from {info.path.name}, dequantized to float: a quantization "
            f"scheme on the base's own grid (--target base, {bits or 'same'}-bit, groups of {block or 'the same size'}) "
            "can reproduce them exactly and look perfect")
