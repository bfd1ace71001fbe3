"""compare-quant never calls in-sample numbers held-out (issue 14, defect 5), and its report compares each scheme
with the best truncation as well as plain SVD (issue 14, "Also").

Refusals: too few held-out tokens (none, or fewer than the widest layer's input width) and too few calibration
tokens are one-line errors with the numbers. `--holdout 0` is allowed and labelled in-sample everywhere.
`--calib random` reports never claim real layer outputs and say which base model was (or was not) used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    MINILM_VOCAB,
    assert_one_line_error,
    lora_tensors,
    minilm_path,
    run_cli,
    save_tiny_base_and_adapter,
    write_peft,
)

WIDEST = 48  # the tiny BERT's intermediate size: input width of encoder.layer.*.output.dense


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base folder, adapter folder): a 2-layer BERT (hidden 32, intermediate 48) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-holdout")
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 vocab_size=MINILM_VOCAB, max_position_embeddings=128)).eval()
    return save_tiny_base_and_adapter(root, model, ["query", "value", "output.dense"])


def _args(tiny: tuple[Path, Path], *extra: str) -> list[str]:
    base, adapter = tiny
    return ["compare-quant", str(adapter), "--base", str(base), "--device", "cpu", "--quiet",
            "--ranks", "1,2", "--schemes", "int8-channel,int4-g16", *extra]


def _documents(path: Path, count: int) -> Path:
    """``count`` short documents of about ten tokens each (one sequence each)."""
    path.write_text("\n\n".join(f"document {i} tells a short story about number {i}." for i in range(count)))
    return path


# --- refusals with numbers -------------------------------------------------------------------------------------


def test_nothing_held_out_is_refused_with_numbers(tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    calib = _documents(tmp_path / "one.txt", 1)  # one sequence: the split leaves nothing to hold out
    out = tmp_path / "rep"
    result = run_cli(*_args(tiny_bert, "--calib", str(calib), "--report", str(out)))
    assert_one_line_error(result, "0 held-out tokens", f"at least {WIDEST}", "--holdout", "--calib")
    assert not out.exists()


def test_fewer_held_out_tokens_than_the_layer_width_is_refused(tiny_bert: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    calib = _documents(tmp_path / "many.txt", 30)  # 30 sequences of 12 tokens; 10% held out: 3 sequences
    result = run_cli(*_args(tiny_bert, "--calib", str(calib), "--holdout", "0.1"))
    assert_one_line_error(result, f"at least {WIDEST}", "--holdout")
    held_out = int(re.search(r"(\d+) held-out tokens", result.stderr).group(1))
    calibration = int(re.search(r"(\d+) calibration tokens", result.stderr).group(1))
    assert 0 < held_out < WIDEST <= calibration
    # The same text with a larger held-out share passes.
    assert run_cli(*_args(tiny_bert, "--calib", str(calib), "--holdout", "0.5", "--json")).exit_code == 0


def test_fewer_calibration_tokens_than_the_layer_width_is_refused_even_in_sample(
        tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    calib = _documents(tmp_path / "three.txt", 3)  # ~36 tokens < 48: C would be rank-deficient
    result = run_cli(*_args(tiny_bert, "--calib", str(calib), "--holdout", "0"))
    assert_one_line_error(result, "calibration tokens", f"at least {WIDEST}", "--calib")


def test_random_inputs_too_few_tokens_are_refused(tiny_bert: tuple[Path, Path]) -> None:
    _, adapter = tiny_bert
    result = run_cli("compare-quant", str(adapter), "--calib", "random", "--max-tokens", "100", "--device", "cpu")
    # 75 calibration and 25 held-out Gaussian tokens: the held-out part is below the width 48.
    assert_one_line_error(result, "25 held-out tokens", f"at least {WIDEST}", "--max-tokens")


def test_bundled_example_short_run_is_refused() -> None:
    from lora_tools.data import example_adapter_path

    if not (example_adapter_path() / "adapter_config.json").exists():
        pytest.skip("bundled example adapter not trained yet")
    minilm_path()
    result = run_cli("compare-quant", "--max-tokens", "256", "--device", "cpu", "--quiet")
    assert_one_line_error(result, "held-out tokens", "at least 1536", "--max-tokens")


# --- --holdout 0: allowed, labelled in-sample everywhere --------------------------------------------------------


def test_holdout_zero_is_labelled_in_sample_everywhere(tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = run_cli(*_args(tiny_bert, "--holdout", "0", "--max-tokens", "300", "--report", str(out)))
    assert result.exit_code == 0, result.output
    assert "in-sample" in result.stderr.lower()  # a warning line, not only a label in the file
    assert "IN-SAMPLE" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"] == "in-sample" and report["holdout_tokens"] == 0
    assert report["summary"] and all(row["evaluation"] == "in-sample" for row in report["summary"])
    for row in report["summary"]:  # every error in a summary row comes from the same (calibration) tokens
        for key in ("scheme_rel_error", "svd_rel_error", "svd_act_rel_error", "best_truncation_rel_error"):
            assert row[key] is not None and row[key] == row[key] and row[key] >= 0, (key, row)
    markdown = (out / "report.md").read_text()
    title = markdown.splitlines()[0]
    assert title.startswith("# ") and "IN-SAMPLE" in title
    headers = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headers and all("in-sample" in h.lower() or h in ("## Plots", "## Modules not compared") for h in headers)
    assert "held-out relative" not in markdown and "held-out error" not in markdown


def test_held_out_run_is_labelled_held_out(tiny_bert: tuple[Path, Path]) -> None:
    result = run_cli(*_args(tiny_bert, "--max-tokens", "400", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["evaluation"] == "held-out"
    assert report["holdout_tokens"] >= WIDEST and report["calib_tokens"] >= WIDEST
    assert all(row["evaluation"] == "held-out" for row in report["summary"])


# --- --calib random: no claim of real outputs, the base named --------------------------------------------------


def test_random_delta_report_names_the_unused_base(tmp_path: Path) -> None:
    adapter = write_peft(tmp_path / "a", lora_tensors({"model.layers.0.self_attn.q_proj": (8, 6, 2)}), r=2,
                         lora_alpha=4, base_model_name_or_path="org/some-base")
    out = tmp_path / "rep"
    result = run_cli("compare-quant", str(adapter), "--calib", "random", "--max-tokens", "64", "--device", "cpu",
                     "--quiet", "--report", str(out))
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    for text in (markdown, result.stdout, result.stderr, json.dumps(report)):
        assert "real layer" not in text
    assert "org/some-base" in markdown and "no base model was run" in markdown
    assert report["inputs"] == "random" and report["adapter_base_model"] == "org/some-base"


def test_random_merged_report_names_the_base_used(tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = tiny_bert
    out = tmp_path / "rep"
    result = run_cli("compare-quant", str(adapter), "--base", str(base), "--calib", "random", "--target", "merged",
                     "--ranks", "2", "--schemes", "int8-channel", "--max-tokens", "256", "--device", "cpu",
                     "--quiet", "--report", str(out))
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "real layer" not in markdown
    assert f"`{json.loads((out / 'report.json').read_text())['base_model']}`" in markdown
    assert "base" in markdown.splitlines()[2] and "Gaussian" in markdown


# --- the report: best truncation as well as plain SVD, no duplicate rows ---------------------------------------


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_summary_compares_with_best_truncation_and_plain_svd(tiny_bert: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    from lora_tools.report.compare_md import _num, _short

    out = tmp_path / "rep"
    result = run_cli(*_args(tiny_bert, "--max-tokens", "400", "--report", str(out)))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    by_layer: dict[str, dict[str, Any]] = {}
    for layer in report["layers"]:
        by_layer[layer["name"]] = {r["label"]: r for r in layer["results"]}
    for row in report["summary"]:
        assert row["best_truncation_method"] == "svd-act"
        if row["layer"] != "all layers":
            act = by_layer[row["layer"]][f"svd-act@{row['scheme']}"]
            assert row["best_truncation_rel_error"] == act["rel_error"] == row["svd_act_rel_error"]
            assert row["best_truncation_rank"] == act["rank"]
        expected = row["scheme"] if row["scheme_rel_error"] <= row["best_truncation_rel_error"] else "svd-act"
        assert row["winner_vs_best"] == expected
        # old fields stay (other code reads them)
        assert {"winner", "factor", "svd_rel_error", "svd_rank", "scheme_rel_error"} <= set(row)
    overall = [r for r in report["summary"] if r["layer"] == "all layers"]
    summary_section = markdown.split("\n## ")[1]
    for row in overall:  # the summary shows the scheme's error and both truncations' errors
        line = next(line for line in summary_section.splitlines() if line.startswith(f"| {row['scheme']} "))
        for key in ("scheme_rel_error", "best_truncation_rel_error", "svd_rel_error"):
            assert _num(row[key]) in line, (key, line)
    # Per-layer winner cells show both errors (the scheme's and the best truncation's).
    winners = next(t for t in _tables(markdown) if t[0][0] == "layer")
    cells = {(_short(r["layer"]) if r["layer"] != "all layers" else r["layer"], r["scheme"]): r
             for r in report["summary"]}
    schemes = winners[0][1:]
    assert len(winners) - 1 == len(report["layers"])
    for line in winners[1:]:
        for scheme, cell in zip(schemes, line[1:], strict=True):
            row = cells[(line[0], scheme)]
            assert _num(row["scheme_rel_error"]) in cell and _num(row["best_truncation_rel_error"]) in cell


def test_report_has_no_duplicate_rows_and_keeps_json_fields(tiny_bert: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    out = tmp_path / "rep"
    # Rank 2 is also the equal-byte rank of some scheme here, so svd@scheme duplicates svd-r2 in the JSON.
    result = run_cli(*_args(tiny_bert, "--max-tokens", "400", "--report", str(out)))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for layer in report["layers"]:
        labels = [r["label"] for r in layer["results"]]
        assert {"int8-channel", "svd@int8-channel", "svd-act@int8-channel", "svd-r1"} <= set(labels)
        assert len(labels) == len(set(labels))
    duplicated = [r for r in report["aggregate"] if r.get("same_as")]
    assert duplicated, "the setup should produce at least one svd@scheme row equal to a --ranks row"
    markdown = (out / "report.md").read_text()
    checked = 0
    for table in _tables(markdown):
        header = table[0]
        if "method" not in header or "bytes" not in header:
            continue
        # A duplicate is a row whose numbers all repeat another row's (the label and the list of schemes whose
        # bytes it matches aside).
        kept = [i for i, title in enumerate(header) if title not in ("method", "same bytes as")]
        numbers = [tuple(row[i] for i in kept) for row in table[1:]]
        assert len(numbers) == len(set(numbers)), table
        checked += 1
    assert checked == 2  # all layers together, then every layer's distinct approximations
