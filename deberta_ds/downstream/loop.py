"""The fine-tuning loop every downstream task shares (and `deberta_ds.finetune`): pre-tokenised
features, AdamW with linear warm-up and decay, gradient clipping at 1.0, bf16 autocast on GPUs
as in pre-training, optional torch.compile, and data parallelism over the processes of a
`torchrun` / `deepspeed` launch (each global batch split over the ranks, gradients averaged by
DistributedDataParallel; predictions sharded and gathered in order)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from deberta_ds.errors import UserError, require

IGNORE = -100  # label of positions that carry no loss (padding, later sub-tokens)
LOG_EVERY = 10  # training steps per TensorBoard point of the loss and learning rate


@dataclass
class Recipe:
    epochs: int = 3
    batch_size: int = 32          # global: split over the data-parallel ranks
    lr: float = 2e-5
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 128
    seed: int = 42
    precision: str = "auto"       # auto: bf16 on GPUs, fp32 on CPUs (as pre-training)
    compile: bool = False         # torch.compile the model

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length"):
            require(type(getattr(self, name)) is int and getattr(self, name) >= 1, f"--{name.replace('_', '-')}",
                    f"must be an integer >= 1, got {getattr(self, name)}")
        require(math.isfinite(self.lr) and self.lr > 0, "--lr", f"must be a finite number > 0, got {self.lr}")
        require(0 <= self.warmup_ratio <= 1, "--warmup-ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay",
                f"must be a finite number >= 0, got {self.weight_decay}")
        require(self.precision in ("auto", "fp32", "bf16"), "--precision", f"{self.precision!r} is not auto, fp32 or "
                                                                            "bf16")


@dataclass
class Placement:
    """Where this process computes: its device, and its rank among the data-parallel processes."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> Placement:
        """One process, or one rank of a torchrun / deepspeed launch (WORLD_SIZE > 1: gloo on CPUs,
        NCCL on GPUs, each rank on its LOCAL_RANK's GPU)."""
        cuda = torch.cuda.is_available()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(device, dist.get_rank() if world > 1 else 0, world)

    def bf16(self, recipe: Recipe) -> bool:
        if recipe.precision == "bf16" and self.device.type != "cuda":
            raise UserError("--precision bf16: needs a GPU (CPU autocast would run in bf16 only partly); use fp32")
        return recipe.precision == "bf16" or (recipe.precision == "auto" and self.device.type == "cuda")

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (this rank's alone without a launch)."""
        if self.world == 1:
            return items
        everyone = [None] * self.world
        dist.all_gather_object(everyone, items)
        return [item for part in everyone for item in part]


def pad_features(features: list[dict], pad_id: int) -> dict:
    """A batch [B, L] of features (dicts of token lists and scalars): token lists padded to the
    longest (input_ids with pad_id, token labels with IGNORE, the rest with 0)."""
    batch = {}
    for key, first in features[0].items():
        values = [feature[key] for feature in features]
        if isinstance(first, list):
            fill = pad_id if key == "input_ids" else IGNORE if key == "labels" else 0
            length = max(len(value) for value in values)
            values = [value + [fill] * (length - len(value)) for value in values]
        batch[key] = torch.tensor(values)
    return batch


def optimizer_and_schedule(model: torch.nn.Module, recipe: Recipe, steps: int):
    """AdamW without decay on biases and LayerNorms; linear warm-up, then linear decay to 0."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    warmup = int(recipe.warmup_ratio * steps)

    def factor(step: int) -> float:
        return (step + 1) / max(1, warmup) if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def global_batches(count: int, recipe: Recipe, epoch: int, world: int) -> list[np.ndarray]:
    """The epoch's shuffled global batches of feature indices (the same on every rank); a last
    batch too small to give every rank a feature is left out."""
    order = np.random.default_rng([recipe.seed, epoch]).permutation(count)
    chunks = [order[start:start + recipe.batch_size] for start in range(0, count, recipe.batch_size)]
    return [chunk for chunk in chunks if len(chunk) >= world]


def fit(model: torch.nn.Module, features: list[dict], pad_id: int, recipe: Recipe, placement: Placement,
        scalars, on_epoch: Callable[[int, int], None], show_progress: bool = True, desc: str = "finetune") -> None:
    """Train `model` (moved to the placement's device) for recipe.epochs over `features`;
    on_epoch(epoch, step) after each epoch (evaluation, saving); the loss and learning rate to
    `scalars` (a ScalarLog) every LOG_EVERY steps."""
    model.to(placement.device).train()
    trained = model
    if placement.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[placement.device.index] if placement.device.type == "cuda" else None)
    if recipe.compile:
        trained = torch.compile(trained)
    steps = recipe.epochs * len(global_batches(len(features), recipe, 0, placement.world))
    require(steps > 0, "--batch-size", f"{len(features)} training features make no batch for {placement.world} ranks")
    optimizer, schedule = optimizer_and_schedule(model, recipe, steps)
    bf16, step, losses = placement.bf16(recipe), 0, []
    progress = tqdm(total=steps, desc=desc, dynamic_ncols=True, disable=not show_progress or placement.rank != 0)
    for epoch in range(1, recipe.epochs + 1):
        for chunk in global_batches(len(features), recipe, epoch, placement.world):
            batch = pad_features([features[i] for i in chunk[placement.rank::placement.world]], pad_id)
            with torch.autocast(placement.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = trained(**{k: v.to(placement.device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % LOG_EVERY == 0 or step == steps:  # the mean since the previous log step
                scalars.write({"finetune/loss": float(np.mean(losses)), "finetune/lr": schedule.get_last_lr()[0]},
                              step)
                losses = []
        on_epoch(epoch, step)
    progress.close()


@torch.no_grad()
def predict(model: torch.nn.Module, features: list[dict], pad_id: int, batch_size: int, placement: Placement,
            bf16: bool, outputs: tuple[str, ...], token_level: bool) -> list[dict]:
    """Each feature's model outputs (float32 numpy; token-level ones cut to its length), in
    feature order. Ranks predict every world-th feature and gather."""
    model.to(placement.device).eval()
    mine = list(range(placement.rank, len(features), placement.world))
    results = []
    for start in range(0, len(mine), batch_size):
        chosen = mine[start:start + batch_size]
        batch = pad_features([{"input_ids": features[i]["input_ids"], "attention_mask": features[i]["attention_mask"]}
                              for i in chosen], pad_id)
        with torch.autocast(placement.device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(**{k: v.to(placement.device) for k, v in batch.items()})
        arrays = {name: getattr(output, name).float().cpu().numpy() for name in outputs}
        for row, index in enumerate(chosen):
            length = len(features[index]["input_ids"])
            results.append((index, {name: value[row, :length] if token_level else value[row]
                                    for name, value in arrays.items()}))
    model.train()
    return [output for _, output in sorted(placement.gather(results), key=lambda pair: pair[0])]
