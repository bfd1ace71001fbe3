"""cloneofsimo's ``lora_diffusion`` safetensors files (github.com/cloneofsimo/lora, ``save_safeloras_with_embeds``
and ``parse_safeloras`` in lora_diffusion/lora.py are the reference for this layout):

* tensors ``<model>:<i>:up`` (out, r[, 1, 1]) and ``<model>:<i>:down`` (r, in[, kh, kw]), ``<model>`` being the
  pipeline attribute they patch (``unet``, ``text_encoder``);
* metadata ``<model>``: a JSON list of the class names whose layers were patched (``["CrossAttention",
  "Attention", "GEGLU"]``), and ``<model>:<i>:rank``: the rank as a string;
* textual-inversion embeddings: a tensor ``<token>`` with metadata ``<token>`` = ``"<embed>"``.

No layer name is stored. Module ``<model>:<i>`` is the i-th ``nn.Linear`` (or ``nn.Conv2d``) found inside
modules of the target classes, in the model's module order: the order in which ``patch_pipe`` /
``monkeypatch_or_replace_lora`` hand the factors out. loratools names modules ``<model>:<i>`` and says so in
``inspect``; such modules match modules of other files only by that index, and convert to no named format.

Scale: 1. The loader wraps every layer in a ``LoraInjectedLinear`` with ``scale=1.0`` (``tune_lora_scale`` changes
it at inference time) and the saver already multiplied the training-time scale into ``up`` (``realize_as_lora``).

The older pickled form (``lora_weight.pt``: a bare list ``[up0, down0, up1, down1, ...]``) carries neither ranks
nor target classes; ``tensorfile`` refuses it by name (loaded with ``weights_only=True``, nothing is executed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import AdapterFormatError, UnsupportedAdapterError
from lora_tools.formats.common import make_module, pair_factors, refuse_mixed_schemes, refuse_non_lora
from lora_tools.formats.peft import natural_key
from lora_tools.tensorfile import TensorInfo, open_tensor_file

NAME = "lora_diffusion"
EMBED_FLAG = "<embed>"  # lora_diffusion's metadata value for a textual-inversion token
_KEY = re.compile(r"^(?P<model>[A-Za-z_][A-Za-z0-9_]*):(?P<index>\d+):(?P<role>up|down)$")
_MODULE = re.compile(r"^(?P<model>[A-Za-z_][A-Za-z0-9_]*):(?P<index>\d+)$")
SCALE_RULE = "1 (lora_diffusion: patch_pipe applies up·down at scale 1; tune_lora_scale changes it at inference)"


def sniff_keys(keys: list[str]) -> bool:
    return any(_KEY.match(k) for k in keys)


def _targets(path: Path, metadata: dict[str, str], model: str) -> list[str]:
    raw = metadata.get(model)
    if not raw:
        raise AdapterFormatError(
            f"{path}: tensors {model}:<i>:up/down but no metadata entry {model!r} (the target classes "
            "lora_diffusion records); its own loader refuses such a file too")
    try:
        targets = json.loads(raw)
    except json.JSONDecodeError:
        targets = None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterFormatError(f"{path}: metadata {model!r} should be a JSON list of class names, found {raw!r}")
    return targets


def _stored_rank(path: Path, metadata: dict[str, str], name: str) -> int | None:
    raw = metadata.get(f"{name}:rank")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise AdapterFormatError(f"{path}: metadata {name}:rank is {raw!r}, not an integer rank") from None


def _check_contiguous(path: Path, indices: dict[str, list[int]]) -> None:
    """The loader pops factors in order: a missing index would shift every later module to the wrong layer."""
    for model, found in indices.items():
        missing = sorted(set(range(max(found) + 1)) - set(found))
        if missing:
            raise AdapterFormatError(
                f"{path}: modules of {model} are identified by order but index {missing[0]} is missing "
                f"({len(missing)} gap(s) among {model}:0..{max(found)}): later modules cannot be placed")


def read(path: Path) -> Adapter:
    if path.is_dir():
        raise AdapterFormatError(f"{path}: a lora_diffusion adapter is a single .safetensors file, not a folder")
    source = open_tensor_file(path)
    infos = source.infos()
    refuse_non_lora(path, infos)
    metadata = source.metadata
    downs: dict[str, TensorInfo] = {}
    ups: dict[str, TensorInfo] = {}
    indices: dict[str, list[int]] = {}
    extras: list[TensorInfo] = []
    embeds: list[str] = []
    for key, info in infos.items():
        match = _KEY.match(key)
        if match:
            name = f"{match['model']}:{int(match['index'])}"
            (downs if match["role"] == "down" else ups)[name] = info
            indices.setdefault(match["model"], []).append(int(match["index"]))
            continue
        if metadata.get(key) == EMBED_FLAG:
            embeds.append(key)
        extras.append(info)
    if not downs and not ups:
        raise AdapterFormatError(f"{path}: no lora_diffusion tensors (<model>:<i>:up / <model>:<i>:down)")
    refuse_mixed_schemes(path, extras, "lora_diffusion")
    _check_contiguous(path, indices)
    targets = {model: _targets(path, metadata, model) for model in sorted(indices)}
    modules: dict[str, LoraModule] = {}
    no_rank = 0
    for name in sorted(pair_factors(path, downs, ups, "down", "up"), key=natural_key):
        rank = _stored_rank(path, metadata, name)
        no_rank += rank is None
        tensor_rank = downs[name].shape[0] if downs[name].shape else 0
        modules[name] = make_module(path, name, downs[name], ups[name], alpha=float(tensor_rank), scale=1.0,
                                    expected_rank=rank, rank_source=f"metadata {name}:rank")
    warnings = [
        f"modules are identified by order only: {model}:<i> is the i-th Linear/Conv2d layer inside the "
        f"{', '.join(classes) or '(no)'} modules of the {model}, in module order, as lora_diffusion's patch_pipe "
        "applies them; the file stores no layer names"
        for model, classes in targets.items()]
    if no_rank:
        warnings.append(f"{no_rank} module(s) have no <model>:<i>:rank metadata (rank taken from the tensors); "
                        "lora_diffusion's parse_safeloras needs it")
    if embeds:
        warnings.append(f"{len(embeds)} textual-inversion embedding(s) ({', '.join(embeds[:3])}"
                        f"{', ...' if len(embeds) > 3 else ''}) kept as extra tensors, not analysed")
    return Adapter(path=path, format=NAME, modules=modules, source=source, metadata=metadata,
                   extra_tensors=extras, warnings=warnings, scale_rule=SCALE_RULE, weights_path=path)


# --- writing -------------------------------------------------------------------------------------------------


def write(adapter: Adapter, path: Path, *, force: bool = False) -> Path:
    """Write a lora_diffusion adapter (one read from such a file, then truncated or merged) back in its layout,
    atomically: ``<model>:<i>:up/down`` with the ranks rewritten in the metadata. A module whose scale is not 1
    gets it multiplied into ``up``, as lora_diffusion's own saver does, since its loader applies scale 1.

    Other formats cannot be written this way: their modules are named by layer, and which index a layer has
    depends on the model's module order, which loratools does not know.
    """
    import torch

    from lora_tools.atomic import atomic_path
    from lora_tools.formats.common import write_safetensors

    if adapter.format != NAME:
        raise UnsupportedAdapterError(
            f"{adapter.path}: writing a {adapter.format} adapter as lora_diffusion is not supported: that format "
            "identifies modules by their order in the model, not by name; write --to peft, kohya or diffusers")
    tensors: dict[str, object] = {}
    ranks: dict[str, str] = {}
    indices: dict[str, list[int]] = {}
    for name, module in adapter.modules.items():
        match = _MODULE.match(name)
        if match is None:
            raise UnsupportedAdapterError(f"{adapter.path}: module {name} is not named <model>:<index>; cannot "
                                          "write it as lora_diffusion")
        if module.kind not in ("linear", "conv") or module.bias_key or module.magnitude_key:
            raise UnsupportedAdapterError(f"{adapter.path}: module {name} ({module.kind}, bias or DoRA) has no "
                                          "place in a lora_diffusion file")
        indices.setdefault(match["model"], []).append(int(match["index"]))
        up = adapter.source.get(module.b_info.key)
        if module.scale != 1.0:
            up = (up.to(torch.float64) * module.scale).to(up.dtype)
        tensors[f"{name}:down"] = adapter.source.get(module.a_info.key)
        tensors[f"{name}:up"] = up
        ranks[f"{name}:rank"] = str(module.rank)
    _check_contiguous(adapter.path, indices)
    metadata = {k: v for k, v in adapter.metadata.items() if not re.match(r"^[^:]+:\d+:rank$", k)}
    for model in indices:
        if not metadata.get(model):
            # parse_safeloras refuses a file without them; a merge's output no longer carries the inputs' metadata
            raise UnsupportedAdapterError(
                f"{adapter.path}: no target class list for {model!r} in the metadata, which lora_diffusion's "
                "loader needs (a merge does not carry its inputs' metadata; truncate does)")
    metadata.update(ranks)
    for info in adapter.extra_tensors:
        tensors[info.key] = adapter.source.get(info.key)
    with atomic_path(path, force) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return path
