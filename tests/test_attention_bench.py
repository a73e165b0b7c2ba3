"""benchmarks/attention_bench.py runs end to end (on the CPU, Triton's interpreter, tiny sizes), so a
GPU session spends its time measuring, not debugging the harness. No numbers are checked."""

import os
import sys
from pathlib import Path

import pytest

from tests.kernel_helpers import tile_classes
from tests.proc_helpers import run_bounded

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attention_bench_smoke_run_on_cpu():
    from benchmarks.kernel_work import work_ratios

    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = run_bounded([sys.executable, "benchmarks/attention_bench.py", "--device", "cpu", "--lengths", "40",
                          "--tokens", "40", "--repeats", "1"], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[3].strip(): line.split("|")[9].strip() for line in result.stdout.splitlines()
            if line.startswith("| 40 |")}
    assert list(rows) == ["fused", "ours-ref", "sdpa", "hf"]  # FlashDeBERTa is not installed here
    assert rows["fused"] == f"{work_ratios(40, 256, 512)['total']:.2f}x" and rows["sdpa"] == "1x"
    assert "fused fwd+bwd peak memory at L=40" in result.stdout


@pytest.mark.slow
def test_kernel_tune_smoke_run_on_cpu(tmp_path):
    """benchmarks/kernel_tune.py compiles candidates in worker processes, times them with and without
    dropout, checks each against float64 and times the peers: the whole harness, at tiny sizes."""
    import json

    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = run_bounded([sys.executable, "benchmarks/kernel_tune.py", "--out", str(tmp_path / "tune.json"),
                          "--cpu-smoke"], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tune = json.loads((tmp_path / "tune.json").read_text())
    assert [row["candidate"] for row in tune["rows"]] == ["default"]
    assert set(tune["peers"]["L64"]) == {"ours-ref", "sdpa"}            # no GPU peers here
    for row in tune["rows"]:
        assert row["worst_relative_error"] < 1e-5, row                    # fp32 on the CPU
        assert row["L64 p0.1"]["fwd_bwd_ms"] > 0 and row["L32 p0.0"]["fwd_ms"] > 0
    assert "best at L=64" in result.stdout


def test_kernel_work_model_counts_tiles_like_the_kernel():
    """benchmarks/kernel_work.py classifies tiles by their corner distances; check it against a
    pair-by-pair count from the slot table, for each kernel's orientation."""
    from benchmarks.kernel_work import tile_counts, work_ratios

    for L, k, max_rel in [(300, 32, 64), (70, 8, 24), (1000, 64, 128), (33, 4, 8)]:
        for rows, cols, key_major in [(128, 64, False), (32, 16, False), (32, 16, True)]:
            assert tile_counts(L, k, max_rel, rows, cols, key_major) == tile_classes(L, k, max_rel, rows, cols,
                                                                                     key_major), (L, k, max_rel)
    no_saturation = work_ratios(256, 256, 512)
    assert no_saturation["saturated"] == 0 and no_saturation["forward"] > 1.0
