"""benchmarks/attention_bench.py runs end to end (on the CPU, Triton's interpreter, tiny sizes), so a
GPU session spends its time measuring, not debugging the harness. No numbers are checked."""

import os
import sys
from pathlib import Path

import pytest

from tests.kernel_helpers import tile_kinds
from tests.proc_helpers import run_bounded

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attention_bench_smoke_run_on_cpu():
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = run_bounded([sys.executable, "benchmarks/attention_bench.py", "--device", "cpu", "--lengths", "40",
                          "--tokens", "40", "--repeats", "1"], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[3].strip(): line.split("|")[9].strip() for line in result.stdout.splitlines()
            if line.startswith("| 40 |")}
    assert list(rows) == ["fused", "ours-ref", "sdpa", "hf"]  # FlashDeBERTa is not installed here
    assert rows["fused"] == "4.14x" and rows["sdpa"] == "1x"  # no saturated tiles at L = 40: 29 / 7 units
    assert "fused fwd+bwd peak memory at L=40" in result.stdout


@pytest.mark.slow
def test_kernel_tune_smoke_run_on_cpu(tmp_path):
    """benchmarks/kernel_tune.py compiles candidates in worker processes, times them, checks each
    against float64 and times packed documents: the whole harness, at tiny sizes."""
    import json

    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = run_bounded([sys.executable, "benchmarks/kernel_tune.py", "--out", str(tmp_path / "tune.json"),
                          "--cpu-smoke"], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tune = json.loads((tmp_path / "tune.json").read_text())
    assert len(tune["rows"]) == 1 and tune["rows"][0]["default"] and set(tune["sdpa"]) == {"L32", "L64"}
    for row in tune["rows"]:
        assert row["worst_relative_error"] < 1e-5, row            # fp32 on the CPU
        assert row["L64"]["packed_ms"] > 0 and row["L64"]["separate_ms"] > 0
    assert "best at L=64" in result.stdout


def test_kernel_work_model_counts_tiles_like_the_kernel():
    """benchmarks/kernel_work.py classifies tiles per diagonal; check it against a tile-by-tile count."""
    from benchmarks.kernel_work import tile_counts, work_ratios

    for L, k, max_rel in [(300, 32, 64), (70, 8, 24), (1000, 64, 128), (33, 4, 8)]:
        kinds = tile_kinds(L, k, max_rel)
        assert tile_counts(L, k, max_rel) == (kinds.total(), kinds["saturated"]), (L, k, max_rel)
        assert 0 < kinds["saturated"] < kinds.total() or L < 100
    no_saturation = work_ratios(128, 256, 512)  # every tile has its windows: 2 + 4 units vs 2 forward
    assert no_saturation["saturated"] == 0 and no_saturation["forward"] == 3.0
