"""The tensor-parallel collectives, each an autograd function over the given TP group
(no-ops at TP = 1).

copy_to_tp:     identity forward, all-reduce backward  (a replicated input enters a TP region)
reduce_from_tp: all-reduce forward, identity backward  (partial sums leave a TP region)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deberta_ds.parallel.state import TensorParallel


def _all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def all_reduce_no_grad(x: torch.Tensor, tp: TensorParallel, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A plain all-reduce over the TP group for values that carry no gradient (max, counts)."""
    if tp.size > 1:
        dist.all_reduce(x, op=op, group=tp.group)
    return x
