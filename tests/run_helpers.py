"""Training runs through the command line for the checkpoint and resume tests: run configs written
to files, `python -m deberta_ds.train` with its exit status checked, copies of a finished run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.proc_helpers import run_bounded

REPO = Path(__file__).resolve().parents[1]


def write_run(path: Path, run: dict) -> Path:
    path.write_text(json.dumps(run))
    return path


def train_cli(config: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    """`python -m deberta_ds.train --config config *extra`: exit status `expect`, and never a traceback."""
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(config), *extra], cwd=REPO)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def copy_of(finished: dict, tmp_path: Path, name: str, **train) -> tuple[Path, Path]:
    """(output_dir, config) of a copy of the finished run (train: changed train fields); the shared
    run itself is never written to."""
    out = tmp_path / name
    shutil.copytree(finished["output_dir"], out)
    run = finished | {"output_dir": str(out), "train": finished["train"] | train}
    return out, write_run(tmp_path / f"{name}.json", run)
