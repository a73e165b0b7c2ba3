"""Checkpoints: DeepSpeed engine states plus the trainer's client state, published atomically.

Layout under OUTPUT/checkpoints/:
    step_00000012/<engine>/...        DeepSpeed's files, one folder per engine (joint | generator, discriminator)
    step_00000012/trainer_state.json  step, consumed samples, run config (less its rtd section), the model's
                                      RTDConfig (the rtd settings' one copy), tokenizer metadata, world size
    step_00000012/rng_rank{r}.safetensors  each rank's RNG states (CPU and CUDA, default and TP streams, numpy, Python)
    step_00000012/weights_tp{t}.safetensors   TP > 1 only: each TP rank's full module shard
    step_00000012/COMPLETE            written by rank 0 after every rank finished writing: the size and
                                      sha256 of every file of the folder, checked on every load
    latest                            the newest COMPLETE tag; moved (write + rename) only after COMPLETE

A kill while writing leaves the previous checkpoint complete. Which checkpoint is "the newest"
is decided by `newest_complete` alone (the highest step folder holding COMPLETE, whatever
`latest` says: a kill between COMPLETE and moving `latest` leaves it behind); resume, `convert`,
`init_from` and every checkpoint load use it, and a relaunch repairs `latest`. Resuming on a
different data-parallel size converts each engine folder with DeepSpeed's universal-checkpoint tool.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from safetensors import SafetensorError

from deberta_ds.atomic_files import atomic_path, write_atomic
from deberta_ds.config import RTDObjective, to_dict
from deberta_ds.content_hash import check_file, file_record
from deberta_ds.errors import CheckpointError, UserError
from deberta_ds.parallel.random import RNGStatesTracker, get_rng_states, set_rng_states
from deberta_ds.training.run_config import RunConfig, run_config_from_dict
from deberta_ds.training.safe_load import weights_only_loads

CHECKPOINTS = "checkpoints"  # the folder under a run's output_dir
COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "trainer_state.json"


def checkpoints_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def run_config_entry(config: RunConfig) -> dict:
    """The run config as trainer_state.json records it: without the `rtd` section, whose one copy
    at run time (and in the file) is the model's RTDConfig, `rtd_config` beside it."""
    return {name: value for name, value in to_dict(config).items() if name != "rtd"}


def run_config_of(state: dict) -> RunConfig:
    """A trainer state's run config, its `rtd` section read back from the model's RTDConfig."""
    rtd = {field.name: state["rtd_config"][field.name] for field in dataclasses.fields(RTDObjective)}
    return run_config_from_dict(state["run_config"] | {"rtd": rtd})


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank}.safetensors"


def _save_rng_states(path: Path, tracker: RNGStatesTracker | None) -> None:
    """Generator states (with `tracker`'s TP stream at TP > 1) as tensors and numpy's and
    Python's as JSON in one safetensors file (nothing that loading could execute)."""
    from safetensors.torch import save_file

    states = get_rng_states(tracker)
    tensors = {f"generators.{device}": state for device, state in states["generators"].items()}
    tensors |= {f"tracker.{name}.{device}": state for name, stream in states["tracker"].items()
                for device, state in stream.items()}
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    metadata = {"numpy": json.dumps([kind, keys.tolist(), position, has_gauss, cached_gaussian]),
                "python": json.dumps(states["python"])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _load_rng_states(path: Path, tracker: RNGStatesTracker | None) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    kind, keys, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    version, internal, gauss_next = json.loads(metadata["python"])
    streams: dict = {}
    for key, tensor in tensors.items():
        if key.startswith("tracker."):
            name, device = key[len("tracker."):].rsplit(".", 1)
            streams.setdefault(name, {})[device] = tensor
    generators = {key.split(".", 1)[1]: tensor for key, tensor in tensors.items() if key.startswith("generators.")}
    set_rng_states({"generators": generators, "tracker": streams,
                    "numpy": (kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian),
                    "python": (version, tuple(internal), gauss_next)}, tracker)


def tp_weights_file(folder: Path, tp_rank: int) -> Path:
    return folder / f"weights_tp{tp_rank}.safetensors"


def _save_tp_weights(folder: Path, model, dp_rank: int) -> None:
    """TP > 1: the first replica's ranks write their full-precision module shards (ZeRO-3
    parameters gathered over the data-parallel group), which `convert` merges into TP = 1."""
    import deepspeed
    from safetensors.torch import save_file

    params = list(model.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        if dp_rank == 0:
            shard = {name: p.detach().float().cpu().contiguous().clone() for name, p in model.named_parameters()}
            with atomic_path(tp_weights_file(folder, model.tp.rank)) as tmp:
                save_file(shard, str(tmp))


def save(root: Path, engines: dict, step: int, client_state: dict, rank: int, keep_last: int, tp_model=None,
         dp_rank: int = 0, tracker: RNGStatesTracker | None = None) -> Path:
    """Write step's checkpoint and point `latest` at it (tp_model: the TP > 1 model whose shards
    the first data-parallel replica writes; tracker: its TP RNG stream, None at TP = 1). A
    complete checkpoint of this step is never rewritten (a relaunch that saves again before any
    step would otherwise put the only copy at risk); a half-written one is removed first."""
    tag = tag_for(step)
    folder = root / tag
    if (folder / COMPLETE).is_file():
        if rank == 0:
            repair_latest(root, folder)
        _barrier()
        return folder
    if rank == 0 and folder.exists():  # a half-written attempt at this step: start clean
        shutil.rmtree(folder)
    _barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=name, save_latest=False)
    _save_rng_states(rng_file(folder, rank), tracker)
    if tp_model is not None:
        _save_tp_weights(folder, tp_model, dp_rank)
    if rank == 0:
        write_atomic(folder / STATE, json.dumps(client_state, indent=1))
    _barrier()  # every rank has finished writing
    if rank == 0:
        write_atomic(folder / COMPLETE, json.dumps({"files": file_records(folder)}, indent=1))
        write_atomic(root / LATEST, tag)
        _prune(root, keep_last)
    _barrier()
    return folder


def file_records(folder: Path) -> dict:
    """Size and content hash of every file of a step folder, by path relative to it."""
    return {str(path.relative_to(folder)): file_record(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != COMPLETE}


def verify(folder: Path) -> None:
    """Every file the COMPLETE marker records has its recorded size and sha256 (a marker written
    before hashes were recorded is empty: nothing to check)."""
    marker = folder / COMPLETE
    text = marker.read_text(errors="replace")
    if not text.strip():
        return
    try:
        records = dict(json.loads(text)["files"])
    except (ValueError, KeyError, TypeError) as error:  # ValueError: JSONDecodeError too
        raise CheckpointError(f"{marker}: damaged ({error}); it must list the checkpoint's files") from None
    for relative, record in records.items():
        check_file(folder / relative, record)


def repair_latest(root: Path, folder: Path) -> bool:
    """Point `latest` at `folder` (the newest complete checkpoint) when it names another; whether it did."""
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text().strip() == folder.name:
        return False
    write_atomic(pointer, folder.name)
    return True


def _prune(root: Path, keep_last: int) -> None:
    complete = _complete_checkpoints(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def checkpoint_to_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint `--resume` names: auto (root's newest complete checkpoint, if any), none
    (start fresh; refused when root holds checkpoints), or the path of a complete checkpoint
    folder, refused when root holds newer checkpoints that continuing from it would replace."""
    if resume == "auto":
        return newest_complete(root)
    if resume == "none":
        if (root / LATEST).exists() or _complete_checkpoints(root):
            raise UserError(f"--resume none: {root} already holds checkpoints; use --resume auto or another "
                             "output_dir")
        return None
    folder = Path(resume)
    if not (folder / COMPLETE).is_file() or not (folder / STATE).is_file():
        raise UserError(f"--resume {resume!r}: choose auto, none, or the path of a complete checkpoint folder "
                         f"(a step_N folder holding {COMPLETE} and {STATE}, e.g. {root / tag_for(1000)})")
    step = read_state(folder)["step"]
    newer = [p.name for p in _complete_checkpoints(root) if read_state(p)["step"] > step]
    if newer:
        raise UserError(f"--resume {folder}: {root} holds newer checkpoints ({', '.join(newer)}) that continuing "
                         f"from step {step} would replace; move them out of {root} first")
    return folder


def newest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under a checkpoints folder: the highest step folder holding
    COMPLETE. `latest` is not consulted: a kill between writing COMPLETE and moving it leaves it
    behind. The one answer to "which checkpoint" for every reader."""
    return (_complete_checkpoints(root) or [None])[-1]


def read_state(folder: Path) -> dict:
    path = folder / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        state = error
    if not isinstance(state, dict) or any(type(state.get(key)) is not int for key in ("step", "consumed_samples")):
        detail = state if isinstance(state, Exception) else "no integer step and consumed_samples"
        raise CheckpointError(f"{path}: damaged, not a trainer state ({detail}); resume from an earlier complete "
                              "step folder with --resume PATH")
    return state


# Fields that decide the parameters' shapes: a checkpoint resumes only into the same ones.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "position_buckets",
                "max_relative_positions", "max_position_embeddings", "share_att_key", "pos_att_type")


def check_resumable(state: dict, folder: Path, rtd_config, tokenizer_meta: dict) -> None:
    """Refuse a checkpoint of another model shape or another tokenizer, naming what differs."""
    ours, theirs = to_dict(rtd_config), state.get("rtd_config", {})
    differ = [f"rtd.{name}" for name in ("generator_layers", "embedding_sharing") if ours[name] != theirs.get(name)]
    differ += [f"model.{name}" for name in SHAPE_FIELDS
               if ours["discriminator"][name] != theirs.get("discriminator", {}).get(name)]
    if differ:
        detail = ", ".join(f"{name} {_field(theirs, name)} vs {_field(ours, name)}" for name in differ)
        raise CheckpointError(f"{folder}: a checkpoint of another model shape ({detail}: checkpoint vs this run); "
                              "resume with the run config it was trained with, or use init_from for other shapes")
    recorded = state.get("tokenizer", {}).get("sha256")
    if recorded != tokenizer_meta["sha256"]:
        raise CheckpointError(f"{folder}: trained with tokenizer sha256 {recorded}, but data.tokenizer has sha256 "
                              f"{tokenizer_meta['sha256']}; resume with the tokenizer it was trained with")


def _field(config: dict, dotted: str):
    section, name = dotted.split(".")
    return config.get(name) if section == "rtd" else config.get("discriminator", {}).get(name)


def _checkpoints_root(path: Path) -> Path | None:
    """The checkpoints folder a run's output_dir or its checkpoints/ folder names, else None."""
    for root in (path, path / CHECKPOINTS):
        if (root / LATEST).is_file() or any(root.glob("step_*")):
            return root
    return None


def is_training_checkpoint(path: Path) -> bool:
    """A step folder, a checkpoints/ folder or a run's output_dir."""
    return (path / STATE).is_file() or _checkpoints_root(path) is not None


def complete_step_folder(folder: str | Path) -> Path:
    """The complete step folder a training checkpoint path names (a step folder, or its
    checkpoints/ folder or the run's output_dir: the newest complete step)."""
    folder = Path(folder)
    root = None if (folder / STATE).is_file() else _checkpoints_root(folder)
    if root is not None:
        newest = newest_complete(root)
        if newest is None:
            raise CheckpointError(f"{root}: holds no complete training checkpoint (no step folder with a {COMPLETE} "
                                  "marker: the run stopped before its first checkpoint was finished)")
        return newest
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(f"{folder}: not a complete training checkpoint (no {COMPLETE} marker: it was being "
                              "written when the run stopped); use an earlier step folder")
    return folder


def is_sharded(zero_stage: int, precision: str) -> bool:
    """Whether DeepSpeed's files hold the weights as shards (ZeRO 1-3, or bf16/fp16 with fp32
    master weights): they are consolidated with zero_to_fp32, and changing the data-parallel size
    needs the universal format."""
    return zero_stage > 0 or precision != "fp32"


def universal_folder(folder: Path, engine_name: str) -> Path:
    return folder / f"{engine_name}_universal"


def convert_to_universal(folder: Path, engine_names, rank: int) -> None:
    """DeepSpeed's ds_to_universal for each engine folder (rank 0 converts, the rest wait)."""
    if rank == 0:
        for name in engine_names:
            target = universal_folder(folder, name)
            if target.is_dir():
                continue
            with atomic_path(target) as tmp:
                subprocess.run([sys.executable, "-m", "deberta_ds.training.safe_load",  # weights-only loads
                                "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                str(folder / name), "--output_folder", str(tmp), "--inject_missing_state",
                                "--num_extract_workers", "1", "--num_merge_workers", "1"],
                               check=True, stdout=subprocess.DEVNULL)
    _barrier()


def load(folder: Path, engines: dict, rank: int, universal: bool, tracker: RNGStatesTracker | None = None) -> dict:
    """Check every file against COMPLETE, then load the engine states (universal: converted first)
    and this rank's RNG states (the TP stream into `tracker`, None at TP = 1); a damaged file is
    named, with the previous complete checkpoint to resume from instead."""
    try:
        verify(folder)
        if universal:
            convert_to_universal(folder, engines, rank)
        return _load(folder, engines, rank, universal, tracker)
    except UserError as error:
        previous = [p for p in _complete_checkpoints(folder.parent) if p.name < folder.name]
        advice = (f"resume from the previous complete checkpoint with --resume {previous[-1]}" if previous
                  else "no earlier complete checkpoint exists")
        raise UserError(f"{error}; {advice}") from None


def _load(folder: Path, engines: dict, rank: int, universal: bool, tracker: RNGStatesTracker | None) -> dict:
    for name, engine in engines.items():
        tag = universal_folder(folder, name).name if universal else name
        if not (folder / tag).is_dir():
            raise CheckpointError(f"{folder / tag}: missing; this checkpoint does not hold the {name} engine "
                                  f"(a damaged checkpoint, or one of a run with another train.mode)")
        with weights_only_loads():
            path, _ = engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise UserError(f"{folder / tag}: DeepSpeed could not load this checkpoint")
        if universal:  # the universal loader restores the scheduler but leaves the groups' lr at 0
            for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_lr()):
                group["lr"] = lr
    if rng_file(folder, rank).is_file() and not universal:
        try:
            _load_rng_states(rng_file(folder, rank), tracker)
        except (SafetensorError, ValueError, KeyError, TypeError) as error:  # ValueError: JSONDecodeError too
            raise UserError(f"{rng_file(folder, rank)}: cannot be read, the file is truncated or damaged "
                             f"({type(error).__name__}: {error})") from None
    return read_state(folder)
