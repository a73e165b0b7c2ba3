"""Everything a run checks before any process group or engine exists: the machine, the tokenizer,
the model configuration, the data of every phase, the DeepSpeed JSON, and the checkpoint it
resumes from (its files against COMPLETE, its model and tokenizer, the settings that changed).
A bad input therefore fails in seconds, not after DeepSpeed's start-up (minutes on a CPU); a
relaunch of a finished run says so without starting anything, and writes nothing."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deberta_ds.checkpoint_reader import LATEST, checkpoints_folder, read_state
from deberta_ds.config import RTDConfig
from deberta_ds.data.tokenizer import TokenizerMetadata, load_tokenizer
from deberta_ds.errors import require
from deberta_ds.training import checkpoint
from deberta_ds.training.data_setup import build_data
from deberta_ds.training.ds_config import build_ds_config
from deberta_ds.training.model_setup import build_rtd_config
from deberta_ds.training.resume_policy import checkpoint_run_config, resume_changes
from deberta_ds.training.run_config import RunConfig
from deberta_ds.training.run_logs import evaluation_logged


@dataclass
class RunStart:
    """The checked inputs of a run."""
    tokenizer_meta: TokenizerMetadata
    rtd_config: RTDConfig
    train_samples: object                 # PhasedSamples
    valid_samples: object                 # PretrainingSamples | None
    checkpoint: Path | None = None        # the (verified) checkpoint to resume from; None: start afresh
    state: dict | None = None             # its trainer state
    changes: list[str] = field(default_factory=list)   # settings that differ from it, for the log

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


def check_machine(config: RunConfig) -> None:
    """Settings this machine cannot run, refused before anything starts."""
    if torch.cuda.is_available():
        return
    require(config.train.precision != "fp16" or os.environ.get("DEBERTA_DS_CPU_FP16") == "1", "train.precision",
            "fp16 needs a GPU (DeepSpeed's CPU accelerator does not train in fp16); use bf16 or fp32 on the CPU")
    # Triton's interpreter runs the kernel on CPU tensors (the tests and gpu_check.sh's CPU smoke run)
    require(config.model_overrides.get("attention_impl") != "fused" or os.environ.get("TRITON_INTERPRET") == "1",
            "model_overrides.attention_impl", "fused needs a CUDA GPU (the Triton kernel); use reference or auto on "
            "the CPU (or TRITON_INTERPRET=1: Triton's interpreter, slow, for tests)")


def prepare(config: RunConfig, resume: str, verify: bool = True) -> RunStart:
    """Check every input of the run (see the module docstring) and read what it needs. verify: hash the
    checkpoint to resume against its COMPLETE here (False: the caller does, with `verify_checkpoint`,
    once it knows the run goes on; a relaunch of a finished run then reads no checkpoint file)."""
    check_machine(config)
    processor, meta = load_tokenizer(config.data.tokenizer)
    rtd_config = build_rtd_config(config, meta)
    train_samples, valid_samples = build_data(config, rtd_config.discriminator, processor, meta)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    require(world % config.train.tp == 0, "train.tp", f"{config.train.tp} does not divide the {world} processes")
    data_parallel = world // config.train.tp
    build_ds_config(config, data_parallel, config.optim.lr, not torch.cuda.is_available())  # its checks
    start = RunStart(meta, rtd_config, train_samples, valid_samples)
    latest = checkpoints_folder(config.output_dir) / LATEST
    require(not latest.exists() or latest.is_file(), str(latest),
            "is not a file (it must be one, naming the newest checkpoint); move it away")
    start.checkpoint = checkpoint.checkpoint_to_resume(resume, checkpoints_folder(config.output_dir))
    if start.checkpoint:
        folder = start.checkpoint
        start.state = read_state(folder, with_model=True)
        checkpoint.check_resumable(start.state, folder, rtd_config, asdict(meta))
        start.changes = resume_changes(checkpoint_run_config(start.state, folder), config, start.step, folder)
        if verify:
            verify_checkpoint(start)
    return start


def verify_checkpoint(start: RunStart) -> None:
    """Every file of the checkpoint to resume (if any) against the sizes and hashes its COMPLETE records."""
    if start.checkpoint:
        checkpoint.checked(start.checkpoint)


def nothing_to_do(config: RunConfig, start: RunStart) -> str | None:
    """The message of a relaunch of a finished run (its final evaluation logged): nothing starts,
    nothing is written. None when there is work."""
    if start.state is None or start.step < config.train.steps:
        return None
    if start.valid_samples is not None and not evaluation_logged(Path(config.output_dir) / "eval.jsonl", start.step):
        return None
    return finished_message(config, start.step)


def finished_message(config: RunConfig, step: int) -> str:
    return (f"{config.output_dir} is already trained to step {step} (train.steps={config.train.steps}); nothing to "
            "do. Raise train.steps to train on.")
