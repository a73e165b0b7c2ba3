"""The tensor-parallel collectives, each an autograd function (no-ops at TP = 1).

copy_to_tp:     identity forward, all-reduce backward  (a replicated input enters a TP region)
reduce_from_tp: all-reduce forward, identity backward  (partial sums leave a TP region)
gather_from_tp: all-gather the last dim forward, keep the local slice backward
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deberta_ds.parallel import state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if state.tp_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=state.get().tp_group)
    return x


def _local_slice(x: torch.Tensor) -> torch.Tensor:
    if state.tp_size() == 1:
        return x
    return x.chunk(state.tp_size(), dim=-1)[state.tp_rank()].contiguous()


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    if state.tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.tp_size())]
    dist.all_gather(parts, x.contiguous(), group=state.get().tp_group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    return x if state.tp_size() == 1 else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if state.tp_size() == 1 else _ReduceFromTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if state.tp_size() == 1 else _GatherFromTP.apply(x)


def all_reduce_no_grad(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A plain all-reduce over the TP group for values that carry no gradient (max, counts)."""
    if state.tp_size() == 1:
        return x
    dist.all_reduce(x, op=op, group=state.get().tp_group)
    return x
