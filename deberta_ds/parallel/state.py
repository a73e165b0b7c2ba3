"""Tensor x data parallel process groups (TP ranks adjacent: rank = tp_rank + dp_rank * TP).

At TP = 1 (the default, also when torch.distributed is not initialised) every query answers
as for a single rank, so the model code never branches on whether TP is on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: object = None
    dp_group: object = None


_STATE = ParallelState()


def initialize(tp_size: int) -> ParallelState:
    """Create the TP and DP groups over the whole world; every rank must call it."""
    global _STATE
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"train.tp: the world size {world} is not divisible by the tensor-parallel size {tp_size}")
    state = ParallelState(tp_size=tp_size, tp_rank=rank % tp_size, dp_size=world // tp_size, dp_rank=rank // tp_size)
    if tp_size == 1:  # data parallel only: the default group is the data-parallel group
        _STATE = state
        return state
    for dp_rank in range(world // tp_size):  # every rank creates every group, in the same order
        ranks = list(range(dp_rank * tp_size, (dp_rank + 1) * tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            state.tp_group = group
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            state.dp_group = group
    _STATE = state
    return state


@contextlib.contextmanager
def single_rank():
    """Build full (TP = 1) modules inside a TP job, e.g. to load a checkpoint before splitting it."""
    global _STATE
    saved, _STATE = _STATE, ParallelState()
    try:
        yield
    finally:
        _STATE = saved


def reset() -> None:
    global _STATE
    _STATE = ParallelState()


def get() -> ParallelState:
    return _STATE


def tp_size() -> int:
    return _STATE.tp_size


def tp_rank() -> int:
    return _STATE.tp_rank


class MPU:
    """What `deepspeed.initialize(mpu=...)` asks for: ZeRO shards over the data-parallel group
    and the gradient norm is reduced over the model-parallel group."""

    def get_model_parallel_rank(self):
        return _STATE.tp_rank

    def get_model_parallel_world_size(self):
        return _STATE.tp_size

    def get_model_parallel_group(self):
        return _STATE.tp_group

    def get_data_parallel_rank(self):
        return _STATE.dp_rank

    def get_data_parallel_world_size(self):
        return _STATE.dp_size

    def get_data_parallel_group(self):
        return _STATE.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
