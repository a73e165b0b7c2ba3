"""The run's initial weights from `init_from`: a Hugging Face checkpoint (built at TP = 1), a
native one or a training run's, checked against the run's model shape, the generator's absolute
positions grown for context extension, and split to this rank's TP shard (any TP size)."""

from __future__ import annotations

from pathlib import Path

from deberta_ds.checkpoint_reader import load_native
from deberta_ds.errors import UserError
from deberta_ds.hf_format import from_hf
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.context import extend_absolute_positions
from deberta_ds.parallel.state_dict_split import partition_plan, split_state
from deberta_ds.training.run_config import RunConfig


def load_initial_weights(model: ReplacedTokenDetection, config: RunConfig, log) -> None:
    """Load config.init_from into `model` (this rank's TP shard); `log` tells the console."""
    source = Path(config.init_from)
    if (source / "config.json").is_file():  # a Hugging Face checkpoint
        full = from_hf(source, config.init_generator_from, as_rtd=True,
                       embedding_sharing=model.config.embedding_sharing)
    else:
        full = load_native(source)
    ours = model.config.discriminator
    # A longer context than the checkpoint's is an extension (deberta_ds.model.context); any
    # other difference is another model.
    if not isinstance(full, ReplacedTokenDetection) or \
            full.config.discriminator.replace(max_position_embeddings=ours.max_position_embeddings) != ours:
        raise UserError(f"init_from: {source} does not hold an RTD pair with this run's model shape "
                        f"({config.model} + model_overrides, vocab {ours.vocab_size})")
    state = full.state_dict()
    if full.config.discriminator.max_position_embeddings != ours.max_position_embeddings:
        state = extend_absolute_positions(state, ours.max_position_embeddings)
        log(f"extended the generator's absolute positions from {full.config.discriminator.max_position_embeddings} "
            f"to {ours.max_position_embeddings}")
    model.load_state_dict(split_state(state, partition_plan(model), ours.vocab_size, model.tp.size, model.tp.rank))
    log(f"initialised from {source}")
