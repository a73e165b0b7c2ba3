"""Run a command (often a launcher with children) so that a hang fails the test, not the suite."""

from __future__ import annotations

import os
import signal
import subprocess


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
