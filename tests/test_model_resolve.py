"""Base and adapter references resolved offline: local folders, .gguf files, Hub ids from a Hugging Face cache
laid out in a temp dir (models--org--name/snapshots/<hash>, refs/<branch>); bad inputs give one-line errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools.basemodel import check_module_map, load_base, match_modules, resolve_base
from lora_tools.errors import AdapterFormatError, BaseModelError, ModuleMismatchError
from lora_tools.formats import load_adapter
from lora_tools.model.gguf_file import check_gguf_model, quantization_note, read_gguf_info
from lora_tools.model.resolve import (
    HubReference,
    hub_cache_dir,
    parse_hub_reference,
    resolve_adapter_reference,
    resolve_base_name,
    resolve_base_reference,
    resolve_weights_reference,
)
from tests.conftest import make_peft_adapter, tiny_llama
from tests.helpers import assert_one_line_error, lora_tensors, run_cli, write_peft

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def snapshot(cache: Path, repo_id: str, commit: str = COMMIT, branch: str | None = "main") -> Path:
    """An (empty) snapshot folder of ``repo_id`` in the cache layout huggingface_hub reads."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    if branch is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return folder


def save_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


def write_gguf(path: Path, metadata: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], int]],
               arrays: dict[str, list[str]] | None = None) -> Path:
    """A GGUF v3 header written byte by byte (string/uint32 metadata, string arrays, tensor table, no data)."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    arrays = arrays or {}
    body = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata) + len(arrays))
    for key, value in metadata.items():
        body += string(key) + (struct.pack("<I", 8) + string(value) if isinstance(value, str)
                               else struct.pack("<II", 4, value))
    for key, values in arrays.items():
        body += string(key) + struct.pack("<IIQ", 9, 8, len(values)) + b"".join(string(v) for v in values)
    for name, shape, type_id in tensors:
        body += string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        body += struct.pack("<IQ", type_id, 0)
    path.write_bytes(body)
    return path


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_llama_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = make_peft_adapter(tmp_path_factory.mktemp("adapter"), "llama", r=2, lora_alpha=4,
                                  target_modules=LLAMA_TARGETS)
    return folder


def cached_tiny_llama(cache: Path, repo_id: str = "org/tiny-llama", **kwargs: Any) -> Path:
    folder = snapshot(cache, repo_id, **kwargs)
    tiny_llama().save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


# --- references ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("org/name", HubReference("org/name")),
    ("HuggingFaceTB/SmolLM2-135M-Instruct@main", HubReference("HuggingFaceTB/SmolLM2-135M-Instruct", "main")),
    (f"org/name@{COMMIT}:adapters/r8", HubReference("org/name", COMMIT, "adapters/r8")),
    ("org/name:model.gguf", HubReference("org/name", None, "model.gguf")),
    ("./org/name", None), ("/abs/path", None), ("name", None), ("a/b/c", None), ("org/na..me", None),
    ("org/name:../escape", None), ("org--x/name", None),
])
def test_hub_reference_parsing(text: str, expected: HubReference | None) -> None:
    assert parse_hub_reference(text) == expected


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == tmp_path / "hub"


def test_cached_base_resolves_by_branch_commit_and_default(hub_cache: Path, tiny_llama_adapter: Path) -> None:
    folder = cached_tiny_llama(hub_cache)
    assert resolve_base_reference("org/tiny-llama") == folder
    assert resolve_base_reference(f"org/tiny-llama@{COMMIT}") == folder
    # another branch, pointing at another snapshot
    other = snapshot(hub_cache, "org/tiny-llama", OTHER_COMMIT, branch="v2")
    shutil.copytree(folder, other, dirs_exist_ok=True)
    assert resolve_base_reference("org/tiny-llama@v2") == other
    # default: the adapter's base_model_name_or_path, resolved the same way
    adapter = load_adapter(tiny_llama_adapter)
    adapter.base_model = "org/tiny-llama"
    assert resolve_base(adapter, None) == folder


def test_cached_base_loads_as_causal_lm_and_fits_the_adapter(hub_cache: Path, tiny_llama_adapter: Path) -> None:
    cached_tiny_llama(hub_cache)
    model, tokenizer = load_base(resolve_base_reference("org/tiny-llama"), "cpu", torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token_id is not None
    adapter = load_adapter(tiny_llama_adapter)
    mapping = match_modules(model, list(adapter.modules))
    check_module_map(adapter, model, mapping, "org/tiny-llama")  # all 14 modules, shapes agree
    assert len(mapping.modules) == 14


def test_uncached_id_names_the_fetch_command(hub_cache: Path) -> None:
    snapshot(hub_cache, "org/present")
    with pytest.raises(BaseModelError, match=r"org/absent.*not in the Hugging Face cache.*`hf download org/absent`"):
        resolve_base_reference("org/absent")
    with pytest.raises(BaseModelError, match=r"hf download org/present --revision v9"):
        resolve_base_reference("org/present@v9")
    with pytest.raises(BaseModelError, match="HF_HUB_OFFLINE is set"):
        resolve_base_name("org/absent")


def test_uncached_base_is_one_line_error_in_compare_quant(hub_cache: Path) -> None:
    result = run_cli("compare-quant", "--base", "org/absent@v1", "--report", str(hub_cache / "out"),
                     env={"HF_HUB_CACHE": str(hub_cache)})
    assert_one_line_error(result, "org/absent@v1", "hf download org/absent --revision v1")
    assert not (hub_cache / "out").exists()


def test_cached_adapter_with_subfolder_through_inspect(hub_cache: Path, tiny_llama_adapter: Path) -> None:
    folder = snapshot(hub_cache, "org/adapters")
    shutil.copytree(tiny_llama_adapter, folder / "llama-r2")
    assert resolve_adapter_reference(Path("org/adapters:llama-r2")) == folder / "llama-r2"
    result = run_cli("inspect", "--json", f"org/adapters@{COMMIT}:llama-r2", env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_modules"] == 14
    missing = run_cli("inspect", "org/adapters:nothing-here", env={"HF_HUB_CACHE": str(hub_cache)})
    assert_one_line_error(missing, "org/adapters:nothing-here", "has no 'nothing-here'")
    with pytest.raises(AdapterFormatError, match="hf download org/other"):
        resolve_adapter_reference(Path("org/other"))


def test_fold_takes_a_cached_base_and_refuses_gguf(hub_cache: Path, tmp_path: Path) -> None:
    folder = cached_tiny_llama(hub_cache)
    assert resolve_weights_reference(Path("org/tiny-llama")) == folder
    gguf = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama"}, [("blk.0.attn_q.weight", (32, 32), 0)])
    with pytest.raises(BaseModelError, match="a .gguf model is not supported"):
        resolve_weights_reference(gguf)


def test_example_option_picks_the_bundled_adapter() -> None:
    from lora_tools.data import example_adapter_path

    result = run_cli("inspect", "--json", "--example", "minilm")
    assert result.exit_code == 0 and json.loads(result.stdout)["path"] == str(example_adapter_path("minilm"))
    both = run_cli("inspect", str(example_adapter_path("minilm")), "--example", "llm")
    assert_one_line_error(both, "not both")
    if (example_adapter_path("llm") / "adapter_config.json").is_file():
        llm = run_cli("inspect", "--json", "--example", "llm")
        assert llm.exit_code == 0, llm.output
        report = json.loads(llm.stdout)
        assert report["num_modules"] == 210 and report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- bad bases -----------------------------------------------------------------------------------------------


def test_gguf_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(BaseModelError, match="not a GGUF file"):
        resolve_base_reference(garbage)
    lora = write_gguf(tmp_path / "lora.gguf", {"general.architecture": "llama", "general.type": "adapter",
                                                "adapter.type": "lora"},
                      [("blk.0.attn_q.weight.lora_a", (32, 4), 0)])
    with pytest.raises(BaseModelError, match="is a LoRA adapter"):
        resolve_base_reference(lora)
    vocab = write_gguf(tmp_path / "vocab.gguf", {"general.architecture": "llama", "general.type": "vocab"}, [])
    with pytest.raises(BaseModelError, match="'vocab' file"):
        resolve_base_reference(vocab)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(lora.read_bytes()[:40])
    with pytest.raises(BaseModelError, match="truncated"):
        resolve_base_reference(truncated)
    result = run_cli("compare-quant", "--base", str(lora), "--report", str(tmp_path / "out"))
    assert_one_line_error(result, "lora.gguf", "LoRA adapter")
    assert not (tmp_path / "out").exists()


def test_gguf_header_describes_the_storage(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama", "general.type": "model"},
                      [("token_embd.weight", (32, 100), 8), ("blk.0.attn_q.weight", (32, 32), 3),
                       ("blk.0.attn_k.weight", (32, 32), 3), ("blk.0.attn_norm.weight", (32,), 0)],
                      arrays={"tokenizer.ggml.tokens": ["a", "b", "c"]})
    info = check_gguf_model(path)
    assert info.architecture == "llama" and info.has_tokenizer and len(info.tensors) == 4
    assert info.weight_types() == {"Q4_1": 2, "Q8_0": 1}  # the 1-D norm is not a weight matrix
    note = quantization_note(info)
    assert note is not None and "Q4_1 (4-bit, blocks of 32)" in note and "Q8_0" in note
    assert quantization_note(read_gguf_info(write_gguf(tmp_path / "f.gguf", {"general.architecture": "llama"},
                                                       [("w", (32, 32), 0)]))) is None


def test_gguf_without_tokenizer_is_refused_before_loading(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from lora_tools.model.gguf_load import load_gguf_model

    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama"}, [("blk.0.attn_q.weight", (32, 32), 0)])
    with pytest.raises(BaseModelError, match="holds no tokenizer"):
        load_gguf_model(path, "cpu", torch.float32)


def test_base_folder_without_tokenizer(tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    tiny_llama().save_pretrained(folder)
    assert resolve_base_reference(folder) == folder
    with pytest.raises(BaseModelError, match="no usable tokenizer"):
        load_base(folder, "cpu", torch.float32)
    model, tokenizer = load_base(folder, "cpu", torch.float32, need_tokenizer=False)
    assert tokenizer is None and model.config.model_type == "llama"


def test_folder_with_several_ggufs_asks_for_one(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, {"general.architecture": "llama"}, [("w", (32, 32), 0)])
    with pytest.raises(BaseModelError, match="several GGUF files"):
        resolve_base_reference(tmp_path)
    (tmp_path / "b.gguf").unlink()
    assert resolve_base_reference(tmp_path) == tmp_path / "a.gguf"


def test_adapter_from_another_architecture_or_with_missing_modules(tmp_path: Path) -> None:
    model = tiny_llama()
    bert_folder, _ = make_peft_adapter(tmp_path, "bert", r=2, lora_alpha=4, target_modules=["query", "value"])
    bert = load_adapter(bert_folder)
    with pytest.raises(ModuleMismatchError, match=r"none of the adapter's 4 modules .*llama base model: the "
                                                  r"adapter was trained on another architecture"):
        check_module_map(bert, model, match_modules(model, list(bert.modules)), "tiny")
    layers = {f"model.layers.{i}.self_attn.q_proj": (32, 32, 4) for i in (0, 7, 8, 9, 10)}
    deeper = load_adapter(write_peft(tmp_path / "deeper", lora_tensors(layers)))
    with pytest.raises(ModuleMismatchError, match=r"4 of the adapter's 5 modules are not in this llama base model: "
                                                  r"model.layers.7.self_attn.q_proj, model.layers.8.self_attn.q_proj, "
                                                  r"model.layers.9.self_attn.q_proj, \.\.\."):
        check_module_map(deeper, model, match_modules(model, list(deeper.modules)), "tiny")
    wider = load_adapter(write_peft(tmp_path / "wider", lora_tensors({"model.layers.0.self_attn.q_proj": (64, 64, 4)})))
    with pytest.raises(ModuleMismatchError, match="adapter expects a base layer mapping 64 -> 64"):
        check_module_map(wider, model, match_modules(model, list(wider.modules)), "tiny")
