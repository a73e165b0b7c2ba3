"""Training checkpoints written and resumed: DeepSpeed engine states plus the trainer's client
state, published atomically (the layout, and reading a checkpoint into a model, live in
deberta_ds.checkpoint_reader).

A kill while writing leaves the previous checkpoint complete, and a relaunch repairs a `latest`
left behind. A failed write names the file it was writing and what the system said; a lost peer
at a barrier is not a write error and reaches the caller as the collective's own error. Resuming
on a different data-parallel size converts each engine folder with DeepSpeed's universal-checkpoint
tool into a temporary folder beside the step folder (removed after loading): a checkpoint folder is
never written to once it is complete.
"""

from __future__ import annotations

import contextlib
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
from deberta_ds.checkpoint_reader import (
    COMPLETE,
    LATEST,
    STATE,
    complete_checkpoints,
    file_records_of,
    newest_complete,
    read_state,
    tag_for,
    tp_weights_file,
    verify,
)
from deberta_ds.config import RTDObjective, to_dict
from deberta_ds.errors import CheckpointError, UserError
from deberta_ds.parallel.random import RNGStatesTracker, get_rng_states, set_rng_states
from deberta_ds.parallel_env import lost_contact
from deberta_ds.safe_load import weights_only_loads
from deberta_ds.training.run_config import RunConfig, run_config_from_dict


class CheckpointWriteError(UserError):
    """A checkpoint file could not be written (a full disk, a quota, a file-size limit): exit 1."""


def run_config_entry(config: RunConfig) -> dict:
    """The run config as trainer_state.json records it: without the `rtd` section, whose one copy
    at run time (and in the file) is the model's RTDConfig, `rtd_config` beside it."""
    return {name: value for name, value in to_dict(config).items() if name != "rtd"}


def run_config_of(state: dict) -> RunConfig:
    """A trainer state's run config, its `rtd` section read back from the model's RTDConfig."""
    rtd = {field.name: state["rtd_config"][field.name] for field in dataclasses.fields(RTDObjective)}
    return run_config_from_dict(state["run_config"] | {"rtd": rtd})


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
    complete checkpoint of this step is
    never rewritten (a relaunch that saves again before any step would otherwise put the only
    copy at risk); a half-written one is removed first. A failed write raises CheckpointWriteError
    naming the file and what the system said, with `latest` still naming the last complete checkpoint."""
    try:
        return _save(root, engines, step, client_state, rank, keep_last, tp_model, dp_rank, tracker)
    except CheckpointWriteError as error:
        latest = root / LATEST
        kept = f"{latest.read_text().strip()} is still the latest complete checkpoint" if latest.is_file() else \
            "no complete checkpoint exists yet"
        raise CheckpointWriteError(f"writing the checkpoint of step {step} under {root} failed: {error}; "
                                   f"{kept}") from None


@contextlib.contextmanager
def _writing(what: str | Path):
    """Names `what` in the error of a write that fails: an OSError with its errno text, or the
    RuntimeError torch.save reports any failed write with. A collective inside (DeepSpeed's save
    has some) that lost its peer stays what it is, for the lost-peer handler. safetensors reports
    a failed write as a SafetensorError holding the system's text."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise CheckpointWriteError(f"{what}: {error}") from None
    except RuntimeError as error:
        if lost_contact(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointWriteError(f"{what}: {first_line} (torch.save reports any failed write so: a full disk, "
                                   "a quota or a file-size limit)") from None


def _save(root: Path, engines: dict, step: int, client_state: dict, rank: int, keep_last: int, tp_model,
          dp_rank: int, tracker: RNGStatesTracker | None) -> Path:
    tag = tag_for(step)
    folder = root / tag
    if (folder / COMPLETE).is_file():
        if rank == 0:
            with _writing(root / LATEST):
                repair_latest(root, folder)
        _barrier()
        return folder
    if rank == 0 and folder.exists():  # a half-written attempt at this step: start clean
        with _writing(f"removing the half-written {folder}"):
            shutil.rmtree(folder)
    _barrier()
    for name, engine in engines.items():
        with _writing(f"the {name} engine's DeepSpeed files under {folder / name}"):
            engine.save_checkpoint(str(folder), tag=name, save_latest=False)
    with _writing(rng_file(folder, rank)):
        _save_rng_states(rng_file(folder, rank), tracker)
    if tp_model is not None:
        with _writing(tp_weights_file(folder, tp_model.tp.rank)):
            _save_tp_weights(folder, tp_model, dp_rank)
    if rank == 0:
        with _writing(folder / STATE):
            write_atomic(folder / STATE, json.dumps(client_state, indent=1))
    _barrier()  # every rank has finished writing
    if rank == 0:
        with _writing(folder / COMPLETE):
            write_atomic(folder / COMPLETE, json.dumps({"files": file_records_of(folder)}, indent=1))
        with _writing(root / LATEST):
            write_atomic(root / LATEST, tag)
        _prune(root, keep_last)
    _barrier()
    return folder


def repair_latest(root: Path, folder: Path) -> bool:
    """Point `latest` at `folder` (the newest complete checkpoint) when it names another; whether it did."""
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text().strip() == folder.name:
        return False
    write_atomic(pointer, folder.name)
    return True


def _prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_to_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint `--resume` names: auto (root's newest complete checkpoint, if any), none
    (start fresh; refused when root holds checkpoints), or the path of a complete checkpoint
    folder, refused when root holds newer checkpoints that continuing from it would replace."""
    if resume == "auto":
        return newest_complete(root)
    if resume == "none":
        if (root / LATEST).exists() or complete_checkpoints(root):
            raise UserError(f"--resume none: {root} already holds checkpoints; use --resume auto or another "
                             "output_dir")
        return None
    folder = Path(resume)
    if not (folder / COMPLETE).is_file() or not (folder / STATE).is_file():
        raise UserError(f"--resume {resume!r}: choose auto, none, or the path of a complete checkpoint folder "
                         f"(a step_N folder holding {COMPLETE} and {STATE}, e.g. {root / tag_for(1000)})")
    step = read_state(folder)["step"]
    newer = [p.name for p in complete_checkpoints(root) if read_state(p)["step"] > step]
    if newer:
        raise UserError(f"--resume {folder}: {root} holds newer checkpoints ({', '.join(newer)}) that continuing "
                         f"from step {step} would replace; move them out of {root} first")
    return folder


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


def universal_root(folder: Path) -> Path:
    """Where a step folder's engines are converted to DeepSpeed's universal format for loading
    (beside it, not in it: `.universal_step_N/<engine>_universal`; a dot name no reader takes for a step)."""
    return folder.parent / f".universal_{folder.name}"


def universal_tag(engine_name: str) -> str:
    return f"{engine_name}_universal"


def convert_to_universal(folder: Path, engine_names, rank: int) -> None:
    """DeepSpeed's ds_to_universal for each engine folder into universal_root (rank 0 converts, the
    rest wait); a refusal reaches every rank as the same CheckpointError."""
    failure = None
    if rank == 0:
        root = universal_root(folder)
        shutil.rmtree(root, ignore_errors=True)  # a conversion killed half-way (the folder is temporary)
        root.mkdir()
        for name in engine_names:
            result = subprocess.run([sys.executable, "-m", "deberta_ds.safe_load",  # weights-only loads
                                     "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder / name),
                                     "--output_folder", str(root / universal_tag(name)), "--inject_missing_state",
                                     "--num_extract_workers", "1", "--num_merge_workers", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:
                lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
                failure = (f"{folder / name}: DeepSpeed's universal-checkpoint conversion (needed to resume on "
                           f"another data-parallel size) failed: {lines[-1] if lines else result.returncode}")
                break
    failure = _agreed(failure)
    if failure:
        raise CheckpointError(f"{failure}; resume on the data-parallel size the checkpoint was written with "
                              f"({read_state(folder).get('data_parallel_size', '?')})")


def _agreed(message: str | None) -> str | None:
    """Rank 0's message, on every rank."""
    if not dist.is_initialized():
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def remove_universal(folder: Path, rank: int) -> None:
    """After every rank loaded: the temporary universal conversion goes."""
    _barrier()
    if rank == 0:
        shutil.rmtree(universal_root(folder), ignore_errors=True)


def checked(folder: Path) -> None:
    """verify(folder), its error completed with what to do: move the damaged checkpoint out of the
    run's checkpoints folder and relaunch (it then resumes from the previous complete one)."""
    try:
        verify(folder)
    except UserError as error:
        previous = [p for p in complete_checkpoints(folder.parent) if p.name < folder.name]
        aside = folder.parent.parent / f"damaged_{folder.name}"
        advice = (f"move it out of {folder.parent} (mv {folder} {aside}) and relaunch the same command: it resumes "
                  + (f"from the previous complete checkpoint (or name it: --resume {previous[-1]})" if previous
                     else "afresh (no earlier complete checkpoint exists)"))
        raise type(error)(f"{error}; {advice}") from None


def load(folder: Path, engines: dict, rank: int, universal: bool, tracker: RNGStatesTracker | None = None,
         verified: bool = False) -> dict:
    """Check every file against COMPLETE (unless the caller has: verified), then load the engine
    states (universal: converted first) and this rank's RNG states (the TP stream into `tracker`,
    None at TP = 1); a damaged file is named, with what to do."""
    if not verified:
        checked(folder)
    try:
        if universal:
            convert_to_universal(folder, engines, rank)
        return _load(folder, engines, rank, universal, tracker)
    finally:
        if universal:
            remove_universal(folder, rank)


def _load(folder: Path, engines: dict, rank: int, universal: bool, tracker: RNGStatesTracker | None) -> dict:
    for name, engine in engines.items():
        load_dir, tag = (universal_root(folder), universal_tag(name)) if universal else (folder, name)
        if not (load_dir / tag).is_dir():
            raise CheckpointError(f"{load_dir / tag}: missing; this checkpoint does not hold the {name} engine "
                                  f"(a damaged checkpoint, or one of a run with another train.mode)")
        with weights_only_loads():
            path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise UserError(f"{load_dir / tag}: DeepSpeed could not load this checkpoint")
    if rng_file(folder, rank).is_file() and not universal:
        try:
            _load_rng_states(rng_file(folder, rank), tracker)
        except (SafetensorError, ValueError, KeyError, TypeError) as error:  # ValueError: JSONDecodeError too
            raise UserError(f"{rng_file(folder, rank)}: cannot be read, the file is truncated or damaged "
                             f"({type(error).__name__}: {error})") from None
    return read_state(folder)
