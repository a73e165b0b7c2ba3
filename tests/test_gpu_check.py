"""launch_scripts/gpu_check.sh --cpu-smoke: the whole GPU check at tiny shapes on the CPU, so a
GPU session spends its minutes measuring, not debugging the harness. It must pass and write the
files a GPU run writes; no number is checked (CPU timings mean nothing)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.proc_helpers import run_bounded

REPO = Path(__file__).resolve().parents[1]
PARTS = ("install", "pytest", "attention_bench", "train_bench", "quickstart")


@pytest.mark.slow
def test_gpu_check_cpu_smoke_run_passes_and_writes_every_file(tmp_path):
    out = tmp_path / "out"
    result = run_bounded(["bash", "launch_scripts/gpu_check.sh", "--cpu-smoke", str(out)], timeout_s=1500, cwd=REPO,
                         env={**os.environ, "WORK": str(tmp_path / "work")})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{part}.log" for part in PARTS] +
                                                           ["summary.md", "train_bench.json"])  # at most 8 come back
    summary = (out / "summary.md").read_text()
    for part in PARTS:
        assert f"| {part} | pass" in summary, summary
    assert "passed" in (out / "pytest.log").read_text() and " skipped" not in (out / "pytest.log").read_text()
    bench = json.loads((out / "train_bench.json").read_text())
    assert set(bench["systems"]) == {"deberta_ds", "deberta_ds-reference", "hf-deberta", "hf-deberta-df",
                                     "modernbert"}
    for system in ("deberta_ds", "deberta_ds-reference", "hf-deberta", "modernbert"):  # no DisentangledFlash here
        row = bench["systems"][system]
        assert row["tokens_per_s"] > 0 and {"mfu", "peak_memory_gb"} <= set(row), (system, row)
    assert bench["systems"]["deberta_ds-reference"]["attention_impl"] == "reference"
    assert bench["systems"]["deberta_ds"]["attention_impl"] == "auto"
    assert 0 <= bench["systems"]["deberta_ds"]["data_wait_fraction"] <= 1
    assert "MLM loss" in (out / "quickstart.log").read_text()


def test_gpu_scripts_are_valid_bash_and_check_their_arguments(tmp_path):
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch_scripts" / script)]).returncode == 0
    result = subprocess.run(["bash", str(REPO / "launch_scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
    result = subprocess.run(["bash", str(REPO / "launch_scripts" / "gpu_check.sh"), "--fast", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown flag --fast" in result.stderr


@pytest.mark.slow
def test_gpu_check_profile_part_writes_one_small_file(tmp_path):
    """PARTS=profile: torch.profiler over the pair's training steps (CPU smoke: CPU ops stand in
    for kernels) into OUT/profile.md, with the summary's headline lines."""
    out = tmp_path / "out"
    result = run_bounded(["bash", "launch_scripts/gpu_check.sh", "--cpu-smoke", str(out)], timeout_s=600, cwd=REPO,
                         env={**os.environ, "WORK": str(tmp_path / "work"), "PARTS": "profile"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    profile = (out / "profile.md").read_text()
    assert profile.startswith("# deberta_ds-reference: 2 profiled training steps")
    assert "device idle between kernels" in profile and "aten::_local_scalar_dense" in profile
    rows = [line for line in profile.splitlines() if line.startswith("| ") and not line.startswith("| kernel")]
    assert 10 <= len(rows) <= 30 and "aten::mm" in profile
    assert "## profile" in (out / "summary.md").read_text()
