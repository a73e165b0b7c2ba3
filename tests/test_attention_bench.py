"""benchmarks/attention_bench.py runs end to end (on the CPU, Triton's interpreter, tiny sizes), so a
GPU session spends its time measuring, not debugging the harness. No numbers are checked."""

import os
import sys
from pathlib import Path

import pytest

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


def test_kernel_work_model_counts_tiles_like_the_kernel():
    """benchmarks/kernel_work.py classifies tiles per diagonal; check it against a tile-by-tile count
    (the kernel's own test: one slot over the tile's clamped distances)."""
    import torch

    from benchmarks.kernel_work import tile_counts, work_ratios
    from deberta_ds.kernels.triton_attention import BLOCK_M, BLOCK_N, slot_table

    for L, k, max_rel in [(300, 32, 64), (70, 8, 24), (1000, 64, 128), (33, 4, 8)]:
        slots, tiles, saturated = slot_table(L, k, max_rel, "cpu"), 0, 0
        for m0 in range(0, L, BLOCK_M):
            for n0 in range(0, L, BLOCK_N):
                rel = torch.arange(m0, m0 + BLOCK_M)[:, None] - torch.arange(n0, n0 + BLOCK_N)[None, :]
                tile = slots[(rel + L - 1).clamp(0, 2 * L - 2)]
                tiles, saturated = tiles + 1, saturated + int(tile.min() == tile.max())
        assert tile_counts(L, k, max_rel) == (tiles, saturated), (L, k, max_rel)
        assert 0 < saturated < tiles or L < 100
    no_saturation = work_ratios(128, 256, 512)  # every tile has its windows: 2 + 4 units vs 2 forward
    assert no_saturation["saturated"] == 0 and no_saturation["forward"] == 3.0
