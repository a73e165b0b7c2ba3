"""One run per output_dir: an exclusive lock on OUTPUT/.run.lock, held by rank 0 while it trains.

The lock is an flock (the kernel drops it when its holder dies, even by SIGKILL), and the file
names its holder (pid, host, start time). A second run into a busy folder is refused naming the
holder; a run that finds the file naming a holder but the lock free knows that holder ended
without releasing it (a crash or a kill) and takes it over, saying so. A clean end empties it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from deberta_ds.errors import UserError

LOCK_FILE = ".run.lock"


class OutputBusyError(UserError):
    """Another run holds the output folder's lock."""


class RunLock:
    def __init__(self, output: Path):
        self.path = output / LOCK_FILE
        self.handle = None

    def acquire(self) -> str | None:
        """Take the lock, or raise OutputBusyError naming the holder; a line for the log when a
        holder that ended without releasing it is taken over (None otherwise)."""
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self.path)
            handle.close()
            raise OutputBusyError(f"output_dir {self.path.parent}: another run is training into it ({holder}; its lock "
                                  f"{self.path}); wait for it to end, stop it, or choose another output_dir") from None
        except OSError as error:  # a file system without locks: say so, never block a run on it
            handle.close()
            return f"warning: cannot lock {self.path} ({error}); make sure no other run writes into this output_dir"
        previous = _holder(self.path)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        self.handle = handle
        return (f"{self.path}: taken over from a run that ended without releasing it ({previous}: a crash or a kill)"
                if previous else None)

    def release(self) -> None:
        """A clean end: the file is emptied (no holder), then the lock dropped."""
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.close()
            self.handle = None


def _holder(path: Path) -> str | None:
    """'pid P on host H since T' of the lock file's content, None when it names no holder."""
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return "an unreadable holder record"
    if not isinstance(holder, dict):
        return None
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
