"""The run's data, checked before the first step: the tokenizer, the model vocabulary that fits
it, the training samples of every phase (a corpus, or a weighted mixture of corpora) and the
held-out samples. Every mismatch is an error naming the field."""

from __future__ import annotations

import sys
from dataclasses import asdict

from deberta_ds.config import RTDConfig, preset
from deberta_ds.data.dataset import PretrainingSamples, TokenCorpus, special_ids
from deberta_ds.data.indexed_dataset import data_path, find_shard_prefixes, first_id_at_or_above
from deberta_ds.data.mixture import MixtureSamples
from deberta_ds.data.phases import PhasedSamples
from deberta_ds.data.provenance import check_provenance
from deberta_ds.data.tokenizer import load_tokenizer, word_start_table
from deberta_ds.errors import MissingInputError, UserError, require
from deberta_ds.training.run_config import DataSection, RunConfig


def build_data(config: RunConfig):
    """(training PhasedSamples, held-out samples or None, RTD model config, tokenizer metadata)."""
    require(bool(config.data.train), "data.train", "no training shards given")
    processor, meta = load_tokenizer(config.data.tokenizer)
    overrides = dict(config.model_overrides)
    overrides.setdefault("vocab_size", initial_vocab_size(config, meta))
    require(overrides["vocab_size"] > meta.mask_id, "model_overrides.vocab_size",
            f"{overrides['vocab_size']} is smaller than the tokenizer's {meta.mask_id + 1} ids ([MASK] = "
            f"{meta.mask_id}, {config.data.tokenizer})")
    model_config = preset(config.model, **overrides)
    rtd_config = RTDConfig(discriminator=model_config, mask_token_id=meta.mask_id, **asdict(config.rtd))
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
    return PhasedSamples(phases), valid, rtd_config, asdict(meta)


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


def initial_vocab_size(config: RunConfig, meta) -> int:
    """The model's vocabulary rows: the init_from checkpoint's (128,100 for the published models)
    when the tokenizer's ids fit in it, else the tokenizer's (pieces + [MASK], rounded up to 128)."""
    from deberta_ds.native_checkpoint import checkpoint_vocab_size

    if not config.init_from:
        return meta.model_vocab_size
    rows, tokenizer_ids = checkpoint_vocab_size(config.init_from), meta.mask_id + 1
    require(rows >= tokenizer_ids, "init_from", f"{config.init_from} has {rows} vocabulary rows but the tokenizer "
                                                f"{config.data.tokenizer} needs {tokenizer_ids}; it is not that "
                                                "checkpoint's tokenizer")
    return rows
