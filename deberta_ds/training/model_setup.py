"""The run's model configuration, built once from the run config and the tokenizer: the preset
with its overrides, a vocabulary that fits the tokenizer (or the init_from checkpoint's rows) and
the objective's settings. From here on `RTDConfig` is the one live copy of the `rtd` section:
the model, the engines and the checkpoint read it, never the run config's."""

from __future__ import annotations

from dataclasses import asdict

from deberta_ds.checkpoint_reader import checkpoint_vocab_size
from deberta_ds.config import RTDConfig, preset
from deberta_ds.data.tokenizer import TokenizerMetadata
from deberta_ds.errors import require
from deberta_ds.training.run_config import RunConfig


def build_rtd_config(config: RunConfig, meta: TokenizerMetadata) -> RTDConfig:
    overrides = dict(config.model_overrides)
    overrides.setdefault("vocab_size", initial_vocab_size(config, meta))
    require(overrides["vocab_size"] > meta.mask_id, "model_overrides.vocab_size",
            f"{overrides['vocab_size']} is smaller than the tokenizer's {meta.mask_id + 1} ids ([MASK] = "
            f"{meta.mask_id}, {config.data.tokenizer})")
    model_config = preset(config.model, **overrides)
    model_config.check_tensor_parallel(config.train.tp)
    return RTDConfig(discriminator=model_config, mask_token_id=meta.mask_id, **asdict(config.rtd))


def initial_vocab_size(config: RunConfig, meta: TokenizerMetadata) -> int:
    """The model's vocabulary rows: the init_from checkpoint's (128,100 for the published models)
    when the tokenizer's ids fit in it, else the tokenizer's (pieces + [MASK], rounded up to 128)."""
    if not config.init_from:
        return meta.model_vocab_size
    rows, tokenizer_ids = checkpoint_vocab_size(config.init_from), meta.mask_id + 1
    require(rows >= tokenizer_ids, "init_from", f"{config.init_from} has {rows} vocabulary rows but the tokenizer "
                                                f"{config.data.tokenizer} needs {tokenizer_ids}; it is not that "
                                                "checkpoint's tokenizer")
    return rows
