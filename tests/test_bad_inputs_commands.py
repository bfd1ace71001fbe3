"""Bad input for every command, as a table: exit 1, one `error: ...` line naming the file (and the tensor or
module where there is one), no traceback, and the folder byte for byte as it was (nothing written, no temporary
files left, inputs untouched).

tests/test_bad_inputs.py holds the `inspect` cases; this table holds the other commands' and the inputs that
file does not cover. scripts/make_reliability_table.py renders both into reports/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import assert_one_line_error, lora_tensors, raw_safetensors, run_cli, write_peft

MODULE = "model.q_proj"  # (out 8, in 6, rank 2) in every adapter below
PEFT_A = f"base_model.model.{MODULE}.lora_A.weight"
PEFT_B = f"base_model.model.{MODULE}.lora_B.weight"


# --- inputs, built in code -----------------------------------------------------------------------------------


def good(tmp: Path, name: str = "good", seed: int = 0, **tensor_changes: torch.Tensor) -> Path:
    tensors = lora_tensors({MODULE: (8, 6, 2)}, seed=seed)
    tensors.update(tensor_changes)
    return write_peft(tmp / name, tensors, r=2, lora_alpha=4)


def nan_adapter(tmp: Path) -> Path:
    b = lora_tensors({MODULE: (8, 6, 2)})[PEFT_B]
    b[3, 1] = float("nan")
    return good(tmp, "nan", **{PEFT_B: b})


def kohya(tmp: Path, tensors: dict[str, torch.Tensor] | None = None, name: str = "k.safetensors") -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = tensors if tensors is not None else {
        "lora_te_x.lora_down.weight": torch.randn(2, 6, generator=gen),
        "lora_te_x.lora_up.weight": torch.randn(8, 2, generator=gen)}
    save_file(tensors, str(tmp / name))
    return tmp / name


def base_file(tmp: Path, name: str = "base.safetensors", seed: int = 0, shape: tuple[int, int] = (8, 6),
              nan: bool = False) -> Path:
    """A one-file 'model' holding the weight the adapters above attach to, plus a norm that is never touched."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if nan:
        weight[0, 0] = float("nan")
    save_file({f"{MODULE}.weight": weight, "model.norm.weight": torch.ones(6)}, str(tmp / name))
    return tmp / name


def zero_byte(tmp: Path, name: str = "zero.safetensors") -> Path:
    (tmp / name).write_bytes(b"")
    return tmp / name


def truncated_in_data(tmp: Path) -> Path:
    whole = kohya(tmp, name="whole.safetensors").read_bytes()
    (tmp / "whole.safetensors").unlink()
    (tmp / "cut.safetensors").write_bytes(whole[:-7])
    return tmp / "cut.safetensors"


def one_tensor(tmp: Path, name: str, key: str) -> Path:
    return kohya(tmp, {key: torch.randn(4, 4)}, name)


def peft_folder_with_config(tmp: Path, **config: object) -> Path:
    return write_peft(tmp / "cfg", lora_tensors({MODULE: (8, 6, 2)}), **{"r": 2, "lora_alpha": 4, **config})


# --- the table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    input: str  # what is wrong, for the report
    build: Callable[[Path], list[str]]  # tmp folder -> CLI arguments
    fragments: tuple[str, ...]  # the error line must contain each
    needs_non_root: bool = False


def _args(*parts: object) -> list[str]:
    return [str(p) for p in parts]


CASES = [
    # truncate
    Case("truncate-output-is-input-file", "truncate", "output path equal to the input file (with --force)",
         lambda t: _args("truncate", kohya(t), "-o", t / "k.safetensors", "--rank", "1", "--force"),
         ("k.safetensors", "would overwrite the input")),
    Case("truncate-output-is-input-weights", "truncate", "output path equal to the weights file inside the "
         "input folder (--to kohya --force)",
         lambda t: _args("truncate", good(t), "-o", t / "good" / "adapter_model.safetensors", "--to", "kohya",
                         "--rank", "1", "--force"),
         ("adapter_model.safetensors", "would overwrite the input")),
    Case("truncate-output-symlink-to-input", "truncate", "output path a symlink to the input (with --force)",
         lambda t: (os.symlink(kohya(t), t / "link.safetensors"),
                    _args("truncate", t / "k.safetensors", "-o", t / "link.safetensors", "--rank", "1",
                          "--force"))[1],
         ("link.safetensors", "would overwrite the input")),
    Case("truncate-output-exists", "truncate", "OUT exists, no --force",
         lambda t: ((t / "taken.safetensors").write_text("keep"),
                    _args("truncate", good(t), "-o", t / "taken.safetensors", "--to", "kohya", "--rank", "1"))[1],
         ("taken.safetensors", "already exists", "--force")),
    Case("truncate-output-under-a-file", "truncate", "output folder is a regular file",
         lambda t: ((t / "plain").write_text("x"), _args("truncate", good(t), "-o", t / "plain" / "out",
                                                         "--rank", "1"))[1],
         ("plain/out", "output folder")),
    Case("truncate-output-dir-not-writable", "truncate", "output folder not writable (chmod 0o500)",
         lambda t: ((t / "ro").mkdir(mode=0o500), _args("truncate", good(t), "-o", t / "ro" / "out",
                                                        "--rank", "1"))[1],
         ("ro/out", "not writable"), needs_non_root=True),
    Case("truncate-nan", "truncate", "NaN in a factor, no --allow-nonfinite",
         lambda t: _args("truncate", nan_adapter(t), "-o", t / "out", "--rank", "1"),
         ("nan", MODULE, "NaN or Inf", "--allow-nonfinite")),
    Case("truncate-zero-byte", "truncate", "zero-byte .safetensors",
         lambda t: _args("truncate", zero_byte(t), "-o", t / "out.safetensors", "--rank", "1"),
         ("zero.safetensors", "empty file")),
    Case("truncate-lfs-pointer", "truncate", "Git LFS pointer under .safetensors",
         lambda t: ((t / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\nsize 9\n"),
                    _args("truncate", t / "lfs.safetensors", "-o", t / "out.safetensors", "--rank", "1"))[1],
         ("lfs.safetensors", "Git LFS pointer")),
    Case("truncate-kohya-alpha-no-up", "truncate", "kohya file with .alpha and lora_down but no lora_up",
         lambda t: _args("truncate", kohya(t, {"lora_te_x.lora_down.weight": torch.ones(2, 6),
                                               "lora_te_x.alpha": torch.tensor(1.0)}),
                         "-o", t / "out.safetensors", "--rank", "1"),
         ("k.safetensors", "lora_te_x", "no up factor")),
    Case("truncate-kohya-alpha-only", "truncate", "kohya file with an .alpha whose module has no factors",
         lambda t: _args("truncate", kohya(t, {"lora_te_x.lora_down.weight": torch.ones(2, 6),
                                               "lora_te_x.lora_up.weight": torch.ones(8, 2),
                                               "lora_te_y.alpha": torch.tensor(1.0)}),
                         "-o", t / "out.safetensors", "--rank", "1"),
         ("k.safetensors", "lora_te_y", "alpha but no")),
    Case("truncate-two-naming-schemes", "truncate", "one module under kohya and PEFT names in one file",
         lambda t: _args("truncate", kohya(t, {"lora_te_x.lora_down.weight": torch.ones(2, 6),
                                               "lora_te_x.lora_up.weight": torch.ones(8, 2),
                                               "te.x.lora_A.weight": torch.ones(2, 6),
                                               "te.x.lora_B.weight": torch.ones(8, 2)}),
                         "-o", t / "out.safetensors", "--rank", "1"),
         ("k.safetensors", "te.x.lora_A.weight", "two naming schemes")),
    Case("truncate-ia3-file", "truncate", "IA3 tensors (ia3_l) in a .safetensors",
         lambda t: _args("truncate", one_tensor(t, "ia3.safetensors", "base_model.model.q.ia3_l"),
                         "-o", t / "out", "--rank", "1"),
         ("ia3.safetensors", "IA3", "ia3_l")),
    Case("truncate-lokr", "truncate", "LyCORIS LoKr file",
         lambda t: _args("truncate", one_tensor(t, "lokr.safetensors", "lora_unet_x.lokr_w1"),
                         "-o", t / "out", "--rank", "1"),
         ("lokr.safetensors", "LoKr", "lokr_w1")),
    Case("truncate-loha", "truncate", "LyCORIS LoHa file",
         lambda t: _args("truncate", one_tensor(t, "loha.safetensors", "lora_unet_x.hada_w1_a"),
                         "-o", t / "out", "--rank", "1"),
         ("loha.safetensors", "LoHa", "hada_w1_a")),
    Case("truncate-peft-type-ia3", "truncate", "PEFT folder whose adapter_config.json says peft_type IA3",
         lambda t: _args("truncate", peft_folder_with_config(t, peft_type="IA3"), "-o", t / "out", "--rank", "1"),
         ("adapter_config.json", "peft_type is 'IA3'")),
    Case("truncate-peft-output-named-like-a-file", "truncate", "-o x.safetensors for a PEFT (folder) output",
         lambda t: _args("truncate", good(t), "-o", t / "x.safetensors", "--rank", "1"),
         ("x.safetensors", "is a folder", "--to kohya")),
    Case("truncate-peft-output-replacing-a-file", "truncate", "-o existing.safetensors --force for a PEFT output "
         "(would have replaced the file by a folder)",
         lambda t: ((t / "x.safetensors").write_text("keep"),
                    _args("truncate", good(t), "-o", t / "x.safetensors", "--rank", "1", "--force"))[1],
         ("x.safetensors", "is a folder")),
    Case("truncate-kohya-output-wrong-suffix", "truncate", "-o x.bin for a kohya (safetensors) output",
         lambda t: _args("truncate", kohya(t), "-o", t / "x.bin", "--rank", "1"),
         ("x.bin", "x.safetensors")),
    # merge
    Case("merge-second-input-truncated", "merge", "second adapter truncated inside the data section",
         lambda t: _args("merge", good(t), truncated_in_data(t), "-o", t / "out"),
         ("cut.safetensors",)),
    Case("merge-output-is-second-input", "merge", "output path equal to the second input (with --force)",
         lambda t: _args("merge", good(t), good(t, "other", seed=1), "-o", t / "other", "--force"),
         ("other", "would overwrite the input")),
    Case("merge-nan", "merge", "NaN in one input",
         lambda t: _args("merge", good(t), nan_adapter(t), "-o", t / "out"),
         ("nan", MODULE, "refusing to merge")),
    Case("merge-loha-input", "merge", "a LoHa file among the inputs",
         lambda t: _args("merge", good(t), one_tensor(t, "loha.safetensors", "lora_unet_x.hada_w1_a"),
                         "-o", t / "out"),
         ("loha.safetensors", "LoHa")),
    Case("merge-unknown-peft-type", "merge", "unknown peft_type in an input's config",
         lambda t: _args("merge", good(t), peft_folder_with_config(t, peft_type="MYSTERY"), "-o", t / "out"),
         ("adapter_config.json", "peft_type is 'MYSTERY'")),
    # convert
    Case("convert-peft-output-named-like-a-file", "convert", "-o x.safetensors --to peft",
         lambda t: _args("convert", kohya(t), "-o", t / "x.safetensors", "--to", "peft"),
         ("x.safetensors", "is a folder")),
    Case("convert-nan", "convert", "NaN in a factor, no --allow-nonfinite",
         lambda t: _args("convert", nan_adapter(t), "-o", t / "out.safetensors", "--to", "kohya"),
         ("nan", MODULE, "NaN or Inf", "--allow-nonfinite")),
    Case("convert-output-is-input", "convert", "output path equal to the input file (with --force)",
         lambda t: _args("convert", kohya(t), "-o", t / "k.safetensors", "--to", "kohya", "--force"),
         ("k.safetensors", "would overwrite the input")),
    Case("convert-chain-mismatch", "convert", "A and B inner dimensions differ",
         lambda t: _args("convert", good(t, **{PEFT_B: torch.ones(8, 3)}), "-o", t / "o.safetensors",
                         "--to", "kohya"),
         ("adapter_model.safetensors", MODULE, "do not chain")),
    Case("convert-zero-d-factor", "convert", "0-D factor",
         lambda t: _args("convert", good(t, **{PEFT_A: torch.tensor(1.0)}), "-o", t / "o.safetensors",
                         "--to", "kohya"),
         ("adapter_model.safetensors", MODULE, "0-D")),
    Case("convert-diffusers-two-namings", "convert", "diffusers file with one module under two namings",
         lambda t: _args("convert", kohya(t, {"blk.processor.to_q_lora.down.weight": torch.ones(2, 6),
                                              "blk.processor.to_q_lora.up.weight": torch.ones(8, 2),
                                              "blk.to_q.lora.down.weight": torch.ones(2, 6),
                                              "blk.to_q.lora.up.weight": torch.ones(8, 2)}, "d.safetensors"),
                         "-o", t / "out", "--to", "peft"),
         ("d.safetensors", "blk.to_q", "two naming schemes")),
    Case("convert-rank-string", "convert", "r is a string in adapter_config.json",
         lambda t: _args("convert", peft_folder_with_config(t, r="two"), "-o", t / "o.safetensors",
                         "--to", "kohya"),
         ("adapter_config.json", "r must be a positive integer")),
    # fold
    Case("fold-nan", "fold", "NaN in the adapter",
         lambda t: _args("fold", nan_adapter(t), "--base", base_file(t), "-o", t / "out.safetensors"),
         ("nan", MODULE, "refusing to fold")),
    Case("fold-shape-mismatch", "fold", "base weight of another shape than the adapter's update",
         lambda t: _args("fold", good(t), "--base", base_file(t, shape=(8, 5)), "-o", t / "out.safetensors"),
         ("good", MODULE, "[8, 6]", "[8, 5]")),
    Case("fold-output-is-base", "fold", "output path equal to the base file (with --force)",
         lambda t: _args("fold", good(t), "--base", base_file(t), "-o", t / "base.safetensors", "--force"),
         ("base.safetensors", "would overwrite the input")),
    Case("fold-base-header-not-json", "fold", "base file whose header is not JSON",
         lambda t: _args("fold", good(t), "--base", raw_safetensors(t / "badbase.safetensors", b"{nope"),
                         "-o", t / "out.safetensors"),
         ("badbase.safetensors", "not valid JSON")),
    Case("fold-factor-one-side", "fold", "adapter with lora_A but no lora_B for a module",
         lambda t: _args("fold", write_peft(t / "half", {PEFT_A: torch.ones(2, 6)}, r=2),
                         "--base", base_file(t), "-o", t / "out.safetensors"),
         ("half", MODULE, "no B factor")),
    # extract
    Case("extract-nan-finetuned", "extract", "NaN in a fine-tuned weight",
         lambda t: _args("extract", "--base", base_file(t), "--finetuned", base_file(t, "ft.safetensors", 1, nan=True),
                         "-o", t / "out", "--rank", "1"),
         ("ft.safetensors", f"{MODULE}.weight", "NaN or Inf")),
    Case("extract-shape-mismatch", "extract", "fine-tuned weight of another shape than the base's",
         lambda t: _args("extract", "--base", base_file(t), "--finetuned",
                         base_file(t, "ft.safetensors", 1, shape=(8, 5)), "-o", t / "out", "--rank", "1"),
         (f"{MODULE}.weight", "not the same architecture")),
    Case("extract-nothing-changed", "extract", "fine-tuned model identical to the base",
         lambda t: _args("extract", "--base", base_file(t), "--finetuned", base_file(t, "ft.safetensors"),
                         "-o", t / "out", "--rank", "1"),
         ("ft.safetensors", "nothing to extract")),
    Case("extract-output-is-finetuned", "extract", "output path equal to the fine-tuned file (with --force)",
         lambda t: _args("extract", "--base", base_file(t), "--finetuned", base_file(t, "ft.safetensors", 1),
                         "-o", t / "ft.safetensors", "--to", "kohya", "--rank", "1", "--force"),
         ("ft.safetensors", "same as the input")),
    Case("extract-base-zero-byte", "extract", "zero-byte base file",
         lambda t: _args("extract", "--base", zero_byte(t, "base.safetensors"), "--finetuned",
                         base_file(t, "ft.safetensors", 1), "-o", t / "out", "--rank", "1"),
         ("base.safetensors", "empty file")),
    # compare-quant (fails on the adapter before any base model or calibration data is touched)
    Case("compare-quant-truncated-adapter", "compare-quant", "adapter truncated inside the data section",
         lambda t: _args("compare-quant", truncated_in_data(t), "--calib", "random"),
         ("cut.safetensors",)),
    Case("compare-quant-report-is-a-file", "compare-quant", "--report DIR is a regular file",
         lambda t: ((t / "plain").write_text("x"), _args("compare-quant", good(t), "--calib", "random",
                                                         "--report", t / "plain"))[1],
         ("plain", "needs a folder")),
    Case("compare-quant-report-exists", "compare-quant", "--report folder already holds report.md, no --force",
         lambda t: ((t / "rep").mkdir(), (t / "rep" / "report.md").write_text("keep"),
                    _args("compare-quant", good(t), "--calib", "random", "--report", t / "rep"))[2],
         ("rep", "report.md", "--force")),
    Case("compare-quant-lokr", "compare-quant", "LyCORIS LoKr file",
         lambda t: _args("compare-quant", one_tensor(t, "lokr.safetensors", "lora_unet_x.lokr_w1"),
                         "--calib", "random"),
         ("lokr.safetensors", "LoKr")),
    # similarity
    Case("similarity-nan", "similarity", "NaN in the second adapter",
         lambda t: _args("similarity", good(t), nan_adapter(t)),
         ("nan", MODULE, "NaN or Inf")),
    Case("similarity-zero-byte", "similarity", "second adapter a zero-byte file",
         lambda t: _args("similarity", good(t), zero_byte(t)),
         ("zero.safetensors", "empty file")),
    Case("similarity-plot-is-input", "similarity", "--plot path equal to an input (with --force)",
         lambda t: _args("similarity", kohya(t), kohya(t, name="k2.safetensors"), "--plot", t / "k2.safetensors",
                         "--force"),
         ("k2.safetensors", "would overwrite the input")),
    Case("similarity-plot-exists", "similarity", "--plot file exists, no --force",
         lambda t: ((t / "p.png").write_text("keep"), _args("similarity", good(t), good(t, "b", 1), "--plot",
                                                            t / "p.png"))[1],
         ("p.png", "already exists", "--force")),
    # spectrum --plot
    Case("spectrum-plot-is-input", "spectrum", "--plot path equal to the input (with --force)",
         lambda t: _args("spectrum", kohya(t), "--plot", t / "k.safetensors", "--force"),
         ("k.safetensors", "would overwrite the input")),
    Case("spectrum-plot-under-a-file", "spectrum", "--plot folder is a regular file",
         lambda t: ((t / "plain").write_text("x"), _args("spectrum", good(t), "--plot", t / "plain" / "p.png"))[1],
         ("plain/p.png", "output folder")),
    # inspect: inputs that tests/test_bad_inputs.py does not build
    Case("inspect-header-over-limit", "inspect", "header length field says 200 MB (limit 100 MB)",
         lambda t: _args("inspect", raw_safetensors(t / "huge.safetensors", b"{}", header_len=200 * 1024 * 1024)),
         ("huge.safetensors", "exceeds the 104857600 byte limit")),
    Case("inspect-declared-size-exceeds-file", "inspect", "a tensor declared 2^31 x 2^31 F32 (16 EiB) in a "
         "64-byte file",
         lambda t: _args("inspect", raw_safetensors(t / "big.safetensors", {
             "a.lora_down.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 32]},
             "a.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}, bytes(64))),
         ("big.safetensors", "a.lora_down.weight", "but its data_offsets cover 32")),
    Case("inspect-unknown-dtype", "inspect", "unknown dtype string in the header",
         lambda t: _args("inspect", raw_safetensors(t / "dt.safetensors", {
             "a.lora_down.weight": {"dtype": "Q3", "shape": [2, 4], "data_offsets": [0, 32]}}, bytes(32))),
         ("dt.safetensors", "a.lora_down.weight", "unknown dtype 'Q3'")),
    Case("inspect-header-not-object", "inspect", "header is JSON but not an object",
         lambda t: _args("inspect", raw_safetensors(t / "list.safetensors", [1, 2, 3])),
         ("list.safetensors", "not a JSON object")),
    Case("inspect-negative-offsets", "inspect", "negative data_offsets",
         lambda t: _args("inspect", raw_safetensors(t / "neg.safetensors", {
             "a.lora_down.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [-32, 0]}}, bytes(32))),
         ("neg.safetensors", "a.lora_down.weight", "outside the data")),
]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: files by sha256, folders and links by kind (symlinks are not followed)."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            tree[key] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            tree[key] = "dir"
        else:
            tree[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(tmp_path: Path, case: Case) -> None:
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions (see truncate-output-under-a-file for the same guard)")
    work = tmp_path / "work"
    work.mkdir()
    args = case.build(work)
    before = _tree(work)
    result = run_cli(*args)
    assert_one_line_error(result, *case.fragments)
    assert _tree(work) == before  # nothing written, no .name.*.tmp left, every input byte-identical


def test_catalogue_is_distinct_and_large_enough() -> None:
    from tests import test_bad_inputs

    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    inspect_tests = [name for name in dir(test_bad_inputs) if name.startswith("test_")]
    assert len(CASES) + len(inspect_tests) >= 40


# --- inputs that must work -----------------------------------------------------------------------------------


def test_paths_with_spaces_and_non_ascii_work_for_every_writing_command(tmp_path: Path) -> None:
    folder = tmp_path / "my adaptér ✓"
    folder.mkdir()
    source = good(folder, "ünïcode in")
    base = base_file(folder, "bäse model.safetensors")
    runs = [
        ("truncate", str(source), "-o", str(folder / "trunc ö"), "--rank", "1"),
        ("merge", str(source), str(source), "-o", str(folder / "merged ö")),
        ("convert", str(source), "-o", str(folder / "kohya ö.safetensors"), "--to", "kohya"),
        ("fold", str(source), "--base", str(base), "-o", str(folder / "folded ö.safetensors")),
        ("extract", "--base", str(base), "--finetuned", str(folder / "folded ö.safetensors"), "-o",
         str(folder / "extracted ö"), "--rank", "2"),
        ("spectrum", str(source), "--plot", str(folder / "spectrum ö.png")),
        ("similarity", str(source), str(folder / "kohya ö.safetensors")),
    ]
    for args in runs:
        result = run_cli(*args)
        assert result.exit_code == 0, (args, result.output)
    for name in ("trunc ö", "merged ö", "kohya ö.safetensors", "folded ö.safetensors", "extracted ö",
                 "spectrum ö.png"):
        assert (folder / name).exists(), name


def test_symlinked_inputs_are_read_and_left_alone(tmp_path: Path) -> None:
    real = kohya(tmp_path)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    digest = hashlib.sha256(real.read_bytes()).hexdigest()
    assert run_cli("truncate", str(link), "-o", str(tmp_path / "t.safetensors"), "--rank", "1").exit_code == 0
    assert run_cli("similarity", str(link), str(real)).exit_code == 0
    assert link.is_symlink() and hashlib.sha256(real.read_bytes()).hexdigest() == digest
    folder_link = tmp_path / "folder link"
    folder_link.symlink_to(good(tmp_path), target_is_directory=True)
    result = run_cli("convert", str(folder_link), "-o", str(tmp_path / "c.safetensors"), "--to", "kohya")
    assert result.exit_code == 0, result.output
    assert folder_link.is_symlink() and (tmp_path / "good" / "adapter_model.safetensors").is_file()


def test_convert_allow_nonfinite_copies_the_factors_bit_for_bit(tmp_path: Path) -> None:
    source = nan_adapter(tmp_path)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", str(source), "-o", str(out), "--to", "kohya", "--allow-nonfinite", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bit_exact_modules"] == 1
    from lora_tools.formats import load_adapter

    B, _ = load_adapter(out).factors("lora_model_q_proj")
    assert torch.isnan(B[3, 1]) and torch.isfinite(B).sum() == B.numel() - 1


def test_inspect_flags_nonfinite_and_exits_0(tmp_path: Path) -> None:
    result = run_cli("inspect", str(nan_adapter(tmp_path)), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert "nonfinite" in doc["modules"][0]["flags"] and doc["warnings"]


def _all_finite(value: object) -> bool:
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


@pytest.mark.parametrize("shape", [(8, 6, 2, True), (3, 5, 8, False)], ids=["zero-B", "rank-above-min-dim"])
def test_degenerate_adapters_give_finite_reports(tmp_path: Path, shape: tuple[int, int, int, bool]) -> None:
    """All-zero B and r > min(out, in): every command's JSON holds only finite numbers (no 0/0)."""
    out_features, in_features, rank, zero_b = shape
    tensors = lora_tensors({MODULE: (out_features, in_features, rank)})
    if zero_b:
        tensors[PEFT_B].zero_()
    source = write_peft(tmp_path / "in", tensors, r=rank)
    runs = {
        "inspect": ["inspect", str(source), "--json"],
        "truncate": ["truncate", str(source), "-o", str(tmp_path / "t"), "--energy", "0.9", "--json"],
        "merge": ["merge", str(source), str(source), "-o", str(tmp_path / "m"), "--method", "svd", "--json"],
        "similarity": ["similarity", str(source), str(source), "--json", "--no-grids"],
    }
    docs = {}
    for name, args in runs.items():
        result = run_cli(*args)
        assert result.exit_code == 0, (name, result.output)
        docs[name] = json.loads(result.stdout)
        assert _all_finite(docs[name]), name
    row = docs["inspect"]["modules"][0]
    if zero_b:
        assert "zero_B" in row["flags"] and row["effective_rank"] == 0 and row["numerical_rank"] == 0
        assert docs["similarity"]["modules"][0]["cosine"] == 0.0
    else:
        assert "rank_exceeds_shape" in row["flags"] and row["numerical_rank"] == min(out_features, in_features)
        assert docs["truncate"]["modules"][0]["new_rank"] <= min(out_features, in_features)
