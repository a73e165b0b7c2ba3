"""Reading our checkpoint folders, the one home of their layout: a training run's checkpoints
(checked, consolidated, merged to TP = 1) and native checkpoints, as a model in memory.

Training checkpoints, under OUTPUT/checkpoints/ (written by deberta_ds.training.checkpoint):
    step_00000012/<engine>/...        DeepSpeed's files, one folder per engine (joint | generator, discriminator)
    step_00000012/trainer_state.json  step, consumed samples, run config (less its rtd section), the model's
                                      RTDConfig (the rtd settings' one copy), tokenizer metadata, world size
    step_00000012/rng_rank{r}.safetensors  each rank's RNG states (CPU and CUDA, default and TP streams, numpy, Python)
    step_00000012/weights_tp{t}.safetensors   TP > 1 only: each TP rank's full module shard
    step_00000012/COMPLETE            written by rank 0 after every rank finished writing: the size and
                                      sha256 of every file of the folder, checked on every load; a
                                      file it does not vouch for fails the load (`vouch` re-records an
                                      old checkpoint's files on purpose)
    latest                            the newest COMPLETE tag; moved (write + rename) only after COMPLETE

Which checkpoint is "the newest" is decided by `newest_complete` alone (the highest step folder
holding COMPLETE, whatever `latest` says: a kill between COMPLETE and moving `latest` leaves it
behind); resume, `convert`, `init_from` and every checkpoint load use it.

Native checkpoint directory: ``deberta_ds.json`` ({"kind": "encoder" | "rtd", "config": ...})
plus ``model.safetensors`` (or, after ``split_tp``, ``weights_tp{r}.safetensors`` and "tp": N).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from deberta_ds.atomic_files import write_atomic
from deberta_ds.config import model_config_from_dict, parse_config_text, rtd_config_from_dict
from deberta_ds.content_hash import check_file, file_record
from deberta_ds.errors import CheckpointError, UserError, require
from deberta_ds.model import Encoder, ReplacedTokenDetection
from deberta_ds.parallel.state_dict_split import merge_states, partition_plan
from deberta_ds.safe_load import weights_only_loads

CHECKPOINTS = "checkpoints"  # the folder under a run's output_dir
COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "trainer_state.json"
NATIVE_CONFIG = "deberta_ds.json"
WEIGHTS = "model.safetensors"


def checkpoints_folder(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tp_weights_file(folder: Path, tp_rank: int) -> Path:
    return folder / f"weights_tp{tp_rank}.safetensors"


class UnvouchedCheckpointError(CheckpointError):
    """A checkpoint folder holds files its COMPLETE marker does not record (an empty or partial
    marker, e.g. of a version that recorded no hashes)."""


def _vouch_advice(folder: Path) -> str:
    return (f"if you trust the files as they are now (an old checkpoint), record them on purpose with "
            f"python -m deberta_ds.convert vouch --checkpoint {folder}")


def verify(folder: Path) -> None:
    """Every file present in the step folder is recorded in its COMPLETE marker with the size and
    sha256 it has now, and every recorded file is present. A marker that cannot vouch for a file
    (empty, `{"files": []}`, a missing record) fails with UnvouchedCheckpointError."""
    marker = folder / COMPLETE
    text = marker.read_text(errors="replace")
    if not text.strip():
        raise UnvouchedCheckpointError(f"{marker}: empty, it records no file (a checkpoint of a version without "
                                       f"hashes, or a damaged marker), so nothing of {folder} can be checked; "
                                       + _vouch_advice(folder))
    try:
        records = dict(parse_config_text(text, "json", str(marker))["files"])
    except (UserError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{marker}: damaged ({error}); it must list the checkpoint's files") from None
    unvouched = sorted(set(file_records_of(folder, hashed=False)) - set(records))
    if unvouched:
        raise UnvouchedCheckpointError(f"{marker}: does not record {', '.join(unvouched[:5])}"
                                       f"{'...' if len(unvouched) > 5 else ''} present in {folder}, so "
                                       f"{'it' if len(unvouched) == 1 else 'they'} cannot be checked; "
                                       + _vouch_advice(folder))
    for relative, record in records.items():
        check_file(folder / relative, record)


def file_records_of(folder: Path, hashed: bool = True) -> dict:
    """Size and content hash (hashed) of every file of a step folder but COMPLETE, by relative path."""
    return {str(path.relative_to(folder)): file_record(path) if hashed else None
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE}


def vouch(folder: Path) -> int:
    """Record the files of a step folder as they are now in its COMPLETE marker (the explicit way to
    accept a checkpoint whose marker records no hashes); the number of files recorded."""
    require((folder / STATE).is_file(), str(folder), f"not a training checkpoint step folder (no {STATE})")
    records = file_records_of(folder)
    write_atomic(folder / COMPLETE, json.dumps({"files": records}, indent=1))
    return len(records)


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def newest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under a checkpoints folder: the highest step folder holding
    COMPLETE. `latest` is not consulted: a kill between writing COMPLETE and moving it leaves it
    behind. The one answer to "which checkpoint" for every reader."""
    return (complete_checkpoints(root) or [None])[-1]


def read_state(folder: Path, with_model: bool = False) -> dict:
    """A step folder's trainer state: step and consumed samples (integers >= 0) and, with_model,
    the run config, model config and engines that loading its weights needs; else a
    CheckpointError naming the file."""
    path = folder / STATE
    try:
        state = parse_config_text(path.read_text(), "json", str(path))
    except (OSError, UnicodeDecodeError, UserError) as error:
        state = error
    fields = {"step": int, "consumed_samples": int} | (
        {"run_config": dict, "rtd_config": dict, "engines": list} if with_model else {})
    if isinstance(state, Exception) or not isinstance(state, dict):
        detail = state if isinstance(state, Exception) else "not a JSON object"
    else:
        wrong = [key for key, kind in fields.items()
                 if type(state.get(key)) is not kind or kind is int and state[key] < 0]
        detail = f"{', '.join(wrong)}: missing or invalid (step and consumed_samples are integers >= 0)" if wrong \
            else None
    if detail is not None:
        raise CheckpointError(f"{path}: damaged, not a trainer state ({detail}); resume from an earlier complete "
                              "step folder with --resume PATH")
    return state


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


def load_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict with an error naming `source` and the missing, unexpected or misshapen keys."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:6]}"
                              f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(expected[name].shape)}")
    module.load_state_dict(state)


def _merged_tp_pair(rtd_config: dict, folder: Path, tp_size: int) -> ReplacedTokenDetection:
    """The TP = 1 pair from `weights_tp{r}.safetensors`, r < tp_size (training or split-tp shards)."""
    model = ReplacedTokenDetection(rtd_config_from_dict(rtd_config))
    shards = [load_file(str(tp_weights_file(folder, rank))) for rank in range(tp_size)]
    load_strict(model, merge_states(shards, partition_plan(model), model.config.discriminator.vocab_size),
                str(folder))
    return model


def _deepspeed_engine_state(folder: Path, engine: str, sharded: bool) -> dict:
    """Consolidated fp32 weights of one engine folder of a training checkpoint. Sharded
    (ZeRO 1-3, or bf16/fp16 master weights) checkpoints go through DeepSpeed's zero_to_fp32."""
    with weights_only_loads():  # DeepSpeed's files are pickles: nothing in them may run
        if sharded:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=engine)
        states = torch.load(folder / engine / "mp_rank_00_model_states.pt", map_location="cpu")
    return {key: value.float() for key, value in states["module"].items()}


def recorded_tokenizer(checkpoint_dir: str | Path) -> tuple[str, str] | None:
    """(tokenizer path, its sha256) a training checkpoint was trained with; None for other checkpoints."""
    if not is_training_checkpoint(Path(checkpoint_dir)):
        return None
    state = read_state(complete_step_folder(checkpoint_dir), with_model=True)
    try:
        return state["run_config"]["data"]["tokenizer"], state["tokenizer"]["sha256"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{checkpoint_dir}: its {STATE} records no tokenizer (run_config.data.tokenizer and "
                              "tokenizer.sha256); pass --tokenizer DIR") from None


def load_training_checkpoint(folder: str | Path) -> ReplacedTokenDetection:
    """The RTD pair of a `deberta_ds.train` checkpoint: a step folder, its checkpoints/ folder or the
    run's output_dir (its newest complete step), every file checked against its recorded hash."""
    folder = complete_step_folder(folder)
    verify(folder)
    state = read_state(folder, with_model=True)
    if state.get("tp", 1) > 1:
        return _merged_tp_pair(state["rtd_config"], folder, state["tp"])
    model = ReplacedTokenDetection(rtd_config_from_dict(state["rtd_config"]))
    train = state["run_config"].get("train")
    if not isinstance(train, dict) or not {"zero_stage", "precision"} <= set(train):
        raise CheckpointError(f"{folder / STATE}: damaged, its run_config records no train.zero_stage and "
                              "train.precision (needed to read the engines' files)")
    sharded = is_sharded(train["zero_stage"], train["precision"])
    weights = {}
    for engine in state["engines"]:
        prefix = "" if engine == "joint" else f"{engine}."
        weights |= {prefix + key: value for key, value in _deepspeed_engine_state(folder, engine, sharded).items()}
    load_strict(model, weights, str(folder))
    return model


def checkpoint_vocab_size(path: str | Path) -> int:
    """The vocabulary rows of a checkpoint `init_from` may name (HF, native or training), read
    from its config alone."""
    path = Path(path)
    if (path / "config.json").is_file():
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    if is_training_checkpoint(path):
        state = read_state(complete_step_folder(path), with_model=True)
        return int(state["rtd_config"]["discriminator"]["vocab_size"])
    meta_path = path / NATIVE_CONFIG
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: neither a Hugging Face checkpoint (config.json) nor a deberta_ds checkpoint "
                              f"({NATIVE_CONFIG}) nor a training run's output_dir")
    config = json.loads(meta_path.read_text())["config"]
    return int(config["discriminator"]["vocab_size"] if "discriminator" in config else config["vocab_size"])


def load_native(checkpoint_dir: str | Path) -> Encoder | ReplacedTokenDetection:
    """A native checkpoint directory (whole or split-tp) or a training checkpoint, at TP = 1."""
    checkpoint_dir = Path(checkpoint_dir)
    if is_training_checkpoint(checkpoint_dir):
        return load_training_checkpoint(checkpoint_dir)
    meta_path = checkpoint_dir / NATIVE_CONFIG
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found; --checkpoint must name a deberta_ds checkpoint directory "
                              f"(holding {NATIVE_CONFIG} and {WEIGHTS}) or a training run's output_dir or "
                              "checkpoint step folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("tp", 1) > 1:
        return _merged_tp_pair(meta["config"], checkpoint_dir, meta["tp"])
    if meta.get("kind") == "rtd":
        model = ReplacedTokenDetection(rtd_config_from_dict(meta["config"]))
    elif meta.get("kind") == "encoder":
        model = Encoder(model_config_from_dict(meta["config"]))
    else:
        raise CheckpointError(f"{meta_path}: 'kind' must be 'encoder' or 'rtd', got {meta.get('kind')!r}")
    load_strict(model, load_file(str(checkpoint_dir / WEIGHTS)), str(checkpoint_dir / WEIGHTS))
    return model
