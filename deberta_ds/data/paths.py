"""What a user's path argument names: a directory, a glob or one path (the one home of that rule for
input files and for shards)."""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path


def expand_path(pattern: str | Path, in_directory: Callable[[Path], list[Path]],
                keep: Callable[[str], bool]) -> list[str]:
    """A directory -> what `in_directory` lists in it; a glob (`**` recursive) -> its matches that `keep`
    accepts; anything else -> itself (the caller decides whether it exists). Sorted, so every rank and
    every rerun sees the same order."""
    pattern = str(pattern)
    path = Path(pattern)
    if path.is_dir():
        return sorted(str(p) for p in in_directory(path))
    if any(ch in pattern for ch in "*?["):
        return sorted(match for match in glob.glob(pattern, recursive=True) if keep(match))
    return [pattern]
