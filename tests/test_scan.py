"""`loratools scan`: what each line holds, error lines with inspect's messages, discovery, outputs, right-sizing,
the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import lora_tensors, raw_safetensors, run_cli, write_peft

REQUIRED = ("path", "format", "base_model", "num_modules", "ranks", "params", "bytes", "rank_at_energy", "flags",
            "error", "modules")


def known_spectrum_tensors(prefix: str, naming: str, singular_values: list[float]) -> dict[str, torch.Tensor]:
    """One 8 x 8 module whose update s·B·A has exactly these singular values (A: orthonormal rows, alpha = r)."""
    rank = len(singular_values)
    A = torch.eye(8)[:rank]  # (r, in), orthonormal rows
    B = torch.zeros(8, rank)
    B[:rank, :rank] = torch.diag(torch.tensor(singular_values))  # (out, r)
    if naming == "peft":
        return {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}
    return {f"{prefix}.lora_down.weight": A, f"{prefix}.lora_up.weight": B, f"{prefix}.alpha": torch.tensor(float(rank))}


def make_collection(root: Path) -> dict[str, Path]:
    """A PEFT folder, a kohya file and a diffusers file in nested folders, plus a note that is not an adapter."""
    paths = {}
    tensors = known_spectrum_tensors("base_model.model.layers.0.q_proj", "peft", [3.0, 1.0, 0.1, 0.01])
    tensors.update(lora_tensors({"layers.0.v_proj": (8, 8, 4)}, seed=1))
    paths["peft"] = write_peft(root / "team_a" / "peft_adapter", tensors, r=4, lora_alpha=4,
                               target_modules=["q_proj", "v_proj"], base_model_name_or_path="org/base-a")
    (root / "team_b" / "deep").mkdir(parents=True)
    paths["kohya"] = root / "team_b" / "deep" / "style.safetensors"
    save_file(known_spectrum_tensors("lora_unet_mid_block_attn1_to_q", "kohya", [2.0, 2.0, 0.0, 0.0, 0.0, 0.0]),
              str(paths["kohya"]), metadata={"ss_sd_model_name": "sdxl"})
    paths["diffusers"] = root / "team_b" / "face.safetensors"
    gen = torch.Generator().manual_seed(3)
    save_file({"unet.mid.to_k.lora.down.weight": torch.randn(2, 8, generator=gen),
               "unet.mid.to_k.lora.up.weight": torch.randn(8, 2, generator=gen)}, str(paths["diffusers"]))
    (root / "README.txt").write_text("not an adapter\n")
    return paths


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def scan(*args: str, input: str | None = None) -> Any:
    from click.testing import CliRunner

    from lora_tools.cli import cli

    return CliRunner().invoke(cli, ["scan", *args], input=input, catch_exceptions=True)


def test_one_line_per_adapter_sorted_with_inspects_numbers(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    paths = make_collection(root)
    out = tmp_path / "results.jsonl"
    result = scan(str(root), "-o", str(out), "--jobs", "2", "-q")
    assert result.exit_code == 0, result.output
    lines = read_lines(out)
    assert [line["path"] for line in lines] == sorted(str(p) for p in paths.values())
    assert not (tmp_path / "results.jsonl.partial").exists()
    by_format = {line["format"]: line for line in lines}
    assert set(by_format) == {"peft", "kohya", "diffusers"}
    for line in lines:
        assert set(REQUIRED) <= set(line) and line["error"] is None
    peft = by_format["peft"]
    assert peft["base_model"] == "org/base-a" and peft["num_modules"] == 2 and peft["ranks"] == [4]
    assert peft["params"] == 2 * (4 * 8 + 8 * 4)
    # σ² = 9, 1, 0.01, 0.0001: two directions keep 99% of the energy.
    assert peft["rank_at_energy"]["layers.0.q_proj"] == 2
    assert peft["target_modules"] == ["q_proj", "v_proj"]
    kohya = by_format["kohya"]
    assert kohya["rank_at_energy"] == {"lora_unet_mid_block_attn1_to_q": 2}
    assert "rank_deficient" in kohya["flags"]  # rank 6 stored, 2 non-zero singular values
    # Per-module effective ranks are inspect's own numbers.
    report = json.loads(run_cli("inspect", str(paths["peft"]), "--json").stdout)
    expected = {m["name"]: m for m in report["modules"]}
    for module in peft["modules"]:
        for key in ("effective_rank", "rank_90", "rank_99", "numerical_rank", "flags"):
            assert module[key] == expected[module["name"]][key], key


def test_energy_option_changes_rank_at_energy(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    make_collection(root)
    result = scan(str(root / "team_a"), "--energy", "0.999", "--jobs", "1", "-q")
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["rank_at_energy"]["layers.0.q_proj"] == 3 and line["energy"] == 0.999


def bad_files(root: Path) -> list[Path]:
    """Corrupt, truncated and non-LoRA files of every kind the readers refuse."""
    root.mkdir(parents=True, exist_ok=True)
    header = {"a.lora_down.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
              "a.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}
    whole = raw_safetensors(root / "whole.safetensors", header, bytes(64)).read_bytes()
    (root / "whole.safetensors").unlink()
    files = []
    for name, data in (("cut_header.safetensors", whole[:20]), ("cut_data.safetensors", whole[:-10]),
                       ("empty.safetensors", b""), ("noise.safetensors", os.urandom(512)),
                       ("noise.bin", b"PK\x03\x04" + os.urandom(300))):
        (root / name).write_bytes(data)
        files.append(root / name)
    save_file({"model.layers.0.q_proj.weight": torch.ones(4, 4)}, str(root / "base_weights.safetensors"))
    save_file({"base_model.model.layers.0.k_proj.ia3_l.weight": torch.ones(4, 1)}, str(root / "ia3.safetensors"))
    folder = root / "config_only"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return [*files, root / "base_weights.safetensors", root / "ia3.safetensors", folder]


def inspect_error(path: Path) -> str:
    result = run_cli("inspect", str(path))
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    return line.removeprefix("error: ")


def test_bad_files_are_error_lines_with_inspects_messages(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    files = bad_files(root)
    write_peft(root / "good", lora_tensors({"layers.0.q_proj": (8, 8, 4)}))
    out = tmp_path / "out.jsonl"
    result = scan(str(root), "-o", str(out), "--jobs", "2", "-q")
    assert result.exit_code == 0, result.output
    lines = {line["path"]: line for line in read_lines(out)}
    assert len(lines) == len(files) + 1
    assert lines[str(root / "good")]["error"] is None
    for path in files:
        assert lines[str(path)]["error"] == inspect_error(path), path


def test_unreadable_file_is_an_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied gives inspect's message. Root reads any file whatever its mode, so the OS's answer to a
    non-root user is simulated here (in-process, for scan's per-adapter function and for inspect alike)."""
    from lora_tools.scan.discover import ScanTask
    from lora_tools.scan.worker import ScanOptions, scan_adapter

    path = tmp_path / "locked.safetensors"
    save_file(lora_tensors({"layers.0.q_proj": (8, 8, 4)}, prefix=""), str(path))
    if os.geteuid() != 0:
        path.chmod(0)
    else:
        real_open = Path.open

        def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self.name == path.name:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    line = scan_adapter(ScanTask(str(path), str(path), path.name), ScanOptions())
    assert "Permission denied" in line["error"]
    assert line["error"] == inspect_error(path)


def test_fifo_is_an_error_line_not_a_hang(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    write_peft(root / "good", lora_tensors({"layers.0.q_proj": (8, 8, 4)}))
    os.mkfifo(root / "pipe.safetensors")
    result = scan(str(root), "--jobs", "1", "-q")
    assert result.exit_code == 0, result.output
    lines = {json.loads(t)["path"]: json.loads(t) for t in result.stdout.splitlines()}
    assert "not a regular file (a fifo)" in lines[str(root / "pipe.safetensors")]["error"]
    assert lines[str(root / "good")]["error"] is None


def test_symlink_loops_end(tmp_path: Path) -> None:
    from lora_tools.scan.discover import discover

    root = tmp_path / "fleet"
    write_peft(root / "a" / "good", lora_tensors({"layers.0.q_proj": (8, 8, 4)}))
    (root / "a" / "back_to_root").symlink_to(root, target_is_directory=True)  # a -> fleet -> a -> ...
    (root / "self").symlink_to(root / "self")  # a link to itself (ELOOP)
    (root / "loop.safetensors").symlink_to(root / "loop.safetensors")
    tasks = discover([str(root)]).tasks
    assert [t.path for t in tasks] == [str(root / "a" / "good"), str(root / "loop.safetensors")]
    result = scan(str(root), "--jobs", "1", "-q")
    assert result.exit_code == 0, result.output
    lines = [json.loads(t) for t in result.stdout.splitlines()]
    assert lines[1]["error"] == inspect_error(root / "loop.safetensors")


def test_list_file_stdin_glob_and_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fleet"
    paths = make_collection(root)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    listing = tmp_path / "adapters.txt"
    listing.write_text(f"# tenants\n{paths['peft']}\n\n{paths['kohya']}\nsome-org/not-cached\n")
    result = scan(str(listing), "-q", "--jobs", "1")
    assert result.exit_code == 0, result.output
    lines = [json.loads(t) for t in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == sorted([str(paths["peft"]), str(paths["kohya"]),
                                                       "some-org/not-cached"])
    hub_line = next(line for line in lines if line["path"] == "some-org/not-cached")
    assert hub_line["error"] == inspect_error(Path("some-org/not-cached"))
    assert "hf download some-org/not-cached" in hub_line["error"]
    stdin_result = scan("-", "-q", "--jobs", "1", input=f"{paths['diffusers']}\n")
    assert [json.loads(t)["path"] for t in stdin_result.stdout.splitlines()] == [str(paths["diffusers"])]
    glob_result = scan(str(root / "team_b" / "**" / "*.safetensors"), "-q", "--jobs", "1")
    assert [json.loads(t)["path"] for t in glob_result.stdout.splitlines()] == sorted(
        [str(paths["kohya"]), str(paths["diffusers"])])


def test_cached_hub_id_is_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--some-org--tenant-lora" / "snapshots" / revision
    write_peft(snapshot, lora_tensors({"layers.0.q_proj": (8, 8, 4)}))
    (cache / "models--some-org--tenant-lora" / "refs").mkdir()
    (cache / "models--some-org--tenant-lora" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    result = scan("some-org/tenant-lora", "-q", "--jobs", "1")
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(t) for t in result.stdout.splitlines()]
    assert line["path"] == "some-org/tenant-lora" and line["error"] is None and line["format"] == "peft"


@pytest.mark.parametrize("where", ["list", "adapter", "inside_peft"])
def test_output_that_is_an_input_is_refused(tmp_path: Path, where: str) -> None:
    root = tmp_path / "fleet"
    paths = make_collection(root)
    listing = tmp_path / "adapters.txt"
    listing.write_text(f"{paths['kohya']}\n{paths['peft']}\n")
    output = {"list": listing, "adapter": paths["kohya"],
              "inside_peft": paths["peft"] / "adapter_model.safetensors"}[where]
    before = output.read_bytes()
    result = scan(str(listing), "-o", str(output), "--force", "--jobs", "1", "-q")
    assert result.exit_code == 1
    assert "output would overwrite the input" in result.stderr
    assert output.read_bytes() == before
    assert not Path(str(output) + ".partial").exists()


def test_existing_output_needs_force_or_resume(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    make_collection(root)
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    result = scan(str(root), "-o", str(out), "-q", "--jobs", "1")
    assert result.exit_code == 1 and "already exists" in result.stderr and "--resume" in result.stderr
    assert out.read_text() == "previous\n"
    assert scan(str(root), "-q", "--resume").exit_code == 1  # --resume without -o


def test_resume_ignores_a_line_cut_short(tmp_path: Path) -> None:
    """The partial file's last line, cut by the interruption, is dropped and that adapter scanned again."""
    root = tmp_path / "fleet"
    paths = make_collection(root)
    out = tmp_path / "out.jsonl"
    assert scan(str(root), "-o", str(out), "-q", "--jobs", "1").exit_code == 0
    whole = out.read_text().splitlines()
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text(whole[1] + "\n" + whole[0][: len(whole[0]) // 2])
    out.unlink()
    result = scan(str(root), "-o", str(out), "--resume", "--jobs", "1")
    assert result.exit_code == 0, result.output
    assert "1 already done" in result.stderr
    lines = read_lines(out)
    assert [line["path"] for line in lines] == sorted(str(p) for p in paths.values())
    assert not partial.exists()


def test_right_sizing_writes_copies_in_their_own_format(tmp_path: Path) -> None:
    from lora_tools.formats import load_adapter

    root = tmp_path / "fleet"
    paths = make_collection(root)
    nan = lora_tensors({"layers.0.q_proj": (8, 8, 4)})
    nan["base_model.model.layers.0.q_proj.lora_B.weight"][0, 0] = float("nan")
    write_peft(root / "team_c" / "broken", nan)
    out_dir = tmp_path / "small"
    out = tmp_path / "out.jsonl"
    result = scan(str(root), "-o", str(out), "--truncate-energy", "0.99", "--out-dir", str(out_dir), "-q",
                  "--jobs", "2")
    assert result.exit_code == 0, result.output
    lines = {line["path"]: line for line in read_lines(out)}
    peft_line = lines[str(paths["peft"])]
    copy = out_dir / "fleet" / "team_a" / "peft_adapter"
    assert peft_line["truncation"]["output"] == str(copy)
    adapter = load_adapter(copy)
    assert adapter.format == "peft"
    assert adapter.modules["layers.0.q_proj"].rank == peft_line["rank_at_energy"]["layers.0.q_proj"] == 2
    kohya_copy = out_dir / "fleet" / "team_b" / "deep" / "style.safetensors"
    assert load_adapter(kohya_copy).format == "kohya" and load_adapter(kohya_copy).modules[
        "lora_unet_mid_block_attn1_to_q"].rank == 2
    assert lines[str(paths["kohya"])]["truncation"]["ranks"] == {"lora_unet_mid_block_attn1_to_q": 2}
    broken = lines[str(root / "team_c" / "broken")]
    assert broken["error"] is None and "nonfinite" in broken["flags"]
    assert "NaN or Inf" in broken["truncation"]["error"] and broken["truncation"]["output"] is None
    # A second run does not overwrite the copies without --force: each line says so, the scan goes on.
    again = scan(str(root), "-o", str(tmp_path / "again.jsonl"), "--max-rank", "1", "--out-dir", str(out_dir),
                 "-q", "--jobs", "1")
    assert again.exit_code == 0
    assert "already exists" in read_lines(tmp_path / "again.jsonl")[0]["truncation"]["error"]


@pytest.mark.parametrize("args, message", [
    (["--truncate-energy", "0.9", "--max-rank", "4", "--out-dir", "x"], "choose one right-sizing rule"),
    (["--out-dir", "x"], "--out-dir needs a rule"),
    (["--max-rank", "4"], "give --out-dir"),
    (["--max-rank", "0", "--out-dir", "x"], "positive integer"),
    (["--truncate-energy", "1.5", "--out-dir", "x"], "(0, 1]"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_options_fail_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    root = tmp_path / "fleet"
    make_collection(root)
    result = scan(str(root), *args, "-q")
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert not (tmp_path / "x").exists()


def test_out_dir_that_would_replace_the_inputs_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    make_collection(root)
    result = scan(str(root), "--max-rank", "2", "--out-dir", str(tmp_path), "-q")
    assert result.exit_code == 1 and "would replace it" in result.stderr


def test_report_totals_and_serving_memory(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    # Nominal rank 8 needing 2 at 99% energy, and nominal rank 4 needing 4: slot rank 8 today, 4 after.
    write_peft(root / "wide", known_spectrum_tensors("base_model.model.layers.0.q_proj", "peft",
                                                     [3.0, 1.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]), r=8,
               lora_alpha=8)
    write_peft(root / "full", known_spectrum_tensors("base_model.model.layers.0.q_proj", "peft",
                                                     [1.0, 1.0, 1.0, 1.0]), r=4, lora_alpha=4)
    (root / "broken.safetensors").write_bytes(b"junk")
    report_dir = tmp_path / "report"
    result = scan(str(root), "--report", str(report_dir), "-q", "--jobs", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads((report_dir / "report.json").read_text())
    assert summary["totals"]["adapters"] == 3 and summary["totals"]["errors"] == 1
    serving = summary["serving"]
    assert serving["slot_rank_now"] == 8 and serving["slot_rank_at_energy"] == 4
    assert serving["truncate_everything"]["saving"] == pytest.approx(0.5)
    unit = 16  # one 8 x 8 module: 8 + 8 parameters per unit of rank
    assert serving["now"]["params"] == 2 * unit * 8
    assert serving["per_adapter_slots"]["params"] == unit * (2 + 4)
    cap2 = next(c for c in serving["caps"] if c["slot_rank"] == 2)
    assert cap2["adapters_fitting"] == 1 and cap2["worst_module_energy_min"] == pytest.approx(0.5)
    assert summary["histograms"]["nominal_rank"] == {"4": 1, "8": 1}
    text = (report_dir / "report.md").read_text()
    assert "truncate everything at energy 0.99" in text and "broken.safetensors" in text
    for name in ("ranks.png", "slot_rank.png"):
        assert (report_dir / name).read_bytes().startswith(b"\x89PNG")
    # An existing report is refused before any scanning, unless --force.
    again = scan(str(root), "--report", str(report_dir), "-q", "-o", str(tmp_path / "again.jsonl"))
    assert again.exit_code == 1 and "pass --force" in again.stderr
    assert not (tmp_path / "again.jsonl").exists() and not (tmp_path / "again.jsonl.partial").exists()
    assert scan(str(root), "--report", str(report_dir), "-q", "--force", "--jobs", "1").exit_code == 0
