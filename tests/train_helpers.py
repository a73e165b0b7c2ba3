"""Run configs and in-process training for the distributed training tests."""

from __future__ import annotations

import copy

import deepspeed
import torch

from deberta_ds.data.tokenizer import load_tokenizer
from deberta_ds.training.data_setup import build_data
from deberta_ds.training.model_setup import build_rtd_config
from deberta_ds.training.run_config import RunConfig, run_config_from_dict
from deberta_ds.training.trainer import Trainer

ZERO3_PARTITION_EVERYTHING = {"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                    "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 1000}}


def trainer_data(config: RunConfig):
    """(training samples, held-out samples or None, tokenizer metadata) as the trainer builds them:
    the tokenizer, then the model configuration, then the data checked against both."""
    processor, meta = load_tokenizer(config.data.tokenizer)
    return (*build_data(config, build_rtd_config(config, meta).discriminator, processor, meta), meta)


def tiny_run(shards: dict, output_dir, **sections) -> dict:
    """A 6-step fp32 run of the tiny pair; `sections` update the run config's sections."""
    run = {"model": "tiny", "seed": 7, "output_dir": str(output_dir),
           "data": {"train": [shards["train"]], "tokenizer": shards["tokenizer"], "max_length": 64},
           "optim": {"lr": 2e-3, "warmup_steps": 2},
           "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "precision": "fp32",
                     "zero_stage": 0, "log_every": 1, "eval_batches": 1}}
    for section, values in sections.items():
        if isinstance(values, dict) and section != "model_overrides":
            run.setdefault(section, {}).update(copy.deepcopy(values))
        else:
            run[section] = values
    return run


def full_weights(trainer: Trainer) -> dict:
    params = dict(trainer.model.named_parameters())
    context = deepspeed.zero.GatheredParameters(list(params.values())) if trainer.config.train.zero_stage == 3 \
        else torch.no_grad()
    with context:
        return {name: param.detach().clone().float() for name, param in params.items()}


def train_runs(runs: list[dict], resume: str = "none") -> list[dict]:
    """Train each run in this process group (resume: auto continues from its checkpoint); losses
    per step of this invocation and final full weights."""
    results = []
    for run in runs:
        trainer = Trainer(run_config_from_dict(run), resume=resume)
        trainer.run()
        history = trainer.run_log.history
        results.append({"losses": [(h["generator/mlm_loss"], h["discriminator/rtd_loss"]) for h in history],
                        "weights": full_weights(trainer), "history": history})
    return results
