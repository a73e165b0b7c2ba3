"""Durable, all-or-nothing output: every file this project writes for later use goes through here.

A file is written under a temporary name in its own folder, flushed and fsynced, renamed over
the target (an atomic step on POSIX file systems), and the folder is fsynced so the rename
itself survives a crash. A reader therefore sees the old file or the complete new one, never
a half-written one; on an error the temporary file is removed.

A folder cannot be renamed over a non-empty one, so committing a folder takes three steps: the
old folder is renamed aside (X.old), the new one renamed in, the old one deleted. A crash
between the first two leaves X.old complete and no X: `recover` (which every writer runs before
writing X again) renames it back, so X is always the old or the new folder, never lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a folder (and the folders themselves)."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync_tree(child)
            else:
                fsync_folder(child)
        fsync_folder(path)
        return
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def aside_name(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def recover(path: Path) -> None:
    """Finish a folder commit a crash interrupted: X.old without X is the old folder, moved aside
    just before the new one would have been renamed in (restore it); X.old beside X is the old
    folder the commit had not yet deleted."""
    aside = aside_name(path)
    if not aside.is_dir():
        return
    if path.exists():
        shutil.rmtree(aside)
    else:
        os.replace(aside, path)
        fsync_folder(path.parent)


def commit(tmp: Path, path: Path) -> None:
    """fsync the finished temporary file (or folder), rename it over `path`, fsync the parent.
    An existing folder is first moved aside (see `recover`), and deleted once the new one is in."""
    _fsync_tree(tmp)
    recover(path)
    aside = aside_name(path)
    replaces_folder = path.is_dir() and tmp.is_dir()
    if replaces_folder:
        os.replace(path, aside)
        fsync_folder(path.parent)
    os.replace(tmp, path)
    fsync_folder(path.parent)
    if replaces_folder:
        shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """For writers that take a file (or folder) name: yields the temporary name; when the block
    ends without an error the output is committed to `path`, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    recover(path)  # a folder commit a crash interrupted
    _remove(tmp)   # left by a writer that was killed
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """text or bytes -> path, all or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
