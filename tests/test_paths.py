"""Path arguments (directories, globs, single paths) mean the same for input files and for shards:
one rule, `deberta_ds.data.paths.expand_path`, seen through both callers."""

import numpy as np
import pytest

from data_prep.inputs import expand_inputs
from deberta_ds.data.indexed_dataset import ShardWriter, find_shard_prefixes
from deberta_ds.errors import MissingInputError


def test_input_files_from_directories_globs_and_single_paths(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.jsonl", "sub/.swap", ".hidden"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    names = lambda files: [str(p.relative_to(tmp_path)) for p in files]  # noqa: E731
    assert names(expand_inputs([tmp_path])) == ["a.txt", "b.txt", "sub/c.jsonl"]  # recursive, sorted, no hidden
    assert names(expand_inputs([f"{tmp_path}/**/*.jsonl", tmp_path / "b.txt"])) == ["sub/c.jsonl", "b.txt"]
    with pytest.raises(MissingInputError, match="--input .*nothing.txt: no such file, directory or glob match"):
        expand_inputs([tmp_path / "nothing.txt"])
    with pytest.raises(MissingInputError, match=r"--input .*\*.gz: matched no files"):
        expand_inputs([f"{tmp_path}/*.gz"])


def test_shard_prefixes_from_directories_globs_and_single_paths(tmp_path):
    for prefix in ("wiki_00001", "wiki_00000", "books_00000"):
        writer = ShardWriter(tmp_path / prefix, np.uint16)
        writer.add_document(np.arange(1, 5))
        writer.finalize()
    every = [str(tmp_path / p) for p in ("books_00000", "wiki_00000", "wiki_00001")]
    assert find_shard_prefixes([tmp_path]) == every
    assert find_shard_prefixes([f"{tmp_path}/wiki_*"]) == every[1:]          # .bin and .idx: one prefix each
    assert find_shard_prefixes([tmp_path / "books_00000.idx", tmp_path / "wiki_00001"]) == [every[0], every[2]]
    with pytest.raises(MissingInputError, match="no shards"):
        find_shard_prefixes([f"{tmp_path}/news_*"])
    with pytest.raises(MissingInputError, match="news_00000.idx: shard index not found"):
        find_shard_prefixes([tmp_path / "news_00000"])
