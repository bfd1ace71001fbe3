"""Where a streamed compare-quant's memory goes, phase by phase (issue 12): resident and peak memory (VmRSS,
VmHWM, Linux only) around every block forward and every layer's fit, calibration energies and report row.

VmHWM is reset (``/proc/self/clear_refs``) after each line, so "peak" is the highest resident memory since the
line before. Typical use: an adapter restricted to one decoder block of the synthetic checkpoint
(``make_synthetic_llama.py``), so one block's stage is traced in two minutes rather than the whole run:

    .venv/bin/python benchmarks/trace_compare_phases.py /tmp/synth/base ADAPTER --target base --ranks 64 \
        --schemes int8-channel
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _status(key: str) -> int:
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) // 1024


def log(tag: str) -> None:
    print(f"{tag:40s} rss {_status('VmRSS'):5d} MiB  peak since last line {_status('VmHWM'):5d} MiB", flush=True)
    Path("/proc/self/clear_refs").write_text("5")


def instrument() -> None:
    """Wrap the fit, evaluate and feed stages with ``log`` calls."""
    import lora_tools.compare.evaluate as evaluate
    import lora_tools.compare.fit as fit
    import lora_tools.model.feed as feed

    def wrap(module: Any, name: str, before: str | None, after: str) -> None:
        original = getattr(module, name)

        def wrapped(first: Any, *args: Any, **kwargs: Any) -> Any:
            label = getattr(first, "name", None) or (args[0] if args else "")
            if before:
                log(f"{before} {str(label).rsplit('.', 1)[-1]}")
            result = original(first, *args, **kwargs)
            log(f"{after} {str(label).rsplit('.', 1)[-1]}")
            return result

        setattr(module, name, wrapped)

    wrap(fit, "fit_layer", "before fit", "after fit")
    wrap(evaluate, "measure_calibration", None, "after calibration energies")
    wrap(evaluate, "finalize_layer", None, "after report row")
    wrap(feed.StreamedFeed, "_through_block", "before block forward", "after block forward")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--target", default="delta")
    parser.add_argument("--ranks", default=None)
    parser.add_argument("--schemes", default=None)
    parser.add_argument("--max-tokens", type=int, default=6000)
    parser.add_argument("--holdout", type=float, default=0.0)
    args = parser.parse_args(argv)
    instrument()
    from lora_tools.compare import CompareOptions, prepare_compare
    from lora_tools.compare.options import parse_ranks
    from lora_tools.formats import load_adapter

    log("imports")
    options: dict[str, Any] = {"target": args.target, "max_tokens": args.max_tokens, "holdout": args.holdout,
                               "offload": "always", "device": "cpu", "end_to_end": False}
    if args.ranks:
        options["ranks"] = parse_ranks(args.ranks)
    if args.schemes:
        options["schemes"] = tuple(s.strip() for s in args.schemes.split(","))
    job = prepare_compare(load_adapter(args.adapter), args.base, CompareOptions(**options))
    log("prepared")
    job.run()
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
