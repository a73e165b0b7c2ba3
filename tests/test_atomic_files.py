"""The one durable-write helper: all or nothing, for files and folders."""

import pytest

from deberta_ds.atomic_files import atomic_path, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    write_atomic(target, b"new")
    assert target.read_text() == "new" and not (target.parent / "metrics.json.tmp").exists()


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "best"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and not (tmp_path / "best.tmp").exists()


_KILLED_WRITER = """
import os, shutil, sys
from pathlib import Path
from deberta_ds.atomic_files import atomic_path

calls, kill_at = [0], int(sys.argv[2])

def dies_at_call(function):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)  # a kill: no clean-up runs
        return function(*args, **kwargs)
    return wrapped

os.replace, os.fsync, shutil.rmtree = dies_at_call(os.replace), dies_at_call(os.fsync), dies_at_call(shutil.rmtree)
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new weights")
    (tmp / "config.json").write_text("new config")
"""


def _contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else None


def test_a_writer_killed_at_any_step_of_a_folder_commit_leaves_the_old_or_the_new_folder(tmp_path):
    """The writer is killed (os._exit) at its 1st, 2nd, ... rename, fsync or delete until it runs
    to the end. After each kill the folder is the old or the new one complete, or (killed between
    moving the old one aside and renaming the new one in) the old one is complete beside it and
    the next writer's `recover` puts it back. Deleting the old folder before the rename (the
    previous commit) loses it at one of these kills."""
    import subprocess
    import sys

    from deberta_ds.atomic_files import aside_name, recover

    old = {"model.safetensors": "old weights", "config.json": "old config"}
    new = {"model.safetensors": "new weights", "config.json": "new config"}
    states, kill_at = set(), 1
    while True:
        target = tmp_path / f"run{kill_at}" / "best"
        target.mkdir(parents=True)
        for name, text in old.items():
            (target / name).write_text(text)
        result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target), str(kill_at)])
        assert result.returncode in (0, 9)
        seen = (_contents(target) in (old, new) and "complete", _contents(aside_name(target)) == old and "aside")
        assert seen[0] or seen[1], (kill_at, _contents(target), _contents(aside_name(target)))
        states.add(seen)
        recover(target)
        assert _contents(target) in (old, new) and not aside_name(target).exists()
        if result.returncode == 0:
            assert _contents(target) == new
            break
        kill_at += 1
    assert (False, "aside") in states, "no kill landed between the two renames; the test proves nothing"


def test_the_sampled_hash_sees_a_change_in_each_sampled_block_and_the_size(tmp_path):
    """Training's cheap check: a byte changed in the first, a middle or the last sampled block of a
    4 MiB file changes the sampled hash; one between blocks does not (that is what `verify` is for)."""
    import os

    from deberta_ds.content_hash import ContentMismatchError, check_file, file_record, sampled_sha256

    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(4 << 20))
    record = file_record(path)
    step = ((4 << 20) - (1 << 16)) // 15  # the sampled blocks start at multiples of this
    for offset, seen in ((0, True), (7 * step + 100, True), ((4 << 20) - 1, True), (7 * step + (1 << 16) + 5, False)):
        data = bytearray(path.read_bytes())
        data[offset] ^= 1
        path.write_bytes(bytes(data))
        assert (sampled_sha256(path) != record["sampled_sha256"]) == seen, offset
        with pytest.raises(ContentMismatchError, match="content hash differs"):
            check_file(path, record, full=True)
        data[offset] ^= 1
        path.write_bytes(bytes(data))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ContentMismatchError, match=f"{path}: the file is truncated or damaged"):
        check_file(path, record, full=False)
