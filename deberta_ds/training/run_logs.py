"""The run's JSON-lines logs (OUTPUT/metrics.jsonl, OUTPUT/eval.jsonl): appended one entry per line
by rank 0, cut back to a checkpoint's step on resume. A write that fails (a full disk) stops the
run with an error naming the file; a line it cut short never blocks a relaunch."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

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
