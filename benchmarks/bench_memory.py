"""Peak memory of ``loratools inspect --json`` on a 1 GB synthetic adapter (issue #6: bounded memory).

Writes a PEFT-named fp16 safetensors file shaped like Llama-2-7B with LoRA on all 7 linear layers of 32 decoder
layers (224 modules) at a rank chosen to make the file ~1 GB, streamed tensor by tensor so the generator itself
stays small. Then runs ``python -m lora_tools inspect --json FILE`` as a subprocess and reports:

* peak RSS from ``os.wait4`` (ru_maxrss): everything resident, including pages of the memory-mapped input that
  the reader touched (file-backed, shared, reclaimable by the kernel);
* peak anonymous memory (RSS - shared, polled every 20 ms with psutil): what the process itself allocated;
* the same two figures for ``python -c "import lora_tools.analysis, lora_tools.formats"`` (the import baseline).

The file is written to a temporary folder outside the repository (or --dir) and deleted at the end.

Usage::

    python benchmarks/bench_memory.py [--size-gb 1.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def rank_for(size_bytes: float) -> int:
    per_rank = LAYERS * sum(out + inp for out, inp in SHAPES.values()) * 2  # fp16 bytes per unit of rank
    return max(1, round(size_bytes / per_rank))


def write_adapter(path: Path, rank: int) -> int:
    """Stream a safetensors file: header first, then each tensor's bytes (one tensor in memory at a time)."""
    entries: list[tuple[str, tuple[int, int]]] = []
    for layer in range(LAYERS):
        for module, (out, inp) in SHAPES.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            entries += [(f"{name}.lora_A.weight", (rank, inp)), (f"{name}.lora_B.weight", (out, rank))]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in entries:
        size = shape[0] * shape[1] * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in entries:
            handle.write((torch.randn(*shape, generator=gen) * 0.02).half().numpy().tobytes())
    (path.parent / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": [m.split(".")[1] for m in SHAPES],
                "base_model_name_or_path": "synthetic/llama-2-7b-shape",
            }
        )
    )
    return path.stat().st_size


def measure(args: list[str]) -> dict[str, float]:
    """Run a subprocess; wall seconds, peak RSS (wait4) and peak anonymous RSS (psutil polling), in MiB."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_anon = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak_anon
        watched = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                info = watched.memory_info()
            except psutil.Error:
                return
            peak_anon = max(peak_anon, info.rss - info.shared)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout = proc.stdout.read()  # type: ignore[union-attr]
    stderr = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "peak_anon_mib": peak_anon / 2**20,
        "stdout": stdout,
    }  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument(
        "--dir", type=Path, default=None, help="Where to write the file (default: a temp dir)."
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=options.dir, prefix="loratools-bench-memory-") as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        weights = folder / "adapter_model.safetensors"
        rank = rank_for(options.size_gb * 1e9)
        size = write_adapter(weights, rank)
        baseline = measure([sys.executable, "-c", "import lora_tools.analysis, lora_tools.formats"])
        run = measure([sys.executable, "-m", "lora_tools", "inspect", "--json", str(folder)])
        report = json.loads(run.pop("stdout"))  # type: ignore[arg-type]
        baseline.pop("stdout")
        assert report["num_modules"] == LAYERS * len(SHAPES), report["num_modules"]
        print(
            f"file: {size / 1e9:.3f} GB ({size / 2**20:.0f} MiB), fp16, {report['num_modules']} modules, r={rank}"
        )
        print(
            f"import baseline: peak RSS {baseline['peak_rss_mib']:.0f} MiB, "
            f"peak anonymous {baseline['peak_anon_mib']:.0f} MiB"
        )
        print(
            f"inspect --json:  peak RSS {run['peak_rss_mib']:.0f} MiB, peak anonymous {run['peak_anon_mib']:.0f} "
            f"MiB, wall {run['wall_s']:.1f} s"
        )
    print("file deleted")


if __name__ == "__main__":
    main()
