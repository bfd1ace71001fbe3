"""Lazy, validated access to the tensors of one weight file (safetensors or a PyTorch ``.bin``).

The safetensors header is parsed and checked here before any tensor is touched: a header that lies about sizes or
offsets, a truncated file or a Git LFS pointer gives an ``AdapterFormatError`` that names the file, instead of a
crash (or a huge allocation) deep inside a reader. Tensors are then read one at a time through
``safetensors.safe_open`` (memory-mapped), so peak memory stays near one module's factors.

``.bin`` files are loaded with ``torch.load(weights_only=True)`` only: a pickle carrying anything but tensors is
refused, never executed.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lora_tools.errors import AdapterFormatError, UnsafeFileError, UnsupportedAdapterError

# Refuse headers above this size before reading them (a hostile length field must not make us allocate).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype string -> bytes per element.
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

_TORCH_TO_ST = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.bool": "BOOL", "torch.complex64": "C64", "torch.complex128": "C128",
    "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}

LFS_POINTER_PREFIX = b"version https://git-lfs"


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    """safetensors dtype -> torch dtype, built on first use (importing torch is slow)."""
    import torch

    return {st: getattr(torch, name.split(".")[1]) for name, st in _TORCH_TO_ST.items()
            if hasattr(torch, name.split(".")[1])}


def torch_dtype(dtype: str) -> Any:
    """The torch dtype of a safetensors dtype string (F32, BF16, ...), or None when torch has none."""
    return _torch_dtypes().get(dtype)


@dataclass(frozen=True)
class TensorInfo:
    """What a file says about one tensor, known without reading its data."""

    key: str
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_ITEMSIZE.get(self.dtype, 0)

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype, "shape": list(self.shape)}


class TensorSource(Protocol):
    """The surface every reader uses: keys and shapes up front, tensors on demand."""

    path: Path
    metadata: dict[str, str]

    def infos(self) -> dict[str, TensorInfo]: ...

    def get(self, key: str) -> Any: ...  # torch.Tensor


def check_not_lfs_pointer(path: Path, head: bytes) -> None:
    if head.startswith(LFS_POINTER_PREFIX):
        raise AdapterFormatError(
            f"{path}: this is a Git LFS pointer file, not the weights; fetch the real file (git lfs pull)"
        )


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return (tensor infos by key, ``__metadata__``)."""
    infos, metadata, _, _ = _read_header(path)
    return infos, metadata


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, tuple[int, int]], int]:
    """(infos, metadata, data_offsets by key, byte offset of the data section) of a validated header."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            check_not_lfs_pointer(path, head + handle.read(32))
            if size == 0:
                raise AdapterFormatError(f"{path}: empty file (0 bytes), not a safetensors file")
            if size < 8:
                raise AdapterFormatError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise AdapterFormatError(
                    f"{path}: safetensors header length {header_len} exceeds the {MAX_HEADER_BYTES} byte limit"
                )
            if 8 + header_len > size:
                raise AdapterFormatError(
                    f"{path}: safetensors header length {header_len} is larger than the file ({size} bytes): "
                    "truncated or not a safetensors file"
                )
            handle.seek(8)
            raw = handle.read(header_len)
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFormatError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        infos[key] = _validate_entry(path, key, entry, data_len)
        begin, end = entry["data_offsets"]
        if end > begin:
            spans.append((begin, end, key))
    offsets = {key: (begin, end) for begin, end, key in spans}
    spans.sort()
    for (_, prev_end, prev_key), (begin, _, key) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise AdapterFormatError(f"{path}: tensors {prev_key!r} and {key!r} overlap in the data section")
    return infos, dict(metadata), offsets, 8 + header_len


def _validate_entry(path: Path, key: str, entry: Any, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise AdapterFormatError(f"{path}: header entry for tensor {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_ITEMSIZE:
        raise AdapterFormatError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise AdapterFormatError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise AdapterFormatError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise AdapterFormatError(
            f"{path}: tensor {key!r} data_offsets [{begin}, {end}] fall outside the data section "
            f"({data_len} bytes): truncated or corrupt file"
        )
    info = TensorInfo(key, dtype, tuple(shape))
    if info.nbytes != end - begin:
        raise AdapterFormatError(
            f"{path}: tensor {key!r} of shape {list(shape)} and dtype {dtype} needs {info.nbytes} bytes "
            f"but its data_offsets cover {end - begin}"
        )
    return info


class SafetensorsSource:
    """A safetensors file: validated header now, one tensor at a time on demand.

    Tensors are read with plain positioned reads into fresh buffers rather than through a memory map: a map's
    touched pages stay in the process's resident set until the kernel reclaims them, so reading a 1 GB adapter
    module by module would still look like 1 GB of RSS. Here memory holds the tensors the caller keeps.
    """

    def __init__(self, path: Path):
        self.path = path
        self._infos, self.metadata, self._offsets, self._data_start = _read_header(path)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def byte_range(self, key: str) -> tuple[int, int]:
        """(file offset, byte count) of a tensor's data: lets a writer copy stored bytes without decoding them."""
        begin, end = self._offsets.get(key, (0, 0))
        return self._data_start + begin, end - begin

    def get(self, key: str) -> Any:
        import torch

        info = self._infos.get(key)
        if info is None:
            raise AdapterFormatError(f"{self.path}: no tensor {key!r}")
        dtype = torch_dtype(info.dtype)
        if dtype is None:
            raise AdapterFormatError(f"{self.path}: tensor {key!r} has dtype {info.dtype}, which torch cannot hold")
        begin, end = self._offsets.get(key, (0, 0))
        buffer = bytearray(end - begin)
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._data_start + begin)
                got = handle.readinto(buffer)
        except OSError as exc:
            raise AdapterFormatError(f"{self.path}: cannot read tensor {key!r}: {exc.strerror or exc}") from exc
        if got != len(buffer):
            raise AdapterFormatError(f"{self.path}: tensor {key!r} is cut short (file changed or truncated)")
        if not buffer:
            return torch.empty(info.shape, dtype=dtype)
        # safetensors stores little-endian, like every platform torch runs on here.
        return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


class MemorySource:
    """Tensors held in memory (e.g. a freshly truncated adapter), with the same surface as a file source.

    ``path`` only names where the tensors came from, for messages; nothing is read from it.
    """

    def __init__(self, tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None):
        self.path = path
        self.metadata = dict(metadata or {})
        self._tensors = tensors
        self._infos = {
            key: TensorInfo(key, safetensors_dtype(t), tuple(t.shape)) for key, t in tensors.items()
        }

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, key: str) -> Any:
        if key not in self._tensors:
            raise AdapterFormatError(f"{self.path}: no tensor {key!r} (in memory)")
        return self._tensors[key]


class StateDictSource(MemorySource):
    """A PyTorch pickle (``.bin``/``.pt``) loaded with ``weights_only=True``: a flat mapping of tensors."""

    def __init__(self, path: Path):
        import pickle

        import torch

        try:
            size = path.stat().st_size
            with path.open("rb") as handle:
                check_not_lfs_pointer(path, handle.read(40))
        except OSError as exc:
            raise AdapterFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        if size == 0:
            raise AdapterFormatError(f"{path}: empty file (0 bytes), not a PyTorch weights file")
        try:
            state = _torch_load_weights_only(torch, path)
        except pickle.UnpicklingError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsafeFileError(
                f"{path}: refused: unsafe pickle content (objects other than tensors; "
                f"loaded with weights_only=True): {first_line}"
            ) from exc
        except Exception as exc:
            raise AdapterFormatError(
                f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        if isinstance(state, list) and state and all(isinstance(t, torch.Tensor) for t in state):
            # cloneofsimo/lora's save_lora_weight: [up0, down0, up1, ...], no names, ranks or target classes
            raise UnsupportedAdapterError(
                f"{path}: cloneofsimo lora_diffusion pickled list of {len(state)} tensors (up/down pairs identified "
                "only by their order, with no ranks or target classes); re-save it as safetensors "
                "(lora_diffusion's convert_loras_to_safeloras) and read that")
        if not isinstance(state, dict):
            raise AdapterFormatError(f"{path}: expected a mapping of tensor names to tensors, found "
                                     f"{type(state).__name__}")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise AdapterFormatError(f"{path}: entry {bad[0]!r} is not a tensor; expected a flat state dict")
        super().__init__(state, path)


def _torch_load_weights_only(torch: Any, path: Path) -> Any:
    # mmap keeps memory bounded for the zip format; the legacy (pre-1.6) format cannot be mapped.
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc).lower():
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def open_tensor_file(path: Path) -> TensorSource:
    """Open a weight file by its content: safetensors unless it is a zip/legacy pickle."""
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return StateDictSource(path)
    return SafetensorsSource(path)


def safetensors_dtype(tensor: Any) -> str:
    """The safetensors spelling (F32, F16, ...) of a torch tensor's dtype."""
    return _TORCH_TO_ST.get(str(tensor.dtype), str(tensor.dtype))
