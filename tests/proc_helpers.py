"""Run a command (often a launcher with children) so that a hang fails the test, not the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_bounded(command: list[str], timeout_s: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True) in its own session; past timeout_s
    the whole process group (the launcher's ranks too) is killed and the test fails with the
    output so far."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)[:200]} did not finish within {timeout_s} s\n"
                             f"{stdout[-2000:]}{stderr[-2000:]}") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


REPO = Path(__file__).resolve().parents[1]
# A process that takes output_dir's run lock (argv[1]), prints what acquire() said, and holds it.
HOLD_LOCK = ("import sys, time\nfrom pathlib import Path\nfrom deberta_ds.training.run_lock import RunLock\n"
             "lock = RunLock(Path(sys.argv[1]))\nprint(lock.acquire(), flush=True)\ntime.sleep(600)\n")


def train_cli(config: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    """`python -m deberta_ds.train --config CONFIG EXTRA...` in one process: its exit code must be
    `expect`, and no traceback is printed."""
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(config), *extra], cwd=REPO)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def write_run(path: Path, run: dict) -> Path:
    path.write_text(json.dumps(run))
    return path


def signal_a_training_run(config: Path, metrics: Path, signum: int, timeout_s: float = 300) -> tuple[int, str]:
    """Start `python -m deberta_ds.train --config CONFIG`, send `signum` once metrics.jsonl holds two
    steps; (exit code, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "deberta_ds.train", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=timeout_s)
    return process.returncode, stderr
