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
    rows = [line.split("|")[3].strip() for line in result.stdout.splitlines() if line.startswith("| 40 |")]
    assert rows == ["fused", "ours-ref", "sdpa", "hf"]  # FlashDeBERTa is not installed here
    assert "fused fwd+bwd peak memory at L=40" in result.stdout
