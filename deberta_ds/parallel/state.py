"""Tensor x data parallel process groups (TP ranks adjacent: rank = tp_rank + dp_rank * TP).

Nothing here is global: `initialize` returns this rank's `ParallelState`, the trainer passes its
`tp` (a `TensorParallel`: the group and, at TP > 1, the RNG tracker of its dropout stream) to
the model it builds, and the parallel layers, collectives and TP-region dropout use the one
they were built with. `TensorParallel()` is TP = 1 and needs no process group and no tracker,
so code that builds a full model (conversion, tests) passes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from deberta_ds.errors import UserError
from deberta_ds.parallel.rng_tracker import RNGStatesTracker


@dataclass(frozen=True)
class TensorParallel:
    """This rank's tensor-parallel group, and at TP > 1 the tracker of its TP-rank-specific RNG
    stream (seeded by `parallel.random.seed_streams`). The tracker is state carried along, not
    part of the group's identity: equality and hash ignore it."""

    size: int = 1
    rank: int = 0
    group: object = None
    tracker: RNGStatesTracker | None = field(default=None, compare=False)


@dataclass
class ParallelState:
    tp: TensorParallel = field(default_factory=TensorParallel)
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: object = None


def initialize(tp_size: int) -> ParallelState:
    """Create the TP and DP groups over the whole world; every rank must call it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise UserError(f"train.tp: the world size {world} is not divisible by the tensor-parallel size {tp_size}")
    if tp_size == 1:  # data parallel only: the default group is the data-parallel group
        return ParallelState(dp_size=world, dp_rank=rank)
    tp_group = dp_group = None
    for dp_rank in range(world // tp_size):  # every rank creates every group, in the same order
        ranks = list(range(dp_rank * tp_size, (dp_rank + 1) * tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    tp = TensorParallel(tp_size, rank % tp_size, tp_group, RNGStatesTracker())
    return ParallelState(tp, world // tp_size, rank // tp_size, dp_group)


class MPU:
    """What `deepspeed.initialize(mpu=...)` asks for: ZeRO shards over the data-parallel group
    and the gradient norm is reduced over the model-parallel group."""

    def __init__(self, parallel: ParallelState):
        self.parallel = parallel

    def get_model_parallel_rank(self):
        return self.parallel.tp.rank

    def get_model_parallel_world_size(self):
        return self.parallel.tp.size

    def get_model_parallel_group(self):
        return self.parallel.tp.group

    def get_data_parallel_rank(self):
        return self.parallel.dp_rank

    def get_data_parallel_world_size(self):
        return self.parallel.dp_size

    def get_data_parallel_group(self):
        return self.parallel.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
