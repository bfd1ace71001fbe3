"""Streaming a base block by block (issue 12): the same report numbers as the model loaded whole, and the bad
checkpoints refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from lora_tools.compare import CompareOptions, prepare_compare  # noqa: E402
from lora_tools.errors import LoraToolsError  # noqa: E402
from lora_tools.formats import load_adapter  # noqa: E402
from lora_tools.model.offload import parse_memory, plan_offload  # noqa: E402
from lora_tools.model.stream import StreamedModel, read_checkpoint  # noqa: E402
from tests.helpers import minilm_path, save_head_adapter, save_tiny_base_and_adapter  # noqa: E402

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sharded safetensors Llama base with MiniLM's tokenizer, a PEFT LoRA on all seven kinds)."""
    import transformers

    root = tmp_path_factory.mktemp("stream")
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base, adapter = save_tiny_base_and_adapter(root, transformers.LlamaForCausalLM(config).eval(), KINDS,
                                               max_shard_size="2MB")
    assert len(list(base.glob("model-*.safetensors"))) > 1  # really sharded
    return base, adapter


def _report(base: Path, adapter: Path, **options: Any) -> dict[str, Any]:
    options.setdefault("max_tokens", 600)
    options.setdefault("device", "cpu")
    return prepare_compare(load_adapter(adapter), base, CompareOptions(**options)).run()


def _assert_same(a: Any, b: Any, path: str = "", rtol: float = 1e-5) -> int:
    """Every number equal to rtol (relative; absolute below 1e-9), every other value equal; returns how many
    numbers were compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        return sum(_assert_same(a[k], b[k], f"{path}.{k}", rtol) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return sum(_assert_same(x, y, f"{path}[{i}]", rtol) for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and not isinstance(a, bool):
        if math.isnan(a) or math.isinf(a):
            assert (math.isnan(a) and math.isnan(b)) or a == b, path
        else:
            assert abs(a - b) <= rtol * abs(a) + 1e-9, f"{path}: {a} vs {b}"
        return 1
    assert a == b, path
    return 0


@pytest.mark.parametrize("target", ["delta", "base"])
def test_streamed_report_equals_in_memory(tiny_llama: tuple[Path, Path], target: str) -> None:
    base, adapter = tiny_llama
    extra = {"ranks": (2, 4)} if target == "base" else {}
    whole = _report(base, adapter, target=target, offload="never", **extra)
    streamed = _report(base, adapter, target=target, offload="always", **extra)
    assert streamed["offload"]["stream"] and not whole["offload"]["stream"]
    whole.pop("offload"), streamed.pop("offload")
    if target == "delta":
        assert whole["end_to_end"] is not None and len(whole["end_to_end"]["variants"]) > 5
    compared = _assert_same(whole, streamed)
    assert compared > 500


def test_streamed_model_reads_one_block_at_a_time(tiny_llama: tuple[Path, Path]) -> None:
    import transformers

    base, _ = tiny_llama
    stream = StreamedModel(base, torch.device("cpu"), torch.float32)
    def loaded() -> list[torch.nn.Parameter]:
        return [p for p in stream.model.parameters() if p.device.type != "meta"]

    assert loaded() == []  # nothing is read before the first embed
    ids = torch.randint(0, 30522, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    hidden, kwargs = stream.embed(ids, mask)
    assert len(loaded()) == 1  # the embeddings only
    stream.release_embeddings()
    assert loaded() == []
    from lora_tools.model.stream import run_block

    for index in range(stream.checkpoint.blocks):
        with stream.block(index) as block:
            assert all(p.device.type == "cpu" for p in block.parameters())
            hidden = run_block(block, hidden, kwargs)
        assert all(p.device.type == "meta" for p in stream.blocks[index].parameters())
    logits = stream.logits(hidden)
    whole = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        expected = whole(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits[0], expected[0]) and torch.equal(logits[1, :6], expected[1, :6])


# --- plan ----------------------------------------------------------------------------------------------------


def test_auto_streams_only_when_the_budget_is_too_small(tiny_llama: tuple[Path, Path]) -> None:
    base, _ = tiny_llama
    cpu = torch.device("cpu")
    roomy = plan_offload(base, "auto", 10**10, cpu, torch.float32, tokens=600)
    assert not roomy.stream and "fits" in roomy.describe()
    tight = plan_offload(base, "auto", 8 * 10**6, cpu, torch.float32, tokens=600)  # model: 12 MB
    assert tight.stream and tight.blocks == 3 and "streaming 3 blocks" in tight.describe()
    assert tight.expected_peak < tight.model_bytes + tight.activation_bytes
    with pytest.raises(LoraToolsError, match="smaller than one decoder block"):
        plan_offload(base, "auto", 10**5, cpu, torch.float32, tokens=600)


def test_memory_sizes_parse() -> None:
    assert parse_memory("4GB") == 4 * 10**9 and parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("800") == 800
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(LoraToolsError, match="--max-memory"):
            parse_memory(bad)


# --- bad checkpoints -----------------------------------------------------------------------------------------


def _copy(base: Path, tmp_path: Path) -> Path:
    target = tmp_path / "base"
    shutil.copytree(base, target)
    return target


def test_missing_shard_is_named(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    base = _copy(tiny_llama[0], tmp_path)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoraToolsError, match=f"{shard.name}.*missing"):
        read_checkpoint(base)


def test_index_naming_a_tensor_the_shard_lacks(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    base = _copy(tiny_llama[0], tmp_path)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = sorted(index["weight_map"].values())[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(LoraToolsError, match="model.layers.0.mlp.extra.weight"):
        read_checkpoint(base)


def test_block_of_the_wrong_shape_is_refused(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    base = _copy(tiny_llama[0], tmp_path)
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] = 64  # the checkpoint's MLP is 96 wide
    (base / "config.json").write_text(json.dumps(config))
    stream = StreamedModel(base, torch.device("cpu"), torch.float32)
    with pytest.raises(LoraToolsError, match="shape .*config says"), stream.block(0):
        pass


def test_unsupported_architecture_with_always(tmp_path: Path) -> None:
    with pytest.raises(LoraToolsError, match="cannot stream a 'bert' model"):
        plan_offload(minilm_path(), "always", None, torch.device("cpu"), torch.float32)
    assert not plan_offload(minilm_path(), "auto", 10**4, torch.device("cpu"), torch.float32).stream


def test_truncate_calib_streamed_equals_in_memory(tiny_llama: tuple[Path, Path]) -> None:
    from lora_tools.calibration import collect_covariances

    base, adapter_path = tiny_llama
    adapter = load_adapter(adapter_path)
    whole = collect_covariances(adapter, base, None, max_tokens=400, offload="never")
    lines: list[str] = []
    streamed = collect_covariances(adapter, base, None, max_tokens=400, offload="always", plan_sink=lines.append)
    assert lines and lines[0].startswith("offload: streaming 3 blocks")
    assert whole.tokens == streamed.tokens > 0 and set(whole.covariances) == set(streamed.covariances)
    for name, C in whole.covariances.items():
        assert torch.allclose(C, streamed.covariances[name], rtol=1e-6, atol=1e-9), name


def test_cli_streams_and_prints_the_plan(tiny_llama: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.helpers import assert_one_line_error, run_cli

    base, adapter = tiny_llama
    result = run_cli(*["compare-quant", str(adapter), "--base", str(base), "--offload", "always", "--max-tokens",
                      "400", "--no-end-to-end", "--json"])
    assert result.exit_code == 0, result.output
    assert "offload: streaming 3 blocks" in result.stderr
    assert json.loads(result.stdout)["offload"]["stream"] is True
    out = tmp_path / "cut"
    result = run_cli(*["truncate", str(adapter), "-o", str(out), "--rank", "2", "--base", str(base), "--calib",
                      "bundled", "--max-tokens", "400", "--offload", "always", "--max-memory", "1GB"])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").exists()
    result = run_cli(*["compare-quant", str(adapter), "--base", str(base), "--max-memory", "10kB"])
    assert_one_line_error(result, "--max-memory 10.0 kB is smaller than one decoder block")


def test_layers_fed_one_tensor_share_one_covariance(tiny_llama: tuple[Path, Path]) -> None:
    """q/k/v (and gate/up) see the same input tensor: one C for each group, equal to the brute-force X^T X of
    the inputs a plain hook records."""
    import transformers

    from lora_tools.calibration import collect_covariances
    from lora_tools.capture import iter_batches, lora_hooks, read_documents, tokenize_documents
    from lora_tools.data import calib_corpus_path

    base, adapter_path = tiny_llama
    adapter = load_adapter(adapter_path)
    calib = collect_covariances(adapter, base, None, max_tokens=300, offload="never")
    C = {name.split("layers.")[1]: value for name, value in calib.covariances.items()}
    assert C["0.self_attn.q_proj"] is C["0.self_attn.k_proj"] is C["0.self_attn.v_proj"]
    assert C["0.mlp.gate_proj"] is C["0.mlp.up_proj"]
    assert C["0.self_attn.o_proj"] is not C["0.self_attn.q_proj"] and C["0.mlp.down_proj"] is not C["0.mlp.up_proj"]
    # Brute force: the k_proj inputs of layer 1 (adapter applied to every layer), real tokens only.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    corpus = tokenize_documents(tokenizer, read_documents(calib_corpus_path()), 300, 128)
    modules = dict(model.named_modules())
    names = {n.removeprefix("base_model.model."): n for n in adapter.modules}
    factors = {short: (*adapter.factors(full), adapter.modules[full].scale) for short, full in names.items()}
    seen: list[torch.Tensor] = []
    expected = torch.zeros(48, 48, dtype=torch.float64)
    handle = modules["model.layers.1.self_attn.k_proj"].register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad(), lora_hooks({s: modules[s] for s in factors}, factors):
        for ids, mask in iter_batches(corpus.sequences, 32, int(tokenizer.pad_token_id), "cpu"):
            seen.clear()
            model(input_ids=ids, attention_mask=mask)
            X = seen[0][mask.flatten().bool()].double()
            expected += X.T @ X
    handle.remove()
    # C is summed from float32 batch products (capture.CovarianceAccumulator): equal to ~1e-6 of its norm.
    assert float((C["1.self_attn.k_proj"] - expected).norm() / expected.norm()) < 1e-5


@pytest.fixture(scope="module")
def head_adapter(tiny_llama: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA on the tiny Llama's q_proj, down_proj and its LM head (outside the decoder blocks)."""
    return save_head_adapter(tiny_llama[0], tmp_path_factory.mktemp("head") / "adapter")


def test_streamed_lm_head_equals_in_memory(tiny_llama: tuple[Path, Path], head_adapter: Path) -> None:
    """lm_head is compared in a last stage after every block (final norm + head loaded): the same rows."""
    base = tiny_llama[0]
    whole = _report(base, head_adapter, offload="never", end_to_end=False)
    streamed = _report(base, head_adapter, offload="always", end_to_end=False)
    assert streamed["offload"]["stream"]
    whole.pop("offload"), streamed.pop("offload")
    heads = [row for row in whole["layers"] if row["name"].endswith("lm_head")]
    assert len(heads) == 1 and len(whole["layers"]) == 7  # q, down of 3 blocks + the head
    assert _assert_same(whole, streamed) > 50


def test_truncate_calib_streams_the_lm_head(tiny_llama: tuple[Path, Path], head_adapter: Path) -> None:
    from lora_tools.calibration import collect_covariances

    adapter = load_adapter(head_adapter)
    whole = collect_covariances(adapter, tiny_llama[0], None, max_tokens=300, offload="never")
    streamed = collect_covariances(adapter, tiny_llama[0], None, max_tokens=300, offload="always")
    head = [name for name in whole.covariances if name.endswith("lm_head")]
    assert len(head) == 1 and set(whole.covariances) == set(streamed.covariances)
    for name, C in whole.covariances.items():
        assert torch.allclose(C, streamed.covariances[name], rtol=1e-6, atol=1e-9), name


def test_streamed_feed_refuses_other_modules_outside_the_blocks(tiny_llama: tuple[Path, Path]) -> None:
    from lora_tools.model.feed import StreamedFeed

    stream = StreamedModel(tiny_llama[0], torch.device("cpu"), torch.float32)
    modules = {"emb": stream.model.model.embed_tokens}
    with pytest.raises(LoraToolsError, match=r"emb \(model.embed_tokens\) is outside the decoder blocks"):
        StreamedFeed(stream, modules, {"emb": "model.embed_tokens"}, {"calib": []}, pad_id=0, batch_size=1,
                     device=torch.device("cpu"), progress=lambda n: None)
