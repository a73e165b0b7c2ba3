"""The run's log: the console, TensorBoard (OUTPUT/tensorboard) and the JSON-lines logs
(OUTPUT/metrics.jsonl, OUTPUT/eval.jsonl), written by rank 0. The JSON-lines logs are appended one
entry per line and cut back to a checkpoint's step on resume. A write that fails (a full disk)
stops the run with an error naming the file; a line it cut short never blocks a relaunch."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from deberta_ds.atomic_files import write_atomic
from deberta_ds.errors import UserError


class LogWriteError(UserError):
    """A log line could not be written (exit code 1, no traceback)."""


def log_entry(line: str) -> dict | None:
    """A log line's entry, or None for a line that is not a whole entry (a write cut short)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and type(entry.get("step")) is int else None


def truncate_log(path: Path, step: int, warn=print) -> None:
    """Drop a JSON-lines log's entries past `step` (written after the checkpoint a run resumes
    from), so each step stands in it once, and lines that are not whole entries (a write cut short
    by a full disk or a kill), named through `warn`; replaced atomically."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    entries = [log_entry(line) for line in lines]
    damaged = [number for number, entry in enumerate(entries, 1) if entry is None]
    if damaged:
        warn(f"{path}: dropped line {', '.join(map(str, damaged))}: not a whole JSON entry (a write cut short by a "
             "full disk or a kill)")
    kept = [line for line, entry in zip(lines, entries) if entry is not None and entry["step"] <= step]
    if len(kept) < len(lines):  # untouched otherwise (a relaunch of a finished run changes nothing)
        write_atomic(path, "".join(line + "\n" for line in kept))


def append_log(path: Path, entry: dict) -> None:
    """One JSON line appended to a log. A failed write (a full disk) is cut back to the last whole
    line where the file system allows and stops the run with an error naming the file."""
    line = memoryview((json.dumps(entry) + "\n").encode())
    try:
        with open(path, "ab", buffering=0) as handle:  # unbuffered: nothing is left to fail at close
            end = handle.tell()
            try:
                while line:
                    line = line[handle.write(line):]
            except OSError:
                with contextlib.suppress(OSError):  # where it cannot, the relaunch drops the cut line
                    handle.truncate(end)
                raise
    except OSError as error:
        raise LogWriteError(f"appending to {path} failed: {error} (disk full?); free space and relaunch the same "
                            "command: it continues from the last complete checkpoint") from None


def evaluation_logged(path: Path, step: int) -> bool:
    """Whether a JSON-lines evaluation log holds step's entry (a damaged line or byte is no entry)."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return step in {entry["step"] for entry in map(log_entry, lines) if entry}


class ScalarLog:
    """TensorBoard scalars on rank 0 only (a no-op elsewhere). The event file is created by the
    first write, so a run that logs nothing (a relaunch of a finished run) leaves no trace. A
    resumed run purges the events past its checkpoint's step (purge_step), as the JSON-lines logs
    drop theirs, so that TensorBoard shows each step once."""

    def __init__(self, log_dir, enabled: bool):
        self.log_dir, self.enabled, self.writer, self.purge_step = log_dir, enabled, None, None

    def write(self, scalars: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        for name, value in scalars.items():
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLog:
    """One run's log. Console lines and files come from rank 0 only; `history` (each training
    log step's entry) is kept on every rank. Every rank must call `start` (once the step the run
    starts from is known) and `has_evaluation`."""

    def __init__(self, output: Path, rank: int):
        self.rank, self.metrics, self.evaluations = rank, output / "metrics.jsonl", output / "eval.jsonl"
        self.scalars = ScalarLog(output / "tensorboard", rank == 0)
        self.history: list[dict] = []

    def console(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    def start(self, step: int) -> None:
        """Drop the entries past `step`: a resumed run's were written after its checkpoint (and,
        starting afresh, none was ever kept)."""
        if self.rank == 0:
            for log in (self.metrics, self.evaluations):
                truncate_log(log, step, warn=self.console)
        self.scalars.purge_step = step + 1 if step else None

    def training(self, step: int, consumed: int, metrics: dict, eta: str = "") -> None:
        """A log step's metrics (means since the previous log step): history, metrics.jsonl,
        TensorBoard and the losses on the console (with `eta`, the time left)."""
        entry = {"step": step, "consumed_samples": consumed} | metrics
        self.history.append(entry)
        if self.rank == 0:
            append_log(self.metrics, entry)
        self.scalars.write(metrics, step)
        self.console(f"step {step}: " + "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items()
                                                  if k.startswith(("generator/mlm", "discriminator/rtd"))
                                                  and v is not None) + (f"  (eta {eta})" if eta else ""))

    def evaluation(self, step: int, metrics: dict) -> None:
        """An evaluation's metrics: eval.jsonl, TensorBoard and the console."""
        self.scalars.write(metrics, step)
        if self.rank == 0:
            append_log(self.evaluations, {"step": step} | metrics)
        self.console(f"eval at step {step}: " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()))

    def has_evaluation(self, step: int) -> bool:
        """Whether eval.jsonl holds step's row (rank 0 reads it; every rank gets the answer)."""
        held = [evaluation_logged(self.evaluations, step) if self.rank == 0 else None]
        dist.broadcast_object_list(held, src=0)
        return held[0]

    def close(self) -> None:
        self.scalars.close()
