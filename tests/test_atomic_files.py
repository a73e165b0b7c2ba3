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
