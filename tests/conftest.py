import pytest

from tests.data_helpers import corpus_file, trained_tokenizer


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    return corpus_file(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_corpus):
    return trained_tokenizer(tmp_path_factory.mktemp("tokenizer"), small_corpus)
