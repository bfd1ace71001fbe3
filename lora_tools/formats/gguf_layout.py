"""The bytes of a GGUF file, laid out by hand: header, metadata, tensor table, aligned data.

Written here rather than through ``gguf.GGUFWriter`` so that a conversion can stream tensor data in a few large
writes (GGUFWriter takes one numpy array per tensor and writes each with its own call). The layout is the GGUF
specification's (ggml/docs/gguf.md), version 3, little-endian, as GGUFWriter writes it: magic ``GGUF``, uint32
version, uint64 tensor count, uint64 metadata count; per metadata entry a string key, a uint32 value type and the
value; per tensor a string name, uint32 number of dimensions, uint64 dimensions (fastest-varying first), uint32
ggml type, uint64 offset into the data section; zero padding to the alignment (32, ``general.alignment`` unset);
then each tensor's data, padded to the alignment. Strings are a uint64 byte length and UTF-8 bytes. gguf's own
reader and llama.cpp read these files in the tests (tests/test_gguf_lora.py, tests/test_llamacpp.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
# ggml type ids (ggml.h enum ggml_type) and the bytes one block of each holds: (elements per block, bytes per block)
TYPE_IDS = {"F32": 0, "F16": 1, "Q8_0": 8, "BF16": 30}
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34)}
# metadata value types (gguf.md gguf_metadata_value_type)
UINT32, FLOAT32, STRING = 4, 6, 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: ``shape`` row-major (numpy order), ``offset`` from the start of the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int = 0  # of its data, without padding (lay_out fills it in)

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        """Dimensions as GGUF stores them, fastest-varying first."""
        return tuple(reversed(self.shape))


def tensor_nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    per_block, block_bytes = BLOCKS[ggml_type]
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows * (shape[-1] // per_block) * block_bytes


def padded(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def lay_out(tensors: list[tuple[str, tuple[int, ...], str]]) -> list[TensorEntry]:
    """(name, row-major shape, ggml type) in file order -> entries with their aligned data offsets."""
    entries, offset = [], 0
    for name, shape, ggml_type in tensors:
        entry = TensorEntry(name, tuple(shape), ggml_type, offset, tensor_nbytes(tuple(shape), ggml_type))
        entries.append(entry)
        offset += padded(entry.nbytes)
    return entries


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any) -> bytes:
    if vtype == STRING:
        return struct.pack("<I", STRING) + _string(value)
    if vtype == UINT32:
        return struct.pack("<II", UINT32, value)
    if vtype == FLOAT32:
        return struct.pack("<If", FLOAT32, value)
    raise ValueError(f"GGUF metadata value type {vtype} is not written by loratools")


def header_bytes(metadata: list[tuple[str, int, Any]], entries: list[TensorEntry]) -> bytes:
    """Everything before the data section: header, metadata (key, value type, value), tensor table, padding."""
    parts = [MAGIC, struct.pack("<IQQ", VERSION, len(entries), len(metadata))]
    parts += [_string(key) + _value(vtype, value) for key, vtype, value in metadata]
    for entry in entries:
        dims = entry.gguf_shape
        parts.append(_string(entry.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                       TYPE_IDS[entry.ggml_type], entry.offset))
    header = b"".join(parts)
    return header + bytes(padded(len(header)) - len(header))
