"""deberta_ds's own checkpoints: save and load them, read a training run's checkpoint, split for TP.

Native checkpoint directory: ``deberta_ds.json`` ({"kind": "encoder" | "rtd", "config": ...})
plus ``model.safetensors`` (or, after ``split_tp``, ``weights_tp{r}.safetensors`` and "tp": N).
Training checkpoints (a run's output_dir, its checkpoints/ folder or a step folder) load too, with
ZeRO shards consolidated by DeepSpeed's zero_to_fp32 and TP shards merged into TP = 1. Every file
is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deberta_ds.atomic_files import atomic_path, write_atomic
from deberta_ds.config import model_config_from_dict, rtd_config_from_dict, to_dict
from deberta_ds.errors import CheckpointError
from deberta_ds.model import Encoder, ReplacedTokenDetection
from deberta_ds.parallel.state_dict_split import merge_states, partition_plan, split_state
from deberta_ds.training import checkpoint as layout  # the one home of the training checkpoint layout

NATIVE_CONFIG = "deberta_ds.json"
WEIGHTS = "model.safetensors"


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


def atomic_save(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def atomic_write_json(data: dict, path: Path) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_native(model: Encoder | ReplacedTokenDetection, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "rtd" if isinstance(model, ReplacedTokenDetection) else "encoder"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save(state, out_dir / WEIGHTS)
    atomic_write_json({"kind": kind, "config": to_dict(model.config)}, out_dir / NATIVE_CONFIG)


def _merged_tp_pair(rtd_config: dict, folder: Path, tp_size: int) -> ReplacedTokenDetection:
    """The TP = 1 pair from `weights_tp{r}.safetensors`, r < tp_size (training or split-tp shards)."""
    model = ReplacedTokenDetection(rtd_config_from_dict(rtd_config))
    shards = [load_file(str(layout.tp_weights_file(folder, rank))) for rank in range(tp_size)]
    load_strict(model, merge_states(shards, partition_plan(model), model.config.discriminator.vocab_size),
                str(folder))
    return model


def _deepspeed_engine_state(folder: Path, engine: str, sharded: bool) -> dict:
    """Consolidated fp32 weights of one engine folder of a training checkpoint. Sharded
    (ZeRO 1-3, or bf16/fp16 master weights) checkpoints go through DeepSpeed's zero_to_fp32."""
    from deberta_ds.training.safe_load import weights_only_loads

    with weights_only_loads():  # DeepSpeed's files are pickles: nothing in them may run
        if sharded:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=engine)
        states = torch.load(folder / engine / "mp_rank_00_model_states.pt", map_location="cpu")
    return {key: value.float() for key, value in states["module"].items()}


def recorded_tokenizer(checkpoint_dir: str | Path) -> tuple[str, str] | None:
    """(tokenizer path, its sha256) a training checkpoint was trained with; None for other checkpoints."""
    if not layout.is_training_checkpoint(Path(checkpoint_dir)):
        return None
    state = layout.read_state(layout.complete_step_folder(checkpoint_dir))
    return state["run_config"]["data"]["tokenizer"], state["tokenizer"]["sha256"]


def load_training_checkpoint(folder: str | Path) -> ReplacedTokenDetection:
    """The RTD pair of a `deberta_ds.train` checkpoint: a step folder, its checkpoints/ folder or the
    run's output_dir (its newest complete step), every file checked against its recorded hash."""
    folder = layout.complete_step_folder(folder)
    layout.verify(folder)
    state = layout.read_state(folder)
    if state.get("tp", 1) > 1:
        return _merged_tp_pair(state["rtd_config"], folder, state["tp"])
    model = ReplacedTokenDetection(rtd_config_from_dict(state["rtd_config"]))
    train = state["run_config"]["train"]
    sharded = layout.is_sharded(train["zero_stage"], train["precision"])
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
    if layout.is_training_checkpoint(path):
        state = layout.read_state(layout.complete_step_folder(path))
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
    if layout.is_training_checkpoint(checkpoint_dir):
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


def split_tp(checkpoint, out_dir, tp_size: int) -> Path:
    """A TP = 1 RTD pair (a module, or a native or training checkpoint) as `tp_size` shard files
    for continued training at that TP size."""
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else load_native(checkpoint)
    if not isinstance(model, ReplacedTokenDetection):
        raise CheckpointError("split-tp: the checkpoint must hold an RTD pair (use from-hf --rtd first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan, vocab = partition_plan(model), model.config.discriminator.vocab_size
    for rank in range(tp_size):
        shard = split_state(model.state_dict(), plan, vocab, tp_size, rank)
        atomic_save({k: v.contiguous() for k, v in shard.items()}, layout.tp_weights_file(out_dir, rank))
    atomic_write_json({"kind": "rtd", "config": to_dict(model.config), "tp": tp_size}, out_dir / NATIVE_CONFIG)
    return out_dir
