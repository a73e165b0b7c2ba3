"""Provenance through every data_prep step: tokenize, split and merge outputs carry a manifest, every
reader (verify, inspect, merge, split, mixture, training) checks its input against its own, and each
way a manifest can be missing or malformed is named (issue 33, item 1; issue 35, item 5)."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from data_prep.cli import main as cli
from deberta_ds.data.indexed_dataset import IndexedShard, find_shard_prefixes
from deberta_ds.training.run_config import run_config_from_dict
from tests.train_helpers import trainer_data


def _tokenize(corpus, prefix, tokenizer, *extra) -> None:
    assert cli(["tokenize", "--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
                "--shard-tokens", "60000", "--no-progress", *extra]) == 0


def _train(paths, tokenizer):
    return trainer_data(run_config_from_dict({"model": "tiny", "data": {"train": [str(p) for p in paths],
                                                                      "tokenizer": str(tokenizer)}}))


@pytest.fixture(scope="module")
def job(tmp_path_factory, small_corpus, tokenizer_dir):
    """A finished tokenize job of several shards, PREFIX = job/s (copied by the tests that change it)."""
    folder = tmp_path_factory.mktemp("job")
    _tokenize(small_corpus, folder / "s", tokenizer_dir)
    assert len(find_shard_prefixes([folder])) >= 3
    return folder


def _copy(job, tmp_path):
    return shutil.copytree(job, tmp_path / "set")


def test_split_and_merge_outputs_carry_the_manifest_of_their_input(tmp_path, job, tokenizer_dir, capsys):
    """The README's pipeline: tokenize -> split (-> merge) -> verify / train, each output with its manifest
    (tokenizer hash, sizes, hashes); the tokenizer travels through every step."""
    assert cli(["split", "--input", str(job / "s"), "--output-prefix", str(tmp_path / "sp"),
                "--valid-fraction", "0.1"]) == 0
    assert cli(["merge", "--input", str(tmp_path / "sp_train"), str(tmp_path / "sp_valid"), "--output-prefix",
                str(tmp_path / "m")]) == 0
    recorded = json.loads((job / "s.manifest.json").read_text())["tokenizer_sha256"]
    for name in ("sp_train", "sp_valid", "m"):
        manifest = json.loads((tmp_path / f"{name}.manifest.json").read_text())
        assert manifest["tokenizer_sha256"] == recorded and manifest["complete"] is True
        assert [entry["prefix"] for entry in manifest["shards"]] == [str(tmp_path / name)]
        assert manifest["shards"][0]["documents"] == IndexedShard(tmp_path / name).num_documents
    capsys.readouterr()
    assert cli(["verify", str(tmp_path / "sp_train"), str(tmp_path / "sp_valid"), str(tmp_path / "m"),
                "--tokenizer", str(tokenizer_dir)]) == 0
    _train([tmp_path / "sp_train"], tokenizer_dir)
    assert cli(["merge", "--input", str(tmp_path / "m"), "--output-prefix", str(tmp_path / "m")]) == 0  # rewritten
    assert cli(["verify", str(tmp_path / "m"), "--tokenizer", str(tokenizer_dir)]) == 0
    assert cli(["merge", "--input", str(tmp_path / "m"), "--output-prefix", str(job / "s")]) == 1
    assert f"{job / 's.manifest.json'}: holds the manifest of other shards" in capsys.readouterr().err
    assert not (job / "s.bin").exists()
    shard = job / "s_00000.bin"
    before = shard.read_bytes()
    assert cli(["merge", "--input", str(tmp_path / "m"), "--output-prefix", str(job / "s_00000")]) == 1
    error = capsys.readouterr().err
    assert f"{job / 's.manifest.json'}: lists {job / 's_00000'} as a shard of its tokenize job" in error, error
    assert shard.read_bytes() == before and not (job / "s_00000.manifest.json").exists()


def test_a_split_of_another_tokenizers_shards_is_refused_by_verify_and_training(tmp_path, small_corpus,
                                                                                  tokenizer_dir, other_tokenizer,
                                                                                  capsys):
    """Before: a split wrote no manifest, so `verify --tokenizer` said OK (printing gibberish) and
    training trained on another tokenizer's ids."""
    _tokenize(small_corpus, tmp_path / "theirs", other_tokenizer)
    assert cli(["split", "--input", str(tmp_path / "theirs"), "--output-prefix", str(tmp_path / "sp"),
                "--valid-fraction", "0.1"]) == 0
    theirs = json.loads((tmp_path / "theirs.manifest.json").read_text())["tokenizer_sha256"]
    capsys.readouterr()
    assert cli(["verify", str(tmp_path / "sp_train"), "--tokenizer", str(tokenizer_dir)]) == 1
    assert f"sp_train.manifest.json: these shards were tokenised with tokenizer sha256 {theirs}" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=f"sp_train.manifest.json: .* sha256 {theirs}, not with the given one"):
        _train([tmp_path / "sp_train"], tokenizer_dir)
    assert cli(["merge", "--input", str(tmp_path / "sp_train"), str(tmp_path / "theirs"), "--output-prefix",
                str(tmp_path / "m")]) == 0  # one tokenizer: fine
    _tokenize(small_corpus, tmp_path / "ours", tokenizer_dir)
    assert cli(["merge", "--input", str(tmp_path / "ours"), str(tmp_path / "theirs"), "--output-prefix",
                str(tmp_path / "mixed")]) == 1
    assert "made with 2 different tokenizers" in capsys.readouterr().err
    assert not list(tmp_path.glob("mixed*"))


def test_split_and_merge_refuse_damaged_or_unfinished_input_and_write_nothing(tmp_path, job, capsys):
    """A bit flip inside an input shard (structure and ids still valid), or an unfinished tokenize job,
    is not laundered into a fresh-looking output."""
    shards = _copy(job, tmp_path)
    second = shards / "s_00001.bin"
    tokens = np.fromfile(second, dtype=np.uint16)
    tokens[len(tokens) // 3] = 4 + (int(tokens[len(tokens) // 3]) + 1 - 4) % 900
    tokens.tofile(second)
    split = ["split", "--input", str(shards), "--output-prefix", str(tmp_path / "sp"), "--valid-fraction", "0.1"]
    merge = ["merge", "--input", str(shards), "--output-prefix", str(tmp_path / "m")]
    for command in (split, merge):
        assert cli(command) == 1
        assert f"{second}: the file is damaged: its content hash differs" in capsys.readouterr().err
    shutil.copy(job / "s_00001.bin", second)
    manifest = json.loads((shards / "s.manifest.json").read_text())
    (shards / "s.manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    for command in (split, merge):
        assert cli(command) == 1
        assert "the tokenize job that wrote these shards did not finish" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def _manifest_edit(change):
    def apply(shards):
        path = shards / "s.manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return apply


def _replace_manifest(make):
    def apply(shards):
        (shards / "s.manifest.json").unlink()
        make(shards / "s.manifest.json")
    return apply


MALFORMED = {
    "missing": (_replace_manifest(lambda path: None), r"s_00000: no manifest \(.*s_00000.manifest.json or "
                                                     r".*/s.manifest.json missing\)"),
    "directory": (_replace_manifest(lambda path: path.mkdir()), "s.manifest.json: a directory stands where"),
    "dangling symlink": (_replace_manifest(lambda path: os.symlink(path.parent / "gone.json", path)),
                         "s.manifest.json: a dangling symbolic link"),
    "no shards": (_manifest_edit(lambda m: m.update(shards=[])), r"lists no shards \('shards': \[\]\)"),
    "unlisted shard": (_manifest_edit(lambda m: m["shards"].pop()), r"s_0000\d: not listed in .*s.manifest.json"),
    "entry without files": (_manifest_edit(lambda m: m["shards"][1].pop("files")),
                            r"field 'shards\[1\].files' must be an object \(it is missing\)"),
    "complete 'no'": (_manifest_edit(lambda m: m.update(complete="no")),
                      r"field 'complete' must be true or false \(got str \"no\"\)"),
    "shards a string": (_manifest_edit(lambda m: m.update(shards="s_00000")),
                        r"field 'shards' must be a list \(got str"),
    "tokenizer hash a number": (_manifest_edit(lambda m: m.update(tokenizer_sha256=7)),
                                r"field 'tokenizer_sha256' must be a string \(got int 7\)"),
    "size a string": (_manifest_edit(lambda m: m["shards"][0]["files"]["bin"].update(bytes="12")),
                      r"field 'shards\[0\].files.bin.bytes' must be an integer"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_each_missing_or_malformed_manifest_is_named_by_every_reader(tmp_path, job, tokenizer_dir, capsys, case):
    """Before: a missing manifest, a directory or dangling symlink in its place, an unlisted shard or an
    entry without `files` were skipped (the shards trained unchecked); wrong-type fields tracebacked or
    were misreported ('got dict' for a string)."""
    damage, message = MALFORMED[case]
    shards = _copy(job, tmp_path)
    damage(shards)
    for command in (["verify", str(shards), "--tokenizer", str(tokenizer_dir)], ["inspect", str(shards)],
                    ["split", "--input", str(shards), "--output-prefix", str(tmp_path / "sp")],
                    ["merge", "--input", str(shards), "--output-prefix", str(tmp_path / "m")]):
        assert cli(command) == 1, command
        error = capsys.readouterr().err
        assert re.search(message, error) and "Traceback" not in error, (command, error)
    with pytest.raises(ValueError, match=message):
        _train([shards], tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_the_tokenize_output_prefix_names_all_its_shards(tmp_path, job, tokenizer_dir, capsys):
    """`tokenize --output-prefix P` writes P_00000, P_00001, ...: verify, inspect, merge and data.train
    accept P itself (before: "shard index not found"); a wrong name lists the names that exist."""
    prefix = job / "s"
    every = find_shard_prefixes([job])
    assert find_shard_prefixes([prefix]) == every
    assert cli(["verify", str(prefix), "--tokenizer", str(tokenizer_dir)]) == 0
    assert f"OK: {len(every)} shards" in capsys.readouterr().out
    assert cli(["inspect", str(prefix)]) == 0
    assert capsys.readouterr().out.count(": dtype uint16") == len(every)
    samples, _, _ = _train([prefix], tokenizer_dir)
    assert samples is not None
    assert cli(["verify", str(job / "shards"), "--tokenizer", str(tokenizer_dir)]) == 1
    error = capsys.readouterr().err
    assert f"shard index not found; shards in {job}: s_00000, s_00001" in error
    assert "a tokenize --output-prefix for all of its shards" in error


def test_foreign_shards_are_checked_and_recorded_before_use(tmp_path, job, tokenizer_dir, capsys):
    """Shards made by another tool have no manifest: refused by name until `data_prep manifest`
    verified them against the tokenizer (every id one of its pieces) and recorded one."""
    from deberta_ds.data.indexed_dataset import ShardWriter

    writer = ShardWriter(tmp_path / "foreign", np.uint16)
    writer.add_document(np.array([5, 6, 7]))
    writer.add_document(np.array([8, 1000, 9]))  # [MASK]: no text tokenises to it
    writer.finalize()
    with pytest.raises(ValueError, match="foreign: no manifest .* python -m data_prep manifest PREFIX --tokenizer"):
        _train([tmp_path / "foreign"], tokenizer_dir)
    assert cli(["manifest", str(tmp_path / "foreign"), "--tokenizer", str(tokenizer_dir)]) == 1
    assert "token id 1000 at offset 8 is [MASK]" in capsys.readouterr().err
    assert not (tmp_path / "foreign.manifest.json").exists()
    writer = ShardWriter(tmp_path / "foreign", np.uint16)
    writer.add_document(np.array([5, 6, 7]))
    writer.finalize()
    assert cli(["manifest", str(tmp_path / "foreign"), "--tokenizer", str(tokenizer_dir)]) == 0
    _train([tmp_path / "foreign"], tokenizer_dir)
    assert cli(["manifest", str(job / "s"), "--tokenizer", str(tokenizer_dir)]) == 1
    assert "already has a manifest" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("resume", "end", r"field 'shards\[0\]\.resume' must be \[file index, byte offset\] \(got \"end\"\)"),
    ("stats", {"documents": "many"}, r"field 'shards\[0\]\.stats' must hold the integer counts"),
])
def test_tokenize_names_a_damaged_resume_record(tmp_path, job, small_corpus, tokenizer_dir, capsys, field, value,
                                                message):
    """What a re-run reads to continue a job: of the wrong type it tracebacked (TypeError, KeyError)."""
    shards = _copy(job, tmp_path)
    _manifest_edit(lambda m: m["shards"][0].update({field: value}))(shards)
    assert cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(shards / "s"), "--tokenizer",
                str(tokenizer_dir), "--shard-tokens", "60000", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert re.search(message, error) and "s.manifest.json" in error, error
