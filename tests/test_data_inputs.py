"""What `tokenize` and `train-tokenizer` read: a folder gives its corpus files only, the format follows
the extension and the content, input that is not UTF-8 text and damaged .gz files are named errors,
and the progress bar reaches its total (issue 35, items 3 and 4; issue 33, item 8; issue 34, item 3)."""

import gzip
import json
import shutil

import pytest
import sentencepiece as spm

from data_prep.cli import main as cli
from data_prep.inputs import text_size
from deberta_ds.data.indexed_dataset import IndexedShard, find_shard_prefixes


def _documents(prefix_or_dir) -> list[list[int]]:
    return [IndexedShard(p).document_tokens(d).tolist() for p in find_shard_prefixes([prefix_or_dir])
            for d in range(IndexedShard(p).num_documents)]


@pytest.fixture(scope="module")
def lines(small_corpus) -> list[str]:
    return [line for line in small_corpus.read_text(encoding="utf-8").splitlines()[:300] if line.strip()]


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm.model"))


def _tokenize(inputs, prefix, tokenizer_dir, *extra) -> int:
    return cli(["tokenize", "--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer",
                str(tokenizer_dir), "--no-progress", *extra])


def test_a_folder_input_takes_its_corpus_files_only_and_says_which(tmp_path, lines, tokenizer_dir, processor,
                                                                    capsys):
    """The README layout keeps the tokenizer and the shards inside data/: `--input data/` used to
    tokenise spm.model, the shards and the manifest too (thousands of 'malformed-utf8' documents)."""
    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    (data / "docs" / "a.txt").write_text("\n".join(lines[:150]) + "\n")
    with gzip.open(data / "docs" / "b.txt.gz", "wt") as out:
        out.write("\n".join(lines[150:]) + "\n")
    shutil.copytree(tokenizer_dir, data / "tok")
    assert _tokenize([data / "docs" / "a.txt"], data / "shards" / "old", tokenizer_dir) == 0
    capsys.readouterr()
    assert _tokenize([data], tmp_path / "out" / "s", tokenizer_dir) == 0
    out = capsys.readouterr().out
    assert "input: 2 file(s)" in out and str(data / "docs" / "a.txt") in out and "b.txt.gz" in out
    assert "skipped 6 file(s)" in out and str(data / "shards" / "old.manifest.json") in out
    assert "format text (from the extension of a.txt)" in out
    assert "malformed-utf8 0" in out
    assert _documents(tmp_path / "out" / "s") == processor.encode(lines)


def test_input_that_is_not_utf8_text_is_an_error_before_any_output(tmp_path, lines, tokenizer_dir, capsys):
    """A binary file named directly (the tokenizer's model) and a Latin-1 text are refused naming the
    file; --max-malformed accepts the latter on purpose."""
    assert _tokenize([tokenizer_dir / "spm.model"], tmp_path / "a" / "s", tokenizer_dir) == 1
    assert f"--input {tokenizer_dir / 'spm.model'}: not UTF-8 text (NUL bytes" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join(f"caf\u00e9 {line}" for line in lines).encode("latin-1", "replace") + b"\n")
    assert _tokenize([latin1], tmp_path / "b" / "s", tokenizer_dir) == 1
    error = capsys.readouterr().err
    assert f"--input {latin1}: not UTF-8 text ({len(lines)} of {len(lines)} lines are not valid UTF-8" in error
    assert "raise --max-malformed" in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert _tokenize([latin1], tmp_path / "b" / "s", tokenizer_dir, "--max-malformed", "1") == 0
    assert f"malformed-utf8 {len(lines)}" in capsys.readouterr().out
    assert cli(["train-tokenizer", "--input", str(latin1), "--output-dir", str(tmp_path / "tok"), "--vocab-size",
                "100"]) == 1
    assert "not UTF-8 text" in capsys.readouterr().err


def test_a_large_malformed_share_past_the_first_block_leaves_the_job_unfinished(tmp_path, lines, tokenizer_dir,
                                                                                 capsys):
    """Clean for the first 64 KiB the check reads ahead, Latin-1 after it: the share is counted while
    tokenising; the job stays unfinished (so its shards are refused), and a larger --max-malformed
    finishes it."""
    source = tmp_path / "mixed.txt"
    clean = "\n".join(lines * 3) + "\n"
    assert len(clean.encode()) > 1 << 16
    latin1 = "\n".join(f"caf\u00e9 {line}" for line in lines * 2).encode("latin-1", "replace")
    source.write_bytes(clean.encode() + latin1 + b"\n")
    assert _tokenize([source], tmp_path / "s", tokenizer_dir) == 1
    assert f"--input: {2 * len(lines):,} of {5 * len(lines):,} documents held invalid UTF-8" in capsys.readouterr().err
    assert json.loads((tmp_path / "s.manifest.json").read_text())["complete"] is False
    assert _tokenize([source], tmp_path / "s", tokenizer_dir, "--max-malformed", "0.5") == 0
    assert json.loads((tmp_path / "s.manifest.json").read_text())["complete"] is True


def test_the_format_follows_the_extension_then_the_content(tmp_path, lines, tokenizer_dir, processor, capsys):
    """A .jsonl without --format used to be tokenised as raw JSON text (exit 0)."""
    records = "\n".join(json.dumps({"text": line}) for line in lines[:40]) + "\n"
    (tmp_path / "a.jsonl").write_text(records)
    (tmp_path / "b.records").write_text(records)     # no known extension: the content decides
    (tmp_path / "c.log").write_text("\n".join(lines[:40]) + "\n")
    expected = processor.encode(lines[:40])
    for name, reason, fmt in (("a.jsonl", "from the extension of a.jsonl", "jsonl"),
                              ("b.records", "from the content of b.records", "jsonl"),
                              ("c.log", "from the content of c.log", "text")):
        assert _tokenize([tmp_path / name], tmp_path / name.replace(".", "_") / "s", tokenizer_dir) == 0
        assert f"input: format {fmt} ({reason})" in capsys.readouterr().out
        assert _documents(tmp_path / name.replace(".", "_") / "s") == expected, name
    assert _tokenize([tmp_path / "a.jsonl"], tmp_path / "forced" / "s", tokenizer_dir, "--format", "text") == 0
    assert "input: format text (from --format)" in capsys.readouterr().out
    assert _tokenize([tmp_path / "a.jsonl", tmp_path / "c.log"], tmp_path / "mixed" / "s", tokenizer_dir) == 1
    assert "--input holds both text and JSONL files" in capsys.readouterr().err


def test_a_damaged_gz_input_is_named_not_a_traceback_or_a_full_disk(tmp_path, lines, tokenizer_dir, capsys):
    whole = gzip.compress(("\n".join(lines * 20) + "\n").encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[:len(whole) // 2])   # ends before its end-of-stream marker
    (tmp_path / "plain.txt.gz").write_bytes(b"not gzip at all\n")
    for name in ("cut.txt.gz", "plain.txt.gz"):
        for command in (["tokenize", "--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "o" / "s"),
                         "--tokenizer", str(tokenizer_dir), "--no-progress"],
                        ["train-tokenizer", "--input", str(tmp_path / name), "--output-dir", str(tmp_path / "t"),
                         "--vocab-size", "100"]):
            assert cli(command) == 1, command
            error = capsys.readouterr().err
            assert f"--input {tmp_path / name}: a damaged gzip file" in error and "disk full" not in error, error


def test_the_progress_bar_of_a_gz_input_reaches_its_total_with_an_eta(tmp_path, lines, tokenizer_dir, capsys):
    """The bar's total was the compressed size, so a .gz went past it: no percentage, no ETA."""
    text = ("\n".join(lines * 4) + "\n").encode()
    (tmp_path / "in.txt.gz").write_bytes(gzip.compress(text))
    assert text_size(tmp_path / "in.txt.gz") == len(text)   # the bar's total (it grows to what was read if short)
    assert cli(["tokenize", "--input", str(tmp_path / "in.txt.gz"), "--output-prefix", str(tmp_path / "s"),
                "--tokenizer", str(tokenizer_dir)]) == 0
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("tokenize: 100%|") and "<00:00" in last, last
