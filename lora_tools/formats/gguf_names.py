"""Where a transformers module sits in a llama.cpp GGUF model: architecture, tensor names, q/k row order.

llama.cpp names base tensors ``blk.<n>.attn_q.weight`` etc.; the ``gguf`` package (llama.cpp's own gguf-py) holds
the map from every known transformers name to those names per architecture (``gguf.get_tensor_name_map``). A LoRA
for llama.cpp uses the same names with ``.lora_a`` / ``.lora_b`` appended (llama.cpp src/llama-adapter.cpp pairs
them by that suffix and looks the stripped name up among the base's tensors).

Llama-family converters (convert_hf_to_gguf.py ``LlamaModel.permute``) reorder the rows of q_proj and k_proj from
transformers' rotary layout (two halves per head) to GGML's (interleaved pairs): rows viewed as
(heads, 2, head_dim/2) are swapped to (heads, head_dim/2, 2); k uses the key/value head count. A LoRA's B holds
those rows, so the same permutation applies to B; A is untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.errors import BaseModelError

# transformers model_type -> (GGUF architecture, q/k rows permuted by llama.cpp's converter). Facts from
# convert_hf_to_gguf.py: LlamaModel (registered for Llama, Mistral, Mixtral) and its Granite / MiniCPM relatives
# permute; Qwen, Gemma, Phi-3, StarCoder2, OLMo2, StableLM write q/k as transformers holds them.
MODEL_TYPES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True), "mistral": ("llama", True), "mixtral": ("llama", True),
    "granite": ("granite", True), "minicpm": ("minicpm", True),
    "qwen2": ("qwen2", False), "qwen2_moe": ("qwen2moe", False), "qwen3": ("qwen3", False),
    "qwen3_moe": ("qwen3moe", False), "gemma": ("gemma", False), "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False), "phi3": ("phi3", False), "starcoder2": ("starcoder2", False),
    "olmo2": ("olmo2", False), "stablelm": ("stablelm", False),
}
PERMUTED_ARCHS = frozenset(arch for arch, permuted in MODEL_TYPES.values() if permuted)
# Keys loratools adds to the GGUF files it writes (llama.cpp ignores keys it does not know).
KEY_MODULE_NAMES = "loratools.module_names"  # JSON: GGUF tensor name -> transformers module name
KEY_BASE_MODEL = "loratools.base_model"
KEY_SOURCE_FORMAT = "loratools.source_format"


@dataclass(frozen=True)
class GGUFBase:
    """What a GGUF LoRA needs to know about its base model."""

    arch: str  # GGUF architecture name ("llama", "qwen2", ...)
    n_blocks: int
    n_head: int | None
    n_head_kv: int | None
    source: str  # where this came from, for messages
    tensor_shapes: Mapping[str, tuple[int, ...]] | None = None  # the base GGUF's tensors (GGUF ne order), if known
    name: str | None = None  # the base's name or path, recorded in the adapter

    @property
    def permuted(self) -> bool:
        return self.arch in PERMUTED_ARCHS


def model_arch(arch: str, where: str) -> Any:
    """The ``gguf.MODEL_ARCH`` of an architecture name; BaseModelError when gguf has no name map for it."""
    import gguf

    by_name = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise BaseModelError(f"{where}: base architecture {arch!r} has no GGUF tensor-name map in the gguf package "
                             f"{getattr(gguf, '__version__', '')}".rstrip() + "; llama.cpp cannot load a LoRA for it")
    return by_name[arch]


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def base_from_config(config: dict[str, Any], where: str, name: str | None = None) -> GGUFBase:
    """A transformers ``config.json`` (dict) as a GGUF base."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    config = text or config
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise BaseModelError(f"{where}: base architecture {model_type!r} (config.json model_type) has no GGUF name "
                             f"map in loratools (known: {known})")
    arch = MODEL_TYPES[model_type][0]
    model_arch(arch, where)
    n_blocks = _int(config.get("num_hidden_layers"))
    n_head = _int(config.get("num_attention_heads"))
    if n_blocks is None or n_head is None:
        raise BaseModelError(f"{where}: config.json lacks num_hidden_layers / num_attention_heads")
    n_head_kv = _int(config.get("num_key_value_heads")) or n_head
    return GGUFBase(arch, n_blocks, n_head, n_head_kv, where, name=name)


def base_from_gguf(path: Path, name: str | None = None) -> GGUFBase:
    """A GGUF model file as a base: its architecture, head counts and tensor table."""
    from lora_tools.model.gguf_file import check_gguf_model

    info = check_gguf_model(path)
    arch = info.architecture or ""
    model_arch(arch, str(path))
    meta = info.metadata
    shapes = {t.name: t.shape for t in info.tensors}
    blocks = _int(meta.get(f"{arch}.block_count")) or 1 + max(
        (int(n.split(".")[1]) for n in shapes if n.startswith("blk.") and n.split(".")[1].isdigit()), default=-1)
    n_head = _int(meta.get(f"{arch}.attention.head_count"))
    n_head_kv = _int(meta.get(f"{arch}.attention.head_count_kv")) or n_head
    return GGUFBase(arch, blocks, n_head, n_head_kv, str(path), shapes, name=name or str(path))


def resolve_base(base: Path | str | None, adapter_base: str | None, where: str) -> GGUFBase:
    """``--base`` (folder, .gguf, Hub id or bundled name), else the adapter's ``base_model_name_or_path``."""
    from lora_tools.model.resolve import resolve_base_name, resolve_base_reference

    if base is not None:
        path, name = resolve_base_reference(base), str(base)
    elif adapter_base:
        path, name = resolve_base_name(adapter_base), adapter_base
    else:
        raise BaseModelError(f"{where}: the adapter names no base model (base_model_name_or_path); pass --base "
                             "DIR|FILE.gguf|org/name so that the GGUF architecture and tensor names are known")
    if path.is_file():
        return base_from_gguf(path, name)
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{config_path}: cannot read the base model's config ({exc})") from None
    if not isinstance(config, dict):
        raise BaseModelError(f"{config_path}: not a JSON object")
    return base_from_config(config, str(config_path), name)


def name_map(base: GGUFBase) -> Any:
    """``gguf.TensorNameMap`` of the base's architecture and block count."""
    import gguf

    return gguf.get_tensor_name_map(model_arch(base.arch, base.source), base.n_blocks)


class BlockNameMap:
    """gguf's TensorNameMap answers without its per-block table: ``get_tensor_name_map`` formats every name of
    every block (a 32-block Llama: about 10,000 names, 10-15 ms, more than converting an adapter's tensors).
    Here each block template is kept once, split at its ``{bid}``; a name is looked up by trying each number in
    it as the block index. Built from the same tables in the same order (TensorNameMap(arch, 0) applies the
    architecture's overrides), so every name maps as gguf's own map would (tests/test_gguf_lora.py checks all
    of them for several architectures)."""

    def __init__(self, arch: Any, n_blocks: int):
        import gguf

        plain = gguf.TensorNameMap(arch, 0)  # the non-block names, and the arch's block overrides applied
        self.n_blocks = n_blocks
        self.plain = plain.mapping
        self.blocks: dict[tuple[str, str], tuple[Any, str]] = {}
        self.odd: dict[str, tuple[Any, str]] = {}  # templates with no or several {bid}: formatted per block
        for tensor, keys in plain.block_mappings_cfg.items():
            if tensor not in gguf.MODEL_TENSORS[arch]:
                continue
            template = gguf.TENSOR_NAMES[tensor]
            for key in (template, *keys):
                if key.count("{bid}") == 1:
                    prefix, suffix = key.split("{bid}")
                    self.blocks[(prefix, suffix)] = (tensor, template)
                else:
                    for bid in range(n_blocks):
                        self.odd[key.format(bid=bid)] = (tensor, template.format(bid=bid))

    def get_type_and_name(self, key: str) -> tuple[Any, str] | None:
        import re

        for number in re.finditer(r"\d+", key):
            found = self.blocks.get((key[:number.start()], key[number.end():]))
            bid = int(number.group())
            if found is not None and bid < self.n_blocks and str(bid) == number.group():
                return found[0], found[1].format(bid=bid)
        return self.odd.get(key) or self.plain.get(key)


def block_name_map(base: GGUFBase) -> BlockNameMap:
    """The name map of the base's architecture and block count, for looking names up (see BlockNameMap)."""
    return BlockNameMap(model_arch(base.arch, base.source), base.n_blocks)


def gguf_tensor_name(tensor_map: Any, module: str) -> tuple[str, str] | None:
    """(GGUF base tensor name with ``.weight``, tensor kind: attn_q/attn_k/...) of a transformers module, or None.

    PEFT keys of a causal LM wrapped twice (``model.model.layers``) and multimodal ``language_model.`` prefixes
    are tried without the extra level, as llama.cpp's converter does.
    """
    candidates = [module]
    for prefix, replacement in (("model.language_model.", "model."), ("language_model.", ""), ("model.model.",
                                                                                               "model.")):
        if module.startswith(prefix):
            candidates.append(replacement + module[len(prefix):])
    for candidate in candidates:
        found = tensor_map.get_type_and_name(candidate)
        if found is not None:
            kind, name = found
            return f"{name}.weight", kind.name.lower()
    return None


def inverse_names(tensor_map: Any) -> dict[str, str]:
    """GGUF tensor name (``blk.0.attn_q.weight``) -> the transformers module name most models use for it.

    Many source names map to one GGUF name; the plain transformers layout (``model.layers.N.self_attn.q_proj``,
    ``model.layers.N.mlp.gate_proj``) is preferred, then any ``model.`` name, then the first listed.
    """
    def rank(key: str) -> int:
        if key.startswith("model.layers.") and (".self_attn." in key or ".mlp." in key):
            return 0
        return 1 if key.startswith("model.") else 2

    best: dict[str, str] = {}
    for key, (_, name) in tensor_map.mapping.items():
        if key == name:
            continue
        target = f"{name}.weight"
        if target not in best or rank(key) < rank(best[target]):
            best[target] = key
    return best


def permute_rows(B: Any, n_head: int, inverse: bool = False) -> Any:
    """B's rows in llama.cpp's rotary order (or back, ``inverse``): (heads, 2, d/2) <-> (heads, d/2, 2)."""
    out = B.shape[0]
    half = out // n_head // 2
    if inverse:
        return B.reshape(n_head, half, 2, *B.shape[1:]).transpose(1, 2).reshape(B.shape)
    return B.reshape(n_head, 2, half, *B.shape[1:]).transpose(1, 2).reshape(B.shape)


def heads_for(kind: str, base: GGUFBase) -> int | None:
    """The head count whose rotary layout rows of this tensor kind follow, when the base's converter permutes."""
    if not base.permuted:
        return None
    if kind == "attn_q":
        return base.n_head
    if kind == "attn_k":
        return base.n_head_kv
    return None


def check_same_arch(adapter: Any, base: Path | str) -> None:
    """A GGUF LoRA used with ``--base``: the architectures must agree, as llama.cpp requires."""
    if getattr(adapter, "format", None) != "gguf":
        return
    arch = adapter.metadata.get("general.architecture")
    target = resolve_base(base, None, str(adapter.path))
    if arch != target.arch:
        raise BaseModelError(f"{adapter.path}: this GGUF LoRA is for architecture {arch!r} but --base {base} is "
                             f"{target.arch!r} ({target.source}); llama.cpp refuses the pair (model arch and LoRA "
                             "arch mismatch)")
