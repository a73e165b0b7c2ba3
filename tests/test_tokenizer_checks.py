"""Tokenizers are checked, not trusted: tokenizer.json against spm.model (special ids, [MASK], the
recorded sha256), a damaged spm.model, `convert to-hf --tokenizer` against the run's tokenizer by hash,
train-tokenizer's impossible requests, a missing data.tokenizer (issue 33, items 4 and 8; issue 35,
item 8)."""

import json
import random
import re
import shutil

import pytest
import sentencepiece as spm

from data_prep.cli import main as cli
from deberta_ds.data.tokenizer import load_tokenizer
from deberta_ds.errors import UserError
from deberta_ds.training.run_config import run_config_from_dict
from tests.train_helpers import trainer_data


def _edited(tokenizer_dir, tmp_path, **fields):
    folder = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    description = folder / "tokenizer.json"
    description.write_text(json.dumps(json.loads(description.read_text()) | fields))
    return folder


def _refused_everywhere(folder, small_corpus, train_shards, tmp_path, message, capsys) -> None:
    """Training, tokenize and verify all refuse the tokenizer with `message`."""
    with pytest.raises(UserError, match=message):
        trainer_data(run_config_from_dict({"model": "tiny", "data": {"train": [train_shards["train"]],
                                                                   "tokenizer": str(folder)}}))
    for command in (["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "s"),
                     "--tokenizer", str(folder), "--no-progress"],
                    ["verify", train_shards["train"], "--tokenizer", str(folder)]):
        assert cli(command) == 1, command
        error = capsys.readouterr().err
        assert "Traceback" not in error and re.search(message, error), (command, error)


@pytest.mark.parametrize("fields, message", [
    ({"mask_id": 999}, r"tokenizer\.json: does not match .*spm\.model: mask_id 999 \(the model's: 1000\)"),
    ({"pad_id": 5}, r"tokenizer\.json: does not match .*spm\.model: pad_id 5 \(the model's: 0\)"),
    ({"cls_id": 2, "sep_id": 1}, r"cls_id 2 \(the model's: 1\), sep_id 1 \(the model's: 2\)"),
    ({"sha256": "0" * 64}, r"tokenizer\.json: records spm\.model sha256 0{64}, but .*spm\.model has [0-9a-f]{64}"),
    ({"model_vocab_size": 1000}, r"model_vocab_size 1000 has no row for \[MASK\] = 1000"),
    ({"mask_id": "1000"}, r"tokenizer\.json: field 'mask_id' must be an integer \(got \"1000\"\)"),
])
def test_a_description_that_disagrees_with_its_model_is_refused(tmp_path, tokenizer_dir, small_corpus,
                                                                train_shards, capsys, fields, message):
    """Before: a wrong [MASK]/[PAD]/[CLS] id or hash in tokenizer.json trained with exit 0."""
    _refused_everywhere(_edited(tokenizer_dir, tmp_path, **fields), small_corpus, train_shards, tmp_path, message,
                        capsys)


def test_a_swapped_or_damaged_spm_model_is_refused(tmp_path, tokenizer_dir, other_tokenizer, small_corpus,
                                                  train_shards, capsys):
    folder = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    shutil.copy(other_tokenizer / "spm.model", folder / "spm.model")  # same piece count, other pieces
    _refused_everywhere(folder, small_corpus, train_shards, tmp_path, r"the model was replaced or damaged", capsys)
    model = (tokenizer_dir / "spm.model").read_bytes()
    (folder / "spm.model").write_bytes(model[:len(model) // 3])
    _refused_everywhere(folder, small_corpus, train_shards, tmp_path,
                        r"spm\.model: not a readable SentencePiece model \(damaged or truncated\?", capsys)


def test_a_foreign_model_without_deberta_special_ids_is_refused(tmp_path, small_corpus):
    """SentencePiece's defaults ([UNK]=0, <s>=1, </s>=2, no pad) would train with [PAD] = [UNK]."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(small_corpus.read_text().splitlines()[:500]),
                                   model_prefix=str(tmp_path / "spm"), vocab_size=300, minloglevel=2)
    with pytest.raises(UserError, match=r"spm\.model: special ids \{'pad_id': -1, 'cls_id': 1, 'sep_id': 2, "
                                        r"'unk_id': 0\} are not DeBERTaV3's"):
        load_tokenizer(tmp_path / "spm.model")


def test_to_hf_compares_a_given_tokenizer_with_the_runs_by_hash(tmp_path, tokenizer_dir, other_tokenizer):
    """`convert to-hf --tokenizer OTHER` compared the id count only: a tokenizer of the same size but
    other pieces was exported beside the model without a word."""
    from deberta_ds.checkpoint_reader import COMPLETE, STATE
    from deberta_ds.convert import export_tokenizer
    from deberta_ds.errors import CheckpointError

    ours = load_tokenizer(tokenizer_dir)[1]
    step = tmp_path / "run" / "checkpoints" / "step_00000001"  # what export_tokenizer reads of a training run
    step.mkdir(parents=True)
    (step / STATE).write_text(json.dumps({"step": 1, "consumed_samples": 8, "tokenizer": {"sha256": ours.sha256},
                                          "run_config": {"data": {"tokenizer": str(tokenizer_dir)}},
                                          "rtd_config": {}, "engines": []}))  # the fields read_state requires
    (step / COMPLETE).write_text("{}")
    assert load_tokenizer(other_tokenizer)[1].mask_id == ours.mask_id  # the id count cannot tell them apart
    with pytest.raises(CheckpointError, match=f"--tokenizer: {other_tokenizer} has sha256 .*, but the run was "
                                              f"trained with {ours.sha256}"):
        export_tokenizer(step, tmp_path / "hf_other", str(other_tokenizer), ours.model_vocab_size)
    assert not (tmp_path / "hf_other").exists()
    export_tokenizer(step, tmp_path / "hf", str(tokenizer_dir), ours.model_vocab_size)
    assert (tmp_path / "hf" / "spm.model").read_bytes() == (tokenizer_dir / "spm.model").read_bytes()


def test_train_tokenizer_refuses_random_bytes_and_a_vocabulary_of_one(tmp_path, small_corpus, capsys):
    """Before: SentencePiece's RuntimeError tracebacks."""
    noise = random.Random(0).randbytes(200_000)
    (tmp_path / "random.bin").write_bytes(noise)
    (tmp_path / "high.txt").write_bytes(bytes(b | 0x80 for b in noise))  # no NUL and no newline, never UTF-8
    for name, message in (("random.bin", "not UTF-8 text (NUL bytes"),
                          ("high.txt", "not UTF-8 text (1 of 1 lines are not valid UTF-8")):
        assert cli(["train-tokenizer", "--input", str(tmp_path / name), "--output-dir", str(tmp_path / "t"),
                    "--vocab-size", "1000"]) == 1
        assert f"--input {tmp_path / name}: {message}" in capsys.readouterr().err
    assert cli(["train-tokenizer", "--input", str(tmp_path / "high.txt"), "--output-dir", str(tmp_path / "t"),
                "--vocab-size", "1000", "--max-malformed", "1"]) == 1  # accepted as text: too little of it
    assert "--vocab-size 1000: too large for this input" in capsys.readouterr().err
    assert cli(["train-tokenizer", "--input", str(small_corpus), "--output-dir", str(tmp_path / "t"),
                "--vocab-size", "1"]) == 1
    assert "--vocab-size 1: must be larger than the 4 special pieces" in capsys.readouterr().err
    assert cli(["train-tokenizer", "--input", str(small_corpus), "--output-dir", str(tmp_path / "t"),
                "--vocab-size", "40"]) == 1
    assert "--vocab-size 40: too small for this input, whose characters alone need" in capsys.readouterr().err
    assert not (tmp_path / "t" / "spm.model").exists()


def test_a_missing_data_tokenizer_is_named_as_such(train_shards):
    """It was reported as '--tokenizer .: no SentencePiece model found'."""
    with pytest.raises(UserError, match=r"^no tokenizer given: set data\.tokenizer in the run config"):
        trainer_data(run_config_from_dict({"model": "tiny", "data": {"train": [train_shards["train"]]}}))
