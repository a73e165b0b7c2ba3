"""Content hashes recorded when a file is written and checked when it is read: the one home of
how files are hashed (checkpoints record theirs in the COMPLETE marker, shards in their job's
manifest). What it costs: benchmarks/checkpoint_verify_bench.py (README, "Reliability")."""

from __future__ import annotations

import hashlib
from pathlib import Path

from deberta_ds.errors import UserError

_BLOCK = 1 << 20
_SAMPLES = 16  # blocks of the sampled hash: its cost does not grow with the file


def file_sha256(path: str | Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:  # into one buffer: about 10% faster than read()
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def sampled_sha256(path: str | Path) -> str:
    """sha256 of _SAMPLES blocks of 64 KiB spread evenly from the file's start to its end (they
    overlap, covering every byte, in a file of up to 1 MiB)."""
    size, piece = Path(path).stat().st_size, 1 << 16
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for offset in sorted({max(size - piece, 0) * i // (_SAMPLES - 1) for i in range(_SAMPLES)}):
            handle.seek(offset)
            digest.update(handle.read(piece))
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    """What is recorded for a file when it is written."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path), "sampled_sha256": sampled_sha256(path)}


class ContentMismatchError(UserError):
    """A file differs from what was recorded when it was written."""


def check_file(path: Path, record: dict, full: bool = True) -> None:
    """Raise ContentMismatchError naming `path` when its size or hash (full: sha256 of every byte;
    otherwise the sampled one) differs from `record`."""
    if not path.is_file():
        raise ContentMismatchError(f"{path}: missing (it was recorded when the files were written)")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ContentMismatchError(f"{path}: the file is truncated or damaged ({size} bytes, {record['bytes']} "
                                   "when it was written)")
    key, hash_of = ("sha256", file_sha256) if full else ("sampled_sha256", sampled_sha256)
    if hash_of(path) != record[key]:
        raise ContentMismatchError(f"{path}: the file is damaged: its content hash differs from the one recorded "
                                   "when it was written (bit rot, or the file was modified)")
