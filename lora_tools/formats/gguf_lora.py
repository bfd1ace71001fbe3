"""llama.cpp GGUF LoRA adapters: one ``.gguf`` file with ``general.type = adapter``.

What llama.cpp reads (src/llama-adapter.cpp, llama_adapter_lora_init_impl): ``general.type = "adapter"``,
``general.architecture`` equal to the base's, ``adapter.type = "lora"``, one float32 ``adapter.lora.alpha`` for all
tensors, and per adapted base tensor ``<name>.lora_a`` / ``<name>.lora_b``, where ``<name>`` is the base tensor's
own name (``blk.0.attn_q.weight``). In GGUF's dimension order (fastest first) lora_a is [in, r] and lora_b [r, out],
i.e. A (r, in) and B (out, r) in row-major terms, like PEFT; ``token_embd`` is the exception (lora_a holds A
transposed, see llm_build_inp_embd). At run time the scale is ``alpha / r`` with r = lora_b's first dimension, and
plain 1 when alpha is 0 (llama-graph.cpp ``build_lora_mm``).

Reading maps tensor names back to transformers module names (names loratools recorded when it wrote the file,
else the inverse of gguf's name map), undoes the Llama q/k row permutation when the head counts are known, and
dequantizes Q8_0 and the other block formats with the ``gguf`` package. Writing lives in ``gguf_write.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import AdapterFormatError, BaseModelError, ModuleMismatchError
from lora_tools.formats import gguf_names
from lora_tools.tensorfile import TensorInfo

NAME = "gguf"
MAGIC = b"GGUF"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
# ggml types read as they are; every other (block-quantized) type is dequantized to float32.
_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def sniff(path: Path) -> bool:
    """A file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def sniff_keys(keys: list[str]) -> bool:
    return any(k.endswith((SUFFIX_A, SUFFIX_B)) for k in keys)


def _open_reader(path: Path) -> Any:
    """gguf.GGUFReader on ``path`` after our own bounded header check; any parse failure is one line."""
    from lora_tools.model.gguf_file import read_gguf_info

    try:
        read_gguf_info(path)  # bounded counts and lengths: a hostile header fails here, without large allocations
    except BaseModelError as exc:
        raise AdapterFormatError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: cannot read GGUF header ({exc})") from None
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf-py raises ValueError, IndexError, struct/numpy errors on malformed files
        raise AdapterFormatError(f"{path}: malformed or truncated GGUF file ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from None
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise AdapterFormatError(f"{path}: tensor {tensor.name!r} needs {tensor.n_bytes} bytes but the file "
                                     f"holds {tensor.data.nbytes}: truncated GGUF file")
    return reader


def _metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string fields (arrays left out), as Python values."""
    import gguf

    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        try:
            values[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return values


class GGUFSource:
    """The factors of a GGUF LoRA in loratools' layout: A (r, in), B (out, r), q/k rows back in transformers'
    order, dequantized when stored in a block format. Keys are the GGUF tensor names."""

    def __init__(self, path: Path, reader: Any, metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        self._tensors = {t.name: t for t in reader.tensors}
        self._infos: dict[str, TensorInfo] = {}
        self._transposed: set[str] = set()
        self._heads: dict[str, int] = {}
        for tensor in reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            dtype = _PLAIN.get(tensor.tensor_type.name, "F32")
            self._infos[tensor.name] = TensorInfo(tensor.name, dtype, shape)

    def layout(self, key: str, *, transpose: bool = False, unpermute_heads: int | None = None) -> None:
        """Record how a stored tensor becomes our layout (token_embd A transposed, q/k B rows reordered)."""
        info = self._infos[key]
        if transpose:
            self._transposed.add(key)
            self._infos[key] = TensorInfo(key, info.dtype, tuple(reversed(info.shape)))
        if unpermute_heads:
            self._heads[key] = unpermute_heads

    def stored_type(self, key: str) -> str:
        return self._tensors[key].tensor_type.name

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, key: str) -> Any:
        import numpy as np
        import torch

        tensor = self._tensors.get(key)
        if tensor is None:
            raise AdapterFormatError(f"{self.path}: no tensor {key!r}")
        kind = tensor.tensor_type.name
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            if kind in ("F32", "F16"):
                value = torch.from_numpy(np.array(tensor.data, copy=True)).reshape(shape)
            elif kind == "BF16":
                raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))
                value = raw.view(torch.bfloat16).reshape(shape)
            else:
                import gguf

                value = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data,
                                                                                     tensor.tensor_type)))
                value = value.reshape(shape)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise AdapterFormatError(f"{self.path}: tensor {key!r} ({kind}) cannot be read: {exc}") from None
        if key in self._transposed:
            value = value.T.contiguous()
        if key in self._heads:
            value = gguf_names.permute_rows(value, self._heads[key], inverse=True).contiguous()
        return value


def read(path: Path) -> Adapter:
    """A GGUF LoRA adapter; a GGUF that is not one (a model, a vocabulary) is refused in one line."""
    reader = _open_reader(path)
    fields = _metadata(reader)
    kind, arch = fields.get("general.type"), fields.get("general.architecture")
    names = [t.name for t in reader.tensors]
    if kind != "adapter" or fields.get("adapter.type") not in (None, "lora"):
        what = f"general.type={kind!r}" if kind else "no general.type"
        if kind in (None, "model") and not sniff_keys(names):
            raise AdapterFormatError(f"{path}: this GGUF is a model ({what}, architecture {arch!r}, {len(names)} "
                                     "tensors), not a LoRA adapter; pass it as --base, and a LoRA as the adapter")
        if fields.get("adapter.type") not in (None, "lora"):
            raise AdapterFormatError(f"{path}: GGUF adapter.type is {fields.get('adapter.type')!r}; only LoRA "
                                     "adapters (adapter.type = lora) are supported")
        raise AdapterFormatError(f"{path}: GGUF with {what} is not a llama.cpp LoRA adapter (expected "
                                 "general.type = adapter)")
    if not isinstance(arch, str) or not arch:
        raise AdapterFormatError(f"{path}: GGUF LoRA names no general.architecture")
    alpha = fields.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)) or not math.isfinite(float(alpha)):
        raise AdapterFormatError(f"{path}: adapter.lora.alpha is {alpha!r}, not a finite number")
    alpha = float(alpha)
    metadata = {k: str(v) for k, v in fields.items()}
    source = GGUFSource(path, reader, metadata)
    warnings: list[str] = []
    pairs = _pair(path, names, warnings)
    module_names = _module_names(path, fields, arch, pairs, warnings)
    heads = {"attn_q": _positive(fields.get(f"{arch}.attention.head_count"))}
    heads["attn_k"] = _positive(fields.get(f"{arch}.attention.head_count_kv")) or heads["attn_q"]
    permuted = arch in gguf_names.PERMUTED_ARCHS
    unknown_heads: list[str] = []
    modules: dict[str, LoraModule] = {}
    stored: dict[str, int] = {}
    for tensor_name, (a_key, b_key) in pairs.items():
        name = module_names.get(tensor_name, tensor_name)
        embedding = tensor_name.endswith("token_embd.weight")
        source.layout(a_key, transpose=embedding)
        role = tensor_name.rsplit(".", 2)[-2] if tensor_name.count(".") >= 2 else ""
        if permuted and role in heads:
            if heads[role] is None:
                unknown_heads.append(name)
            else:
                _check_heads(path, tensor_name, source.infos()[b_key].shape[0], heads[role])
                source.layout(b_key, unpermute_heads=heads[role])
        module = _module(path, name, source, a_key, b_key, alpha, "embedding" if embedding else "linear")
        if name in modules:
            raise ModuleMismatchError(f"{path}: tensors {tensor_name} and another both map to module {name}")
        modules[name] = module
        for key in (a_key, b_key):
            stored[source.stored_type(key)] = stored.get(source.stored_type(key), 0) + 1
    quantized = {t: n for t, n in stored.items() if t not in _PLAIN}
    if quantized:
        warnings.append("factors stored as " + ", ".join(f"{t} ({n} tensors)" for t, n in sorted(quantized.items()))
                        + ": dequantized to float32")
    if unknown_heads:
        warnings.append(f"{len(unknown_heads)} q/k module(s) keep llama.cpp's rotary row order (the file has no "
                        f"{arch}.attention.head_count to undo it): their B rows differ from transformers' order")
    return Adapter(path=path, format=NAME, modules=modules, source=source, config={}, metadata=metadata,
                   warnings=warnings, base_model=fields.get(gguf_names.KEY_BASE_MODEL) or None,
                   scale_rule="alpha/r (llama.cpp: one adapter.lora.alpha; scale 1 when alpha is 0)",
                   weights_path=path)


def _positive(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pair(path: Path, names: list[str], warnings: list[str]) -> dict[str, tuple[str, str]]:
    """GGUF base tensor name -> (lora_a key, lora_b key), as llama.cpp pairs them."""
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    skipped = 0
    for key in names:
        if key.endswith(SUFFIX_A):
            a_keys[key[:-len(SUFFIX_A)]] = key
        elif key.endswith(SUFFIX_B):
            b_keys[key[:-len(SUFFIX_B)]] = key
        elif key.endswith("_norm.weight"):
            skipped += 1  # llama.cpp skips these too (mergekit-extract-lora's norm copies)
        else:
            raise AdapterFormatError(f"{path}: GGUF LoRA tensor {key!r} has an unexpected suffix (expected "
                                     ".lora_a or .lora_b)")
    if skipped:
        warnings.append(f"{skipped} *_norm.weight tensor(s) ignored (llama.cpp ignores them as well)")
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise ModuleMismatchError(f"{path}: LoRA tensor pair for {unpaired[0]!r} is missing one component "
                                  f"({len(unpaired)} unpaired)")
    if not a_keys:
        raise AdapterFormatError(f"{path}: GGUF adapter holds no LoRA tensors (.lora_a/.lora_b)")
    from lora_tools.formats.peft import natural_key

    return {name: (a_keys[name], b_keys[name]) for name in sorted(a_keys, key=natural_key)}


def _module_names(path: Path, fields: dict[str, Any], arch: str, pairs: dict[str, tuple[str, str]],
                  warnings: list[str]) -> dict[str, str]:
    """GGUF tensor name -> module name: as recorded by loratools, else by the inverse of gguf's name map."""
    recorded = fields.get(gguf_names.KEY_MODULE_NAMES)
    if isinstance(recorded, str):
        try:
            names = json.loads(recorded)
        except json.JSONDecodeError:
            names = None
        if isinstance(names, dict) and all(isinstance(v, str) for v in names.values()):
            return names
        warnings.append(f"{gguf_names.KEY_MODULE_NAMES} is not a JSON object of names; using gguf's name map")
    blocks = 1 + max((int(n.split(".")[1]) for n in pairs if n.startswith("blk.") and n.split(".")[1].isdigit()),
                     default=-1)
    try:
        base = gguf_names.GGUFBase(arch, max(blocks, 1), None, None, str(path))
        inverse = gguf_names.inverse_names(gguf_names.name_map(base))
    except BaseModelError:
        inverse = {}
    missing = [n for n in pairs if n not in inverse]
    if missing:
        warnings.append(f"{len(missing)} tensor(s) with no transformers name for architecture {arch!r} keep their "
                        f"GGUF name (e.g. {missing[0]})")
    return {n: inverse[n] for n in pairs if n in inverse}


def _check_heads(path: Path, tensor_name: str, rows: int, heads: int) -> None:
    if rows % (2 * heads):
        raise ModuleMismatchError(f"{path}: {tensor_name}: {rows} rows do not split into {heads} heads of rotary "
                                  "pairs; the head count in the file is wrong")


def _module(path: Path, name: str, source: GGUFSource, a_key: str, b_key: str, alpha: float,
            kind: str) -> LoraModule:
    a_info, b_info = source.infos()[a_key], source.infos()[b_key]
    for info, role in ((a_info, "lora_a"), (b_info, "lora_b")):
        if len(info.shape) != 2 or info.numel == 0:
            raise AdapterFormatError(f"{path}: {info.key}: {role} must be a non-empty matrix, found shape "
                                     f"{list(info.shape)}")
    rank = a_info.shape[0]
    if b_info.shape[1] != rank:
        raise ModuleMismatchError(f"{path}: module {name}: lora_a is {list(a_info.shape)} (r x in) and lora_b "
                                  f"{list(b_info.shape)} (out x r): the ranks differ (lora_a not transposed?)")
    # llama.cpp's rule: alpha/r, or the plain runtime scale when the file's alpha is 0.
    scale = alpha / rank if alpha else 1.0
    return LoraModule(name=name, kind=kind, rank=rank, alpha=alpha if alpha else float(rank), scale=scale,
                      a_info=a_info, b_info=b_info)


def write(adapter: Adapter, path: Path, *, force: bool = False) -> Path:
    """Write ``adapter`` as a GGUF LoRA for its own base (the GGUF file it came from, or its base model)."""
    from lora_tools.formats.gguf_write import write_gguf

    return write_gguf(adapter, path, force=force).path
