"""The run's data, checked before the first step against the tokenizer and the model
configuration (`model_setup.py`): the training samples of every phase (a corpus, or a weighted
mixture of corpora) and the held-out samples. Every mismatch is an error naming the field."""

from __future__ import annotations

import sys

import sentencepiece as spm

from deberta_ds.config import ModelConfig
from deberta_ds.data.dataset import PretrainingSamples, TokenCorpus, special_ids
from deberta_ds.data.indexed_dataset import data_path, find_shard_prefixes, first_id_at_or_above
from deberta_ds.data.mixture import MixtureSamples
from deberta_ds.data.phases import PhasedSamples
from deberta_ds.data.provenance import check_provenance
from deberta_ds.data.tokenizer import TokenizerMetadata, word_start_table
from deberta_ds.errors import MissingInputError, UserError, require
from deberta_ds.training.run_config import DataSection, RunConfig


def build_data(config: RunConfig, model_config: ModelConfig, processor: spm.SentencePieceProcessor,
               meta: TokenizerMetadata) -> tuple[PhasedSamples, PretrainingSamples | None]:
    """(training samples of every phase, held-out samples or None) for this model and tokenizer."""
    require(bool(config.data.train), "data.train", "no training shards given")
    plan = config.phase_plan()
    word_start = (word_start_table(processor, model_config.vocab_size)
                  if any(section.masking.whole_word for _, section in plan) else None)

    def samples(paths, seed: int, section: DataSection, where: str) -> PretrainingSamples:
        require(section.max_length <= model_config.max_position_embeddings, f"{where}.max_length",
                f"{section.max_length} exceeds the model's max_position_embeddings "
                f"({model_config.max_position_embeddings}, the generator's absolute positions)")
        prefixes = find_shard_prefixes(paths)
        check_provenance(prefixes, meta.sha256, section.allow_incomplete_shards,
                         warn=lambda message: print(message, file=sys.stderr))
        corpus = TokenCorpus(prefixes)
        if corpus.max_token_id >= model_config.vocab_size:
            raise UserError(f"{where}: {outside_vocabulary(corpus, model_config.vocab_size)} is outside the model "
                            f"vocabulary of {model_config.vocab_size} (from data.tokenizer {config.data.tokenizer}); "
                            f"check the shards with python -m data_prep verify --tokenizer {config.data.tokenizer}")
        return PretrainingSamples(corpus, section.max_length, special_ids(meta), section.masking, seed,
                                  section.cross_documents, word_start, section.document_attention)

    phases = []
    for i, (first_step, section) in enumerate(plan):
        where = f"phases[{i}].data" if config.phases else "data"
        phases.append((first_step * config.train.global_batch_size, training_samples(section, samples, where)))
    valid = (samples(config.data.valid, config.data.seed + 1, config.data, "data.valid") if config.data.valid
             else None)
    return PhasedSamples(phases), valid


def outside_vocabulary(corpus: TokenCorpus, vocab_size: int) -> str:
    """'FILE: token id T at offset O' of the first id >= vocab_size in the corpus's shards."""
    for shard in corpus.shards:
        position = first_id_at_or_above(shard, vocab_size)
        if position is not None:
            return (f"{data_path(shard.prefix)}: token id {int(shard.tokens[position])} at offset "
                    f"{position * shard.dtype.itemsize}")
    raise AssertionError("no id outside the vocabulary")  # only called when the corpus's largest id is


def training_samples(section: DataSection, samples, where: str):
    """Plain paths: one corpus over all their shards (each weighted by its tokens). Weighted
    entries: a MixtureSamples over one corpus per source, each with its own sample order."""
    sources = section.train
    if not section.is_mixture:
        return samples([source.path for source in sources], section.seed, section, where)
    parts = []
    for i, source in enumerate(sources):
        try:
            parts.append(samples([source.path], section.seed + 1000 * (i + 1), section, where))
        except MissingInputError as error:
            raise UserError(f"{where}.train[{i}] ({source.name}): {error}") from None
    return MixtureSamples([source.name for source in sources], parts, [source.weight for source in sources])

