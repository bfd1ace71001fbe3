"""Build ``lora_tools/data/calib_corpus.txt``, the bundled calibration text of ``loratools compare-quant``.

Documents are the docstrings (``inspect.getdoc``) of a fixed, sorted list of Python standard-library modules and
of their public classes, functions and methods, in a deterministic order: modules sorted by name, members sorted
by name. Each docstring becomes one document with its internal blank lines removed (the file separates documents
by blank lines); documents shorter than 200 characters are dropped, duplicates keep their first occurrence, each
module contributes at most ~6 KB (documents that do not fit are skipped) and the output stops at ~300 KB. The text is committed, so compare-quant runs do not depend on the Python patch version
that happens to be installed; re-run this script only to change the corpus on purpose.

Usage: ``.venv/bin/python scripts/build_calib_corpus.py [--out PATH] [--max-bytes N]``
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# General-purpose modules with prose-rich docstrings (a fixed list: the corpus must not drift).
MODULES = sorted("""
    argparse ast asyncio base64 bisect calendar collections configparser contextlib copy csv dataclasses
    datetime decimal difflib doctest email.message enum fractions functools gettext heapq html.parser
    http.client inspect io ipaddress itertools json logging mailbox multiprocessing numbers optparse os
    pathlib pickle pprint queue random re shlex shutil smtplib socket sqlite3 statistics string subprocess
    tarfile tempfile textwrap threading tokenize typing unittest urllib.parse urllib.request uuid warnings
    zipfile
""".split())
MIN_CHARS = 200
PER_MODULE_BYTES = 6_000  # so that the first modules do not fill the whole budget


def docstring_texts(module_name: str) -> Iterator[str]:
    """The docstrings of a module, its public classes, their public methods and its public functions, in that
    fixed order, each with blank lines dropped and trailing spaces stripped (also used by train_llm_example.py)."""
    module = importlib.import_module(module_name)
    objects: list[Any] = [module]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", module_name) != module_name:
            continue
        if inspect.isclass(member):
            objects.append(member)
            objects += [m for n, m in sorted(vars(member).items())
                        if not n.startswith("_") and (inspect.isfunction(m) or inspect.ismethoddescriptor(m))]
        elif inspect.isfunction(member):
            objects.append(member)
    for obj in objects:
        doc = inspect.getdoc(obj)
        if doc:
            yield "\n".join(line.rstrip() for line in doc.splitlines() if line.strip())


def documents(max_bytes: int) -> list[str]:
    seen: set[str] = set()
    kept: list[str] = []
    size = 0
    for module_name in MODULES:
        module_size = 0
        for text in docstring_texts(module_name):
            if len(text) < MIN_CHARS or text in seen:
                continue
            seen.add(text)
            encoded = len(text.encode("utf-8")) + 2
            if module_size + encoded > PER_MODULE_BYTES:
                continue
            if size + encoded > max_bytes:
                return kept
            kept.append(text)
            size += encoded
            module_size += encoded
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "lora_tools" / "data" / "calib_corpus.txt"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--max-bytes", type=int, default=300_000)
    args = parser.parse_args()
    docs = documents(args.max_bytes)
    args.out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(docs)} documents, {args.out.stat().st_size} bytes "
          f"(Python {sys.version.split()[0]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
