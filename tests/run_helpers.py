"""Copies of the finished tiny run (tests/conftest.py::finished_run) for the checkpoint and resume
tests: the shared run itself is never written to."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.proc_helpers import write_run


def copy_of(finished: dict, tmp_path: Path, name: str, **train) -> tuple[Path, Path]:
    """(output_dir, config) of a copy of the finished run (train: changed train fields); the shared
    run itself is never written to."""
    out = tmp_path / name
    shutil.copytree(finished["output_dir"], out)
    run = finished | {"output_dir": str(out), "train": finished["train"] | train}
    return out, write_run(tmp_path / f"{name}.json", run)


def snapshot(folder: Path) -> dict:
    """Every file below folder with its modification time and bytes (to show nothing was written)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}
