"""deberta_ds's own checkpoints written: a native checkpoint directory (``deberta_ds.json`` +
``model.safetensors``) and its TP split (``weights_tp{r}.safetensors``, "tp": N); their layout and
reading live in ``deberta_ds.checkpoint_reader``. Every file is written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deberta_ds.atomic_files import atomic_path, write_atomic
from deberta_ds.checkpoint_reader import NATIVE_CONFIG, WEIGHTS, load_native, tp_weights_file
from deberta_ds.config import to_dict
from deberta_ds.errors import CheckpointError, UserError, require
from deberta_ds.model import Encoder, ReplacedTokenDetection
from deberta_ds.parallel.state_dict_split import partition_plan, split_state


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


def split_tp(checkpoint, out_dir, tp_size: int) -> Path:
    """A TP = 1 RTD pair (a module, or a native or training checkpoint) as `tp_size` shard files
    for continued training at that TP size."""
    require(tp_size >= 2, "--tp", f"{tp_size}: split-tp writes 2 or more tensor-parallel shards")
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else load_native(checkpoint)
    if not isinstance(model, ReplacedTokenDetection):
        raise CheckpointError("split-tp: the checkpoint must hold an RTD pair (use from-hf --rtd first)")
    try:
        model.config.discriminator.check_tensor_parallel(tp_size)  # whole heads and FFN columns per rank
    except UserError as error:
        raise UserError(f"--tp {tp_size}: {error}; choose a TP size that divides both") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan, vocab = partition_plan(model), model.config.discriminator.vocab_size
    for rank in range(tp_size):
        shard = split_state(model.state_dict(), plan, vocab, tp_size, rank)
        atomic_save({k: v.contiguous() for k, v in shard.items()}, tp_weights_file(out_dir, rank))
    atomic_write_json({"kind": "rtd", "config": to_dict(model.config), "tp": tp_size}, out_dir / NATIVE_CONFIG)
    return out_dir
