"""benchmarks/gpu_check.py: a clear exit without CUDA, and its code path on a CPU (--dry-run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "report.md")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr and "--dry-run" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "report.md").exists()


def test_dry_run_trains_and_writes_the_report(tmp_path):
    out = tmp_path / "report.md"
    args = ["--dry-run", "--out", str(out), "--technique", "PGD-AT", "--precision", "bf16"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert done.stdout.strip() == report.strip()  # the same markdown on stdout and in the file
    assert report.startswith("# artplug GPU check (all steps passed)")
    (row,) = [line for line in report.splitlines() if line.startswith("| PGD-AT |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "bf16" and float(cells[2].replace(",", "")) > 0
    assert cells[3].endswith(" s") and cells[4].endswith("MiB")
    for title in ("GPU tests", "Engine overhead", "Data-parallel"):
        section = report[report.index(title) :]
        assert section.splitlines()[2].startswith("Skipped: --tiny / --dry-run")


def test_epoch_metrics_reads_the_last_epoch_line(tmp_path):
    gpu_check = load_script()
    run = tmp_path / "run-1"
    run.mkdir()
    lines = [
        {"step": 1, "train/loss": 2.0},
        {"step": 2, "cost/epoch_s": 4.0, "cost/examples_per_s": 10.0},
        {"step": 4, "cost/epoch_s": 2.0, "cost/examples_per_s": 20.0, "cost/peak_memory_mb": 5},
        {"step": 4, "test/clean_acc": 0.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert gpu_check.epoch_metrics(tmp_path)["cost/epoch_s"] == 2.0
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "metrics.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="expected one run folder"):
        gpu_check.epoch_metrics(tmp_path)


def test_examples_per_epoch_and_failed_rows():
    gpu_check = load_script()
    full = gpu_check.Settings("cuda", False, Path("x.md"), frozenset(), 1.0)
    # 50,000 synthetic training examples, 1,000 of them val, full batches of 512 only.
    assert gpu_check.epoch_examples(full) == 48_640
    done = gpu_check.Done(1, "loading\nError: recipes/x.toml: data: bad | value\n", 3.0)
    assert done.error() == "recipes/x.toml: data: bad \\| value"  # escaped for a table cell
    assert gpu_check.Done(None, "", 9.0).error() == "timed out after 9 s"
    section = gpu_check.Section("T", ["a", "b"], [["1", "2"]], ["note"])
    assert section.markdown() == "## T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nnote\n"
