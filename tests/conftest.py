import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.data_helpers import corpus_file, trained_tokenizer


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    return corpus_file(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_corpus):
    return trained_tokenizer(tmp_path_factory.mktemp("tokenizer"), small_corpus)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory, small_corpus):
    """Same vocabulary size as tokenizer_dir, trained on other text: other ids for the same pieces."""
    from data_prep.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("other_tok")
    train_tokenizer(iter(small_corpus.read_text().splitlines()[::-1][:4000]), folder, 1000, sample_sentences=50_000)
    return folder


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, small_corpus, tokenizer_dir):
    """Training shards plus a held-out validation shard of the built-in corpus."""
    from data_prep.cli import main as cli

    out = tmp_path_factory.mktemp("train_shards")
    cli(["tokenize", "--input", str(small_corpus), "--output-prefix", str(out / "all"), "--tokenizer",
         str(tokenizer_dir), "--no-progress"])
    cli(["split", "--input", str(out / "all_00000"), "--output-prefix", str(out / "split"), "--valid-fraction",
         "0.05"])
    return {"train": str(out / "split_train"), "valid": str(out / "split_valid"), "tokenizer": str(tokenizer_dir)}


@pytest.fixture(scope="session")
def finished_run(train_shards, tmp_path_factory):
    """A finished 4-step ZeRO-2 run of the tiny pair through `python -m deberta_ds.train`, with
    checkpoints at steps 2 and 4 and a held-out set (its run config), made once per session for
    the checkpoint and resume tests, which work on copies of it (run_helpers.copy_of)."""
    from tests.proc_helpers import train_cli, write_run
    from tests.train_helpers import tiny_run

    root = tmp_path_factory.mktemp("finished_run")
    run = tiny_run(train_shards, root / "run", data={"valid": [train_shards["valid"]]},
                   train={"steps": 4, "save_every": 2, "zero_stage": 2})
    train_cli(write_run(root / "run.json", run))
    return run
