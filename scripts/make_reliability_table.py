"""Render the bad-input catalogue and the atomic-write matrix of reports/reliability.md from the tests themselves.

Sources: the ``CASES`` table of tests/test_bad_inputs_commands.py, the test functions of tests/test_bad_inputs.py
(their inputs from the docstring or name, the expected fragments from their ``assert_one_line_error`` calls, one
row per parametrised value) and the ``COMMANDS`` of tests/test_atomic_writes.py.

Usage::

    python scripts/make_reliability_table.py            # print the tables
    python scripts/make_reliability_table.py --write    # replace them in reports/reliability.md
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "reliability.md"
BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fragments(call: ast.Call) -> list[str]:
    return [arg.value for arg in call.args[1:] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]


def inspect_rows() -> list[tuple[str, str, str, str]]:
    """One row per test (and per parametrised value) of tests/test_bad_inputs.py."""
    source = ROOT / "tests" / "test_bad_inputs.py"
    rows = []
    for node in ast.parse(source.read_text()).body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        doc = ast.get_docstring(node)
        what = (doc.split("\n")[0] if doc else node.name[5:].replace("_", " ")).rstrip(".")
        calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
                 "assert_one_line_error"]
        if calls:
            expected = "exit 1, one `error:` line containing " + ", ".join(f"`{f}`" for f in _fragments(calls[0]))
        else:
            expected = "see test (documented behaviour, not an error)"
        values = [""]
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize":
                values = [ast.unparse(v) for v in decorator.args[1].elts]  # type: ignore[attr-defined]
        for value in values:
            label = f"{what} ({value})" if value else what
            test_id = f"test_bad_inputs.py::{node.name}" + (f"[{value}]" if value else "")
            rows.append((label, "inspect", expected, test_id))
    return rows


def command_rows() -> list[tuple[str, str, str, str]]:
    sys.path.insert(0, str(ROOT))
    from tests.test_bad_inputs_commands import CASES

    rows = []
    for case in CASES:
        expected = "exit 1, one `error:` line containing " + ", ".join(f"`{f}`" for f in case.fragments)
        if case.needs_non_root:
            expected += " (skipped as root)"
        rows.append((case.input, case.command, expected, f"test_bad_inputs_commands.py::test_bad_input[{case.id}]"))
    return rows


def atomic_rows() -> list[str]:
    from tests.test_atomic_writes import COMMANDS

    placeholders = {"a": Path("A"), "b": Path("B"), "base": Path("BASE.safetensors"), "ft": Path("FT.safetensors")}
    writers = {"safetensors": "safetensors.torch.save_file", "png": "matplotlib Figure.savefig"}
    return [f"| {name} | `{' '.join(build(placeholders, Path(out)))}` | {writers[what]} |"
            for name, (build, out, what) in sorted(COMMANDS.items())]


def render() -> str:
    rows = inspect_rows() + command_rows()
    lines = [f"{len(rows)} malformed inputs (every row: nothing written, no temporary file left, inputs unchanged "
             "(checked by sha256 for the command rows), no traceback).", "",
             "| # | input | command | expected outcome | test |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {_cell(a)} | {b} | {_cell(c)} | `{d}` |" for i, (a, b, c, d) in enumerate(rows, 1)]
    lines += ["", "Failure injection (tests/test_atomic_writes.py): the writer writes half of its output, then raises "
              "`OSError(ENOSPC)`. Asserted for each: exit 1, one error line, no OUT, no temporary file or staging "
              "folder, inputs' sha256 unchanged; and, in a second test, inputs' sha256 unchanged after a successful "
              "run.", "", "| case | command | writer made to fail |", "|---|---|---|"]
    lines += atomic_rows()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"Replace the tables in {REPORT}.")
    table = render()
    if not parser.parse_args().write:
        print(table)
        return
    text = REPORT.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    REPORT.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
