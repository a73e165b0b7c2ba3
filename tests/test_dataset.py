"""Sample building, masking statistics, determinism and the distributed, resumable sampler."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from data_prep.cli import main as cli
from deberta_ds.data.dataset import (
    IGNORE_INDEX,
    MaskingConfig,
    PackedSamples,
    PretrainingSamples,
    TokenCorpus,
    special_ids,
)
from deberta_ds.data.sampler import GlobalBatchSampler
from deberta_ds.data.tokenizer import load_tokenizer, word_start_table


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("shards")
    cli(["tokenize", "--input", str(small_corpus), "--output-dir", str(out), "--tokenizer", str(tokenizer_dir),
         "--shard-tokens", "30000", "--no-progress"])
    return out


def make_samples(shards, tokenizer_dir, masking=None, seed=0, length=128, cross=True):
    processor, meta = load_tokenizer(tokenizer_dir)
    special = special_ids(meta)
    return PretrainingSamples(TokenCorpus([shards]), length, special, masking or MaskingConfig(), seed=seed,
                              cross_documents=cross, word_start=word_start_table(processor, meta.model_vocab_size))


@pytest.mark.parametrize("cross", [True, False])
def test_packing_drops_no_token(shards, cross):
    corpus = TokenCorpus([shards])
    packed = PackedSamples(corpus, 126, cross)
    pieces = [packed.tokens(i) for i in range(packed.num_samples)]
    assert all(0 < len(p) <= 126 for p in pieces)
    documents = [corpus.document(d) for d in range(len(corpus))]
    assert np.array_equal(np.concatenate(pieces), np.concatenate(documents))
    if not cross:  # every sample lies inside one document
        assert packed.num_samples == sum(-(-len(d) // 126) for d in documents)


def test_samples_are_framed_and_padded(shards, tokenizer_dir):
    samples = make_samples(shards, tokenizer_dir, cross=False)
    batch = samples.batch(np.arange(64))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == 1).all()
    lengths = mask.sum(1)
    assert all(ids[row, lengths[row] - 1] == 2 for row in range(64))
    assert (ids[mask == 0] == 0).all()


def test_rtd_masking_statistics(shards, tokenizer_dir):
    samples = make_samples(shards, tokenizer_dir)
    batch = samples.batch(np.arange(2000))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    selected = labels != IGNORE_INDEX
    maskable = mask.sum() - 2 * len(ids)                           # all but [CLS] and [SEP]
    assert abs(selected.sum() / maskable - 0.15) < 0.01
    assert (ids[selected] == samples.special.mask).all()          # RTD: all [MASK], no 80/10/10
    assert not np.isin(labels[selected], [0, 1, 2]).any()          # never special tokens
    assert (ids[:, 0] == 1).all()


def test_mlm_80_10_10_and_whole_word_spans(shards, tokenizer_dir):
    processor, meta = load_tokenizer(tokenizer_dir)
    samples = make_samples(shards, tokenizer_dir, MaskingConfig(mode="mlm", whole_word=True))
    batch = samples.batch(np.arange(600))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    selected = labels != IGNORE_INDEX
    maskable = mask.sum() - 2 * len(ids)
    assert abs(selected.sum() / maskable - 0.15) < 0.01
    as_mask = (ids[selected] == meta.mask_id).mean()
    kept = (ids[selected] == labels[selected]).mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02
    word_start = word_start_table(processor, meta.model_vocab_size)
    original = np.where(selected, labels, ids)
    for row in range(len(ids)):  # a selected piece's whole word is selected
        length = mask[row].sum()
        for pos in np.flatnonzero(selected[row]):
            if pos + 1 < length - 1 and not word_start[original[row, pos + 1]]:
                assert selected[row, pos + 1], (row, pos)
            if not word_start[original[row, pos]] and pos > 1:
                assert selected[row, pos - 1], (row, pos)


@pytest.mark.parametrize("mode", ["rtd", "mlm"])
def test_whole_word_masking_rate_holds_on_short_padded_samples(shards, tokenizer_dir, mode):
    """Without cross-document packing most samples are one short document and padding: the budget
    is 15% of each sample's maskable pieces, not of its padded length (which masks about twice as
    many), overall and on the shortest samples alone."""
    samples = make_samples(shards, tokenizer_dir, MaskingConfig(mode=mode, whole_word=True), cross=False)
    batch = samples.batch(np.arange(1500))
    selected = (batch["labels"] != IGNORE_INDEX).sum(1)
    maskable = batch["attention_mask"].sum(1) - 2                      # all but [CLS] and [SEP]
    short = maskable <= 32                                             # a quarter of the 128 positions or less
    assert short.sum() > 300 and (batch["attention_mask"] == 0).mean() > 0.4   # the case this test is about
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.015
    assert abs(selected[short].sum() / maskable[short].sum() - 0.15) < 0.03


def test_sample_is_pure_function_of_seed_and_index_across_processes(shards, tokenizer_dir):
    samples = make_samples(shards, tokenizer_dir, seed=7)
    here = samples.batch(np.array([3, 999, 12345]))["input_ids"]
    code = ("import numpy as np, sys; sys.path.insert(0, '.'); from tests.test_dataset import make_samples; "
            f"from pathlib import Path; s = make_samples(Path({str(shards)!r}), Path({str(tokenizer_dir)!r}), seed=7);"
            "print(s.batch(np.array([3, 999, 12345]))['input_ids'].tolist())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(there) == here.tolist()
    assert not np.array_equal(make_samples(shards, tokenizer_dir, seed=8).batch(np.array([3]))["input_ids"],
                              here[:1])
    assert pickle.loads(pickle.dumps(samples)).batch(np.array([999]))["input_ids"].tolist() == here[1:2].tolist()


def test_epochs_are_permutations(shards, tokenizer_dir):
    samples = make_samples(shards, tokenizer_dir)
    n = len(samples)
    first, second = samples.sample_id(np.arange(n)), samples.sample_id(np.arange(n, 2 * n))
    assert sorted(first) == list(range(n)) == sorted(second)
    assert not np.array_equal(first, second)


def test_two_ranks_cover_the_one_rank_sequence_and_resume_continues_it():
    one = GlobalBatchSampler(8, 0, 1, total_samples=80)
    ranks = [GlobalBatchSampler(8, r, 2, total_samples=80) for r in range(2)]
    for full, a, b in zip(one, *ranks):
        assert np.array_equal(np.concatenate([a, b]), full)
    resumed = list(GlobalBatchSampler(8, 1, 2, consumed_samples=40, total_samples=80))
    assert [x.tolist() for x in resumed] == [x.tolist() for x in list(GlobalBatchSampler(8, 1, 2,
                                                                                          total_samples=80))[5:]]
    assert len(GlobalBatchSampler(8, 0, 4, consumed_samples=16, total_samples=80)) == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=10, world_size=4), "not divisible"),
    (dict(global_batch_size=8, consumed_samples=3), "multiple"),
    (dict(global_batch_size=8, rank=2, world_size=2), "outside"),
])
def test_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalBatchSampler(**kwargs)


def test_unknown_and_special_tokens_are_never_masked(shards, tokenizer_dir):
    """[UNK] (like [CLS], [SEP], [PAD]) is never chosen: never a generator target, never replaced."""
    for masking in (MaskingConfig(), MaskingConfig(mode="mlm"), MaskingConfig(mode="mlm", whole_word=True)):
        samples = make_samples(shards, tokenizer_dir, masking)
        original = samples.packed.tokens  # plant [UNK]s: every 5th token of every sample

        def with_unknowns(index, original=original, unk=samples.special.unk):
            tokens = original(index).copy()
            tokens[::5] = unk
            return tokens

        samples.packed.tokens = with_unknowns
        batch = samples.batch(np.arange(300))
        unknown = batch["labels"] == samples.special.unk
        assert not unknown.any(), masking
        ids = batch["input_ids"]
        assert ((ids == samples.special.unk).sum(1) >= (batch["attention_mask"].sum(1) - 2) // 5).all()
        assert (batch["labels"] != IGNORE_INDEX).mean() > 0.1  # masking still happens around them


def _run_config_batch(train_shards, tmp_path, **masking):
    """400 training samples built the way the trainer builds them from `data.masking`."""
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import tiny_run, trainer_data

    config = run_config_from_dict(tiny_run(train_shards, tmp_path, data={"masking": masking}))
    train, _, meta = trainer_data(config)
    return train.batch(np.arange(400)), meta.mask_id


def _word_runs(batch, word_start) -> list[int]:
    """Words per maximal run of selected pieces (a run spans the words it touches)."""
    selected, original = batch["labels"] != IGNORE_INDEX, np.where(batch["labels"] != IGNORE_INDEX,
                                                                  batch["labels"], batch["input_ids"])
    runs = []
    for row in range(len(selected)):
        words = 0
        for pos in range(len(selected[row])):
            if selected[row, pos]:
                words += bool(word_start[original[row, pos]]) or words == 0
            elif words:
                runs.append(words)
                words = 0
    return runs


def test_run_config_masking_mode_and_probability(train_shards, tmp_path):
    rtd, mask_id = _run_config_batch(train_shards, tmp_path, mode="rtd", probability=0.3)
    selected = rtd["labels"] != IGNORE_INDEX
    assert abs(selected.sum() / (rtd["attention_mask"].sum() - 2 * len(selected)) - 0.3) < 0.01
    assert (rtd["input_ids"][selected] == mask_id).all()
    mlm, _ = _run_config_batch(train_shards, tmp_path, mode="mlm")
    selected = mlm["labels"] != IGNORE_INDEX
    assert abs((mlm["input_ids"][selected] == mask_id).mean() - 0.8) < 0.03     # 80/10/10


def test_run_config_whole_word_and_max_ngram(train_shards, tmp_path, tokenizer_dir):
    processor, meta = load_tokenizer(tokenizer_dir)
    word_start = word_start_table(processor, meta.model_vocab_size)
    pieces, _ = _run_config_batch(train_shards, tmp_path)
    unigrams, _ = _run_config_batch(train_shards, tmp_path, whole_word=True, max_ngram=1)
    trigrams, _ = _run_config_batch(train_shards, tmp_path, whole_word=True, max_ngram=3)

    def split_words(batch) -> int:
        """Selected pieces whose next piece continues the same word but is not selected."""
        selected = batch["labels"] != IGNORE_INDEX
        original = np.where(selected, batch["labels"], batch["input_ids"])
        following = original[:, 1:]
        return int((selected[:, :-1] & ~selected[:, 1:] & ~word_start[following]
                    & (batch["attention_mask"][:, 1:] == 1) & (following > 3)).sum())

    assert split_words(pieces) > 50 and split_words(unigrams) == split_words(trigrams) == 0
    # n-grams of up to 3 words make longer runs than single words (p(n) ~ 1/n: mean n = 1.64)
    assert np.mean(_word_runs(trigrams, word_start)) > 1.3 * np.mean(_word_runs(unigrams, word_start))


@pytest.mark.parametrize("masking, message", [
    ({"mode": "bert"}, "data.masking.mode: 'bert' is not 'rtd' or 'mlm'"),
    ({"probability": 1.5}, "data.masking.probability: must be in (0, 1)"),
    ({"max_ngram": 0}, "data.masking.max_ngram: must be >= 1"),
    ({"whole_words": True}, "data.masking: unknown fields ['whole_words']"),
    ({"whole_word": "yes"}, "data.masking.whole_word: 'yes' is not of type bool"),
])
def test_run_config_rejects_bad_masking_naming_the_field(masking, message):
    from deberta_ds.training.run_config import run_config_from_dict

    with pytest.raises(ValueError) as error:
        run_config_from_dict({"data": {"masking": masking}})
    assert message in str(error.value)
