"""data_prep CLI: tokenizer, tokenisation round trip, megatron-core interoperability, resume, verify."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.cli import main as cli
from deberta_ds.data.indexed_dataset import IndexedShard, ShardWriter, find_shard_prefixes, verify_shard
from deberta_ds.data.tokenizer import load_tokenizer


def read_documents(prefix_or_dir) -> list[list[int]]:
    return [IndexedShard(p).document_tokens(d).tolist() for p in find_shard_prefixes([prefix_or_dir])
            for d in range(IndexedShard(p).num_documents)]


def test_tokenizer_has_deberta_special_ids(tokenizer_dir):
    processor, meta = load_tokenizer(tokenizer_dir)
    assert [processor.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert meta.mask_id == processor.get_piece_size() == 1000 and meta.model_vocab_size == 1024
    assert json.loads((tokenizer_dir / "tokenizer.json").read_text())["mask_id"] == 1000
    # Scores on the 2^-8 grid, where float32 and float64 segmentation sums are exact (HF parity).
    scores = [processor.get_score(i) for i in range(processor.get_piece_size())]
    assert all(score * 256 == round(score * 256) for score in scores) and len(set(scores)) > 100


def test_bpe_tokenizer_trains(tmp_path, small_corpus):
    assert cli(["train-tokenizer", "--input", str(small_corpus), "--output-dir", str(tmp_path), "--vocab-size",
                "500", "--model-type", "bpe", "--sample-sentences", "5000"]) == 0
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model")).get_piece_size() == 500


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_equals_direct_encoding_uint16(tmp_path, small_corpus, tokenizer_dir, workers):
    prefix = tmp_path / "out"
    assert cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(prefix), "--tokenizer",
                str(tokenizer_dir), "--workers", str(workers), "--shard-tokens", "20000", "--no-progress"]) == 0
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))
    expected = [ids for ids in processor.encode(small_corpus.read_text(encoding="utf-8").splitlines()) if ids]
    assert read_documents(tmp_path) == expected
    shards = find_shard_prefixes([tmp_path])
    assert len(shards) > 3 and all(IndexedShard(p).dtype == np.uint16 for p in shards)
    assert all(len(IndexedShard(p).tokens) <= 20000 for p in shards)
    assert shards[0].endswith("out_00000")


def test_int32_vocabulary_round_trip(tmp_path, small_corpus):
    text = small_corpus.read_text(encoding="utf-8").splitlines()[:200]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "spm"), vocab_size=800,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pieces": 800, "mask_id": 800,
                                                         "model_vocab_size": 70000}))  # forces int32
    source = tmp_path / "docs.jsonl.gz"
    with gzip.open(source, "wt") as out:
        for line in text:
            out.write(json.dumps({"body": line}) + "\n")
    assert cli(["tokenize", "--input", str(source), "--format", "jsonl", "--json-key", "body", "--output-dir",
                str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "spm.model"), "--no-progress"]) == 0
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    assert read_documents(tmp_path / "shards") == [ids for ids in processor.encode(text) if ids]
    assert IndexedShard(find_shard_prefixes([tmp_path / "shards"])[0]).dtype == np.int32


def test_blank_line_documents_empty_malformed_and_huge_lines(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "in.txt"
    huge = ("word " * 50_000).encode()
    source.write_bytes(b"first doc\nstill first\n\n\n\nsecond \xff\xfe bad utf8\n\n" + huge + b"\n\nlast\n")
    assert cli(["tokenize", "--input", str(source), "--doc-boundary", "blank-line", "--output-dir",
                str(tmp_path / "s"), "--tokenizer", str(tokenizer_dir), "--max-piece-bytes", "4096",
                "--no-progress", "--max-malformed", "1"]) == 0  # 1 of 4 documents: a share no corpus has
    report = capsys.readouterr().out
    assert "documents 4" in report and "split 1" in report and "malformed-utf8 1" in report
    docs = read_documents(tmp_path / "s")
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))
    assert docs[0] == processor.encode("first doc\nstill first")
    assert len(docs[2]) == len(processor.encode("word " * 50_000))  # nothing lost across pieces


def test_jsonl_bad_records_are_skipped_and_counted(tmp_path, tokenizer_dir, capsys):
    surrogate = '{"text": "lone \\ud800 surrogate"}'      # valid JSON, not valid Unicode
    lines = [json.dumps({"text": "first record"}).encode(),
             b"",                                           # blank: no record
             b'{"text": "unterminated',                     # invalid JSON
             b'{"body": "wrong key"}', b'{"text": 42}', b'["text"]',
             b"[" * 100_000 + b"]" * 100_000,               # nesting deeper than the parser's recursion limit
             b'{"text": "a"} trailing',                     # extra data after the object
             b"\xef\xbb\xbf" + json.dumps({"text": "after a byte-order mark"}).encode(),
             b'{"text": "bad \xff utf8"}',                  # invalid UTF-8: skipped
             surrogate.encode(),
             json.dumps({"text": "crlf line end"}).encode() + b"\r",
             json.dumps({"text": "word " * 3000}).encode()]  # over --max-piece-bytes: encoded in pieces
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    assert cli(["tokenize", "--input", str(source), "--format", "jsonl", "--output-dir", str(tmp_path / "s"),
                "--tokenizer", str(tokenizer_dir), "--max-piece-bytes", "4096", "--no-progress",
                "--max-malformed", "1"]) == 0
    report = capsys.readouterr().out
    assert "documents 5" in report and "skipped 7" in report and "malformed-utf8 1" in report, report
    assert "split 1" in report and "empty 0" in report, report
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))
    replaced = json.loads(surrogate)["text"].encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    expected = processor.encode(["first record", "after a byte-order mark", replaced, "crlf line end",
                                 "word " * 3000])
    assert read_documents(tmp_path / "s") == expected


def test_empty_documents_are_counted_in_line_mode(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "in.txt"
    source.write_bytes(b"one\r\n\n   \ntwo")            # a CRLF line end, and no newline at the end
    cli(["tokenize", "--input", str(source), "--output-dir", str(tmp_path / "s"), "--tokenizer",
         str(tokenizer_dir), "--no-progress"])
    assert "documents 2" in capsys.readouterr().out
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))
    assert read_documents(tmp_path / "s") == processor.encode(["one", "two"])


def test_megatron_core_reads_our_shards(tmp_path, small_corpus, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "x"), "--tokenizer",
         str(tokenizer_dir), "--no-progress"])
    ours = IndexedShard(tmp_path / "x_00000")
    theirs = IndexedDataset(str(tmp_path / "x_00000"))
    assert len(theirs) == len(ours)
    assert np.array_equal(theirs.document_indices, ours.doc_index)
    for i in range(0, len(ours), 97):
        assert np.array_equal(theirs[i], ours.sequence(i))


def test_we_read_megatron_core_shards(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 90000, size=rng.integers(0, 50)) for _ in range(rng.integers(1, 4))]
                 for _ in range(40)]
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for sequences in documents:
        for sequence in sequences:
            builder.add_item(torch.tensor(sequence))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    shard = verify_shard(tmp_path / "m", vocab_size=90000)
    assert shard.num_documents == 40
    for doc, sequences in enumerate(documents):
        assert shard.document_tokens(doc).tolist() == np.concatenate(sequences).tolist()


def _tokenize_command(source, prefix, tokenizer_dir):
    return [sys.executable, "-m", "data_prep", "tokenize", "--input", str(source), "--output-prefix", str(prefix),
            "--tokenizer", str(tokenizer_dir), "--workers", "2", "--shard-tokens", "3000", "--no-progress"]


@pytest.mark.slow
def test_killed_tokenize_resumes_to_byte_identical_output(tmp_path, tokenizer_dir):
    source = tmp_path / "big.txt"
    base = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    from data_prep.default_corpus import iter_documents
    lines = [doc for _, doc in zip(range(30000), iter_documents())] + base
    source.write_text("\n".join(lines) + "\n")
    subprocess.run(_tokenize_command(source, tmp_path / "full" / "s", tokenizer_dir), check=True)
    victim = subprocess.Popen(_tokenize_command(source, tmp_path / "killed" / "s", tokenizer_dir),
                              start_new_session=True)
    manifest = tmp_path / "killed" / "s.manifest.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once some, not all, shards are finished
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"], "the run finished before the kill; the test proves nothing"
    subprocess.run(_tokenize_command(source, tmp_path / "killed" / "s", tokenizer_dir), check=True)
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == full
    for name in full:
        if name.endswith((".bin", ".idx")):
            assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    assert json.loads(manifest.read_text())["final_stats"] == \
        json.loads((tmp_path / "full" / "s.manifest.json").read_text())["final_stats"]


def test_rerun_with_other_settings_is_refused(tmp_path, small_corpus, tokenizer_dir, capsys):
    args = ["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "s"), "--tokenizer",
            str(tokenizer_dir), "--no-progress"]
    assert cli(args) == 0
    assert cli(args + ["--shard-tokens", "100"]) == 1
    assert "different job" in capsys.readouterr().err


def _good_shard(tmp_path, tokenizer_dir) -> Path:
    """A 3-document shard written directly (as another tool would), then checked and recorded."""
    writer = ShardWriter(tmp_path / "g", np.uint16)
    for doc in ([5, 6, 7], [8, 9], [10]):
        writer.add_document(np.array(doc))
    writer.finalize()
    assert cli(["manifest", str(tmp_path / "g"), "--tokenizer", str(tokenizer_dir)]) == 0
    return tmp_path / "g"


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-5]), "g.idx: size"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "g.bin: size"),
    (lambda p: _corrupt(p.with_suffix(".idx"), 0, b"NOTMAGIC!"), "bad magic"),
    (lambda p: _corrupt(p.with_suffix(".idx"), 17, bytes([9])), "unknown dtype code 9 at offset 17"),
    (lambda p: _corrupt(p.with_suffix(".idx"), 34 + 12 + 16, np.int64(600).tobytes()), "pointer 600 at offset 62"),
    (lambda p: _corrupt(p.with_suffix(".bin"), 2, np.uint16(5000).tobytes()), "token id 5000 >= vocab size 100"),
])
def test_verify_rejects_damage_with_its_own_message(tmp_path, tokenizer_dir, capsys, damage, message):
    prefix = _good_shard(tmp_path, tokenizer_dir)
    assert cli(["verify", str(prefix), "--vocab-size", "100"]) == 0
    damage(prefix)
    assert cli(["verify", str(prefix), "--vocab-size", "100"]) == 1
    assert message in capsys.readouterr().err


def test_merge_split_and_inspect(tmp_path, small_corpus, tokenizer_dir, capsys):
    cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "a" / "s"), "--tokenizer",
         str(tokenizer_dir), "--shard-tokens", "20000", "--no-progress"])
    documents = read_documents(tmp_path / "a")
    assert cli(["merge", "--input", str(tmp_path / "a"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert read_documents(tmp_path / "m") == documents
    assert cli(["split", "--input", str(tmp_path / "m"), "--output-prefix", str(tmp_path / "sp"),
                "--valid-fraction", "0.1", "--seed", "3"]) == 0
    train, valid = read_documents(tmp_path / "sp_train"), read_documents(tmp_path / "sp_valid")
    assert len(train) + len(valid) == len(documents) and 0.05 < len(valid) / len(documents) < 0.15
    assert sorted(map(tuple, train + valid)) == sorted(map(tuple, documents))
    cli(["split", "--input", str(tmp_path / "m"), "--output-prefix", str(tmp_path / "again"),
         "--valid-fraction", "0.1", "--seed", "3"])
    assert read_documents(tmp_path / "again_valid") == valid
    assert cli(["inspect", str(tmp_path / "m"), "--tokenizer", str(tokenizer_dir)]) == 0
    assert "documents" in capsys.readouterr().out


def test_verify_prints_summary_and_sample(tmp_path, small_corpus, tokenizer_dir, capsys):
    cli(["tokenize", "--input", str(small_corpus), "--output-dir", str(tmp_path), "--tokenizer",
         str(tokenizer_dir), "--no-progress"])
    assert cli(["verify", str(tmp_path), "--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "OK: 1 shards" in out and "sample:" in out


def test_missing_input_is_a_clear_error(tmp_path, tokenizer_dir, capsys):
    assert cli(["tokenize", "--input", str(tmp_path / "nope.txt"), "--output-dir", str(tmp_path),
                "--tokenizer", str(tokenizer_dir)]) == 1
    assert "--input" in capsys.readouterr().err


@pytest.mark.parametrize("command, flag, value", [
    ("tokenize", "--workers", "0"), ("tokenize", "--max-piece-bytes", "0"), ("tokenize", "--shard-tokens", "-5"),
    ("train-tokenizer", "--vocab-size", "many"), ("train-tokenizer", "--character-coverage", "1.5"),
    ("split", "--valid-fraction", "0"), ("tokenize", "--max-malformed", "nan")])
def test_bad_numeric_flags_are_clear_errors(tmp_path, command, flag, value, capsys):
    """Rejected by the parser with the flag's name (a zero piece size used to loop forever)."""
    required = {"tokenize": ["--output-dir", str(tmp_path), "--tokenizer", str(tmp_path)],
                "train-tokenizer": ["--output-dir", str(tmp_path), "--vocab-size", "100"],
                "split": ["--output-prefix", str(tmp_path / "p")]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--input", str(tmp_path), *required, flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {value} is not a" in capsys.readouterr().err


def test_every_command_has_help():
    for command in ("default-corpus", "train-tokenizer", "tokenize", "verify", "inspect", "merge", "split", "mixture",
                    "manifest"):
        with pytest.raises(SystemExit) as exit_info:
            cli([command, "--help"])
        assert exit_info.value.code == 0


# Every field of a 3-document shard (header 34 B, lengths at 34, pointers at 46, documents at 70),
# damaged one at a time, with what the refusal must say. None of these needs a pass over P.bin.
STRUCTURAL_DAMAGE = [
    (".idx", 0, b"NOTMAGIC!", "bad magic"),
    (".idx", 9, np.uint64(2).tobytes(), "unsupported version 2 at offset 9"),
    (".idx", 17, bytes([1]), "token dtype uint8 at offset 17 is not uint16 or int32"),
    (".idx", 17, bytes([2]), "token dtype int8 at offset 17"),
    (".idx", 17, bytes([9]), "unknown dtype code 9 at offset 17"),
    (".idx", 18, np.uint64(4).tobytes(), "g.idx: size 102 bytes, the header implies 114"),
    (".idx", 26, np.uint64(5).tobytes(), "g.idx: size 102 bytes, the header implies 110"),
    (".idx", 38, np.int32(-1).tobytes(), "negative sequence length at offset 38"),
    (".idx", 38, np.int32(40_000_000).tobytes(), "pointer 10 at offset 62 breaks monotonicity"),
    (".idx", 46, np.int64(600).tobytes(), "pointer 600 at offset 46"),
    (".idx", 70, np.int64(1).tobytes(), "document index at offset 70 must start at 0 and end at 3"),
    (".idx", 94, np.int64(2).tobytes(), "document index at offset 70 must start at 0 and end at 3"),
    (".idx", 78, np.int64(30_000_000).tobytes(), "document index decreases at offset 86"),
    (".idx", 102, b"\0" * 8, "g.idx: size 110 bytes, the header implies 102"),
    (".bin", 12, b"\0", "g.bin: size 13 bytes, the index implies 12"),  # odd-sized
]


def _damage(prefix: Path, suffix: str, offset: int, data: bytes) -> None:
    path = prefix.with_suffix(suffix)
    if offset >= path.stat().st_size:  # past the end: pad
        path.write_bytes(path.read_bytes() + data)
    else:
        _corrupt(path, offset, data)


@pytest.mark.parametrize("suffix, offset, data, message", STRUCTURAL_DAMAGE)
def test_every_reader_refuses_a_structurally_damaged_shard(tmp_path, tokenizer_dir, capsys, suffix, offset, data,
                                                          message):
    """Training (TokenCorpus), inspect, merge and split open shards with verify's structural checks:
    the file and offset are named, and merge/split write nothing (no laundering into a 'valid' shard)."""
    from deberta_ds.data.dataset import TokenCorpus
    from deberta_ds.data.indexed_dataset import ShardFormatError

    prefix = _good_shard(tmp_path, tokenizer_dir)
    _damage(prefix, suffix, offset, data)
    with pytest.raises(ShardFormatError, match=re.escape(message)):
        TokenCorpus([prefix])
    for command in (["inspect", str(prefix)],
                    ["merge", "--input", str(prefix), "--output-prefix", str(tmp_path / "m")],
                    ["split", "--input", str(prefix), "--output-prefix", str(tmp_path / "s"),
                     "--valid-fraction", "0.5"]):
        assert cli(command) == 1, command
        assert message in capsys.readouterr().err, command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.bin", "g.idx", "g.manifest.json"]


def test_a_truncated_bin_is_refused_by_training_not_read_in_part(tmp_path, tokenizer_dir):
    """The trainer used to train on what was left of a truncated .bin without a word."""
    from deberta_ds.data.dataset import TokenCorpus
    from deberta_ds.data.indexed_dataset import ShardFormatError

    prefix = _good_shard(tmp_path, tokenizer_dir)
    prefix.with_suffix(".bin").write_bytes(prefix.with_suffix(".bin").read_bytes()[:4])
    with pytest.raises(ShardFormatError, match=r"g\.bin: size 4 bytes, the index implies 12 .* offset 4"):
        TokenCorpus([prefix])


def test_unfinished_or_foreign_shard_sets_are_refused(tmp_path, small_corpus, tokenizer_dir, capsys):
    """verify --tokenizer and training read the tokenize manifest: an unfinished job's shards and
    shards of another tokenizer (same vocabulary size) are refused, naming the manifest and hashes."""
    from data_prep.tokenizer import train_tokenizer
    from deberta_ds.data.tokenizer import load_tokenizer
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    prefix = tmp_path / "set" / "s"
    assert cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(prefix), "--tokenizer",
                str(tokenizer_dir), "--shard-tokens", "30000", "--no-progress"]) == 0
    run = {"model": "tiny", "data": {"train": [str(tmp_path / "set")], "tokenizer": str(tokenizer_dir)}}
    trainer_data(run_config_from_dict(run))  # the finished set with its own tokenizer: accepted
    manifest_file = tmp_path / "set" / "s.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert len(manifest["shards"]) > 2
    manifest["complete"] = False  # as a killed job leaves it
    manifest_file.write_text(json.dumps(manifest))
    assert cli(["verify", str(tmp_path / "set"), "--tokenizer", str(tokenizer_dir)]) == 1
    assert "s.manifest.json: the tokenize job that wrote these shards did not finish" in capsys.readouterr().err
    with pytest.raises(ValueError, match="did not finish .* data.allow_incomplete_shards=true"):
        trainer_data(run_config_from_dict(run))
    assert cli(["verify", str(tmp_path / "set"), "--tokenizer", str(tokenizer_dir), "--allow-incomplete"]) == 0
    assert "warning: " in capsys.readouterr().err
    run["data"]["allow_incomplete_shards"] = True
    trainer_data(run_config_from_dict(run))
    manifest["complete"] = True
    manifest_file.write_text(json.dumps(manifest))
    other = tmp_path / "other_tok"  # same vocabulary size, other text: other ids for the same pieces
    train_tokenizer(iter(small_corpus.read_text().splitlines()[::-1][:4000]), other, 1000, sample_sentences=50_000)
    ours, theirs = load_tokenizer(tokenizer_dir)[1].sha256, load_tokenizer(other)[1].sha256
    assert ours != theirs
    assert cli(["verify", str(tmp_path / "set"), "--tokenizer", str(other)]) == 1
    assert f"tokenizer sha256 {ours}, not with the given one ({theirs})" in capsys.readouterr().err
    run["data"]["tokenizer"] = str(other)
    with pytest.raises(ValueError, match=f"sha256 {ours}, not with the given one"):
        trainer_data(run_config_from_dict(run))


def test_tokenize_on_a_full_disk_leaves_no_partial_output(tmp_path, small_corpus, tokenizer_dir):
    """A file-size limit stands in for a full disk: a clear error, no traceback, no .tmp file."""
    import resource

    result = subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "--input", str(small_corpus),
                             "--output-prefix", str(tmp_path / "out" / "s"), "--tokenizer", str(tokenizer_dir),
                             "--no-progress"], capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "(disk full or not writable?); no partial output was left behind" in result.stderr
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_only_user_errors_lose_their_traceback(monkeypatch, capsys):
    """Entry points print a UserError in one line; any other ValueError (a bug, or one raised by
    NumPy or torch) propagates with its traceback."""
    import data_prep.cli
    from deberta_ds import convert
    from deberta_ds.errors import UserError

    for module, argv in ((data_prep.cli, ["inspect", "x"]), (convert, ["to-onnx", "--checkpoint", "c", "--out", "o"])):
        target = "run" if module is data_prep.cli else "load_native"

        def raise_user_error(*args, **kwargs):
            raise UserError("--input x: not found")

        monkeypatch.setattr(module, target, raise_user_error)
        assert module.main(argv) in (1, 2)
        assert "error: --input x: not found" in capsys.readouterr().err

        def raise_bug(*args, **kwargs):
            raise ValueError("operands could not be broadcast together")

        monkeypatch.setattr(module, target, raise_bug)
        with pytest.raises(ValueError, match="broadcast"):
            module.main(argv)


def _tokenized(tmp_path, small_corpus, tokenizer_dir) -> Path:
    """Two shards of a finished tokenize job (with its manifest) in tmp_path/set."""
    assert cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "set" / "s"),
                "--tokenizer", str(tokenizer_dir), "--shard-tokens", "60000", "--no-progress"]) == 0
    assert len(find_shard_prefixes([tmp_path / "set"])) >= 2
    return tmp_path / "set"


def test_an_in_vocabulary_token_change_is_caught_by_the_recorded_hashes(tmp_path, small_corpus, tokenizer_dir,
                                                                         capsys):
    """One token replaced by another valid id (the structure and the vocabulary check still pass):
    `verify` hashes every byte and names the file; so does training's open-time check (size and a
    sampled hash, which covers every byte of a shard this small)."""
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    shards = _tokenized(tmp_path, small_corpus, tokenizer_dir)
    run = run_config_from_dict({"model": "tiny", "data": {"train": [str(shards)], "tokenizer": str(tokenizer_dir)}})
    assert cli(["verify", str(shards), "--tokenizer", str(tokenizer_dir)]) == 0
    trainer_data(run)
    manifest = json.loads((shards / "s.manifest.json").read_text())
    assert all(set(entry["files"]) == {"bin", "idx"} for entry in manifest["shards"])
    second = shards / "s_00001.bin"
    tokens = np.fromfile(second, dtype=np.uint16)
    tokens[len(tokens) // 2] = 4 + (int(tokens[len(tokens) // 2]) + 1 - 4) % 900
    tokens.tofile(second)
    verify_shard(shards / "s_00001", 1000)  # structure and ids: still fine
    assert cli(["verify", str(shards), "--tokenizer", str(tokenizer_dir)]) == 1
    assert f"{second}: the file is damaged: its content hash differs" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{second}: the file is damaged: its content hash differs"):
        trainer_data(run)


def test_verify_refuses_mask_and_padding_row_ids(tmp_path, tokenizer_dir, capsys):
    """The tokenizer has 1000 pieces: [MASK] = 1000, rows 1001-1023 pad the vocabulary to 1024."""
    for token, message in ((1000, "token id 1000 at offset 2 is [MASK]"),
                           (1010, "token id 1010 at offset 2 is a padding row of the vocabulary"),
                           (2000, "token id 2000 >= vocab size 1024 at offset 2")):
        writer = ShardWriter(tmp_path / f"t{token}", np.uint16)
        writer.add_document(np.array([5, token, 6]))
        writer.finalize()
        assert cli(["verify", str(tmp_path / f"t{token}"), "--tokenizer", str(tokenizer_dir)]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", "", "[]", "null"])
def test_a_malformed_manifest_is_named_by_verify_tokenize_and_training(tmp_path, small_corpus, tokenizer_dir,
                                                                       capsys, text):
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    shards = _tokenized(tmp_path, small_corpus, tokenizer_dir)
    (shards / "s.manifest.json").write_text(text)
    message = f"{shards / 's.manifest.json'}: damaged, not a shard manifest"
    assert cli(["verify", str(shards), "--tokenizer", str(tokenizer_dir)]) == 1
    assert message in capsys.readouterr().err
    assert cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(shards / "s"), "--tokenizer",
                str(tokenizer_dir), "--shard-tokens", "60000", "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer_data(run_config_from_dict({"model": "tiny", "data": {"train": [str(shards)],
                                                                   "tokenizer": str(tokenizer_dir)}}))


def test_tokenize_finding_no_documents_fails_and_leaves_nothing(tmp_path, small_corpus, tokenizer_dir, capsys):
    """Plain text read as JSONL: every line is skipped. Exit 1 saying so; no manifest is left, so
    the same command with the right --format then runs."""
    args = ["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "s"), "--tokenizer",
            str(tokenizer_dir), "--no-progress"]
    assert cli(args + ["--format", "jsonl"]) == 1
    error = capsys.readouterr().err
    assert "--input: no documents found (documents 0" in error and "check --format" in error
    assert not list(tmp_path.iterdir())
    assert cli(args + ["--format", "text"]) == 0


def test_train_tokenizer_on_empty_or_too_little_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "little.txt").write_text("a few words\nand a few more\n")
    for name, message in (("empty.txt", "--input: no text to train a tokenizer on"),
                          ("little.txt", "--vocab-size 1000: too large for this input (SentencePiece: Vocabulary "
                                         "size too high (1000). Please set it to a value <=")):
        assert cli(["train-tokenizer", "--input", str(tmp_path / name), "--output-dir", str(tmp_path / "tok"),
                    "--vocab-size", "1000"]) == 1
        assert message in capsys.readouterr().err
