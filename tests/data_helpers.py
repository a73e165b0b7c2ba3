"""Test corpora and tokenizers made on the fly (no downloads, nothing from ../shared)."""

from __future__ import annotations

from pathlib import Path

from data_prep.default_corpus import write_default_corpus
from data_prep.tokenizer import train_tokenizer


def corpus_file(directory: Path, max_bytes: int = 400_000) -> Path:
    return write_default_corpus(directory / "corpus.txt", max_bytes=max_bytes)


def trained_tokenizer(directory: Path, corpus: Path, vocab_size: int = 1000) -> Path:
    lines = (line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip())
    train_tokenizer(lines, directory, vocab_size, sample_sentences=50_000)
    return directory
