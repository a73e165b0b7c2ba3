"""Megatron-style tensor-parallel layers; at TP = 1 each is exactly nn.Linear / nn.Embedding.

Every layer and function takes the `TensorParallel` group it works in (default: TP = 1). Each
parameter carries `partition_dim` (the dimension split across TP ranks, or None when it is
replicated) and `tensor_model_parallel` (what DeepSpeed reads to count replicated parameters
once in the gradient norm). Initialisation draws the FULL weight from the global RNG and keeps
this rank's slice, so a model is initialised identically whatever the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deberta_ds.errors import UserError
from deberta_ds.parallel.mappings import all_reduce_no_grad, copy_to_tp, reduce_from_tp
from deberta_ds.parallel.state import TensorParallel

SINGLE = TensorParallel()  # TP = 1


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Rows of a vocabulary-parallel table: the vocabulary itself at TP = 1, else padded to a
    multiple of 128 x TP so every rank holds an equal, aligned range."""
    if tp_size == 1:
        return vocab_size
    multiple = 128 * tp_size
    return -(-vocab_size // multiple) * multiple


def mark_partitioned(param: nn.Parameter, dim: int | None, tp: TensorParallel,
                     vocab_parallel: bool = False) -> nn.Parameter:
    param.partition_dim = dim
    param.vocab_parallel = vocab_parallel
    param.tensor_model_parallel = dim is not None and tp.size > 1
    return param


def init_partitioned_(param: nn.Parameter, full_shape, std: float, tp: TensorParallel) -> None:
    """N(0, std) drawn for the full tensor, this rank's slice kept (identical init at any TP)."""
    full = torch.empty(full_shape, dtype=param.dtype).normal_(std=std)
    dim = getattr(param, "partition_dim", None)
    local = full if dim is None or tp.size == 1 else full.chunk(tp.size, dim=dim)[tp.rank]
    with torch.no_grad():
        param.copy_(local)


class _NoRandomInit:
    """Constructors draw nothing from the RNG (the local shape differs with TP); `init_weights`
    then draws every full weight, so the random stream is the same at any TP size."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            if getattr(self, "bias", None) is not None:
                self.bias.zero_()


class ColumnParallelLinear(_NoRandomInit, nn.Linear):
    """y_local = x W_local^T + b_local; W split along the output dimension (whole heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp: TensorParallel = SINGLE):
        if out_features % tp.size:
            raise UserError(f"{out_features} output features are not divisible by the tensor-parallel size "
                             f"{tp.size}")
        super().__init__(in_features, out_features // tp.size, bias=bias)
        self.tp, self.full_shape = tp, (out_features, in_features)
        mark_partitioned(self.weight, 0, tp)
        if bias:
            mark_partitioned(self.bias, 0, tp)

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)


class RowParallelLinear(_NoRandomInit, nn.Linear):
    """y = all-reduce(x_local W_local^T) + b; W split along the input dimension, b replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp: TensorParallel = SINGLE):
        if in_features % tp.size:
            raise UserError(f"{in_features} input features are not divisible by the tensor-parallel size "
                             f"{tp.size}")
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp, self.full_shape = tp, (out_features, in_features)
        mark_partitioned(self.weight, 1, tp)
        if bias:
            mark_partitioned(self.bias, None, tp)

    def forward(self, x):
        out = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return out if self.bias is None else out + self.bias


def vocab_range(vocab_rows: int, tp: TensorParallel) -> tuple[int, int]:
    """[start, end) of this rank's rows of a vocabulary-parallel table with `vocab_rows` rows in all."""
    per_rank = vocab_rows // tp.size
    return tp.rank * per_rank, (tp.rank + 1) * per_rank


def parallel_embedding(input_ids: torch.Tensor, local_weight: torch.Tensor, padding_idx: int | None,
                       tp: TensorParallel):
    """Look ids up in a vocabulary-split table: each rank fills the ids in its range, then all-reduce."""
    if tp.size == 1:
        return F.embedding(input_ids, local_weight, padding_idx=padding_idx)
    start = tp.rank * local_weight.shape[0]
    outside = (input_ids < start) | (input_ids >= start + local_weight.shape[0])
    local_ids = (input_ids - start).masked_fill(outside, 0)
    holds_padding = padding_idx is not None and start <= padding_idx < start + local_weight.shape[0]
    local_padding = padding_idx - start if holds_padding else None
    embedded = F.embedding(local_ids, local_weight, padding_idx=local_padding)
    return reduce_from_tp(embedded.masked_fill(outside.unsqueeze(-1), 0.0), tp)


class VocabParallelEmbedding(_NoRandomInit, nn.Embedding):
    """Contiguous vocabulary ranges per rank (vocabulary padded to a multiple of 128 x TP)."""

    def __init__(self, vocab_size: int, hidden: int, padding_idx: int | None = None, tp: TensorParallel = SINGLE):
        rows = padded_vocab_size(vocab_size, tp.size)
        start, end = vocab_range(rows, tp)
        local_padding = padding_idx - start if padding_idx is not None and start <= padding_idx < end else None
        super().__init__(rows // tp.size, hidden, padding_idx=local_padding)
        self.tp, self.global_padding_idx = tp, padding_idx
        self.full_shape = (rows, hidden)
        mark_partitioned(self.weight, 0, tp, vocab_parallel=True)

    def forward(self, input_ids):
        return parallel_embedding(input_ids, self.weight, self.global_padding_idx, self.tp)


def _masked_local_logits(local_logits: torch.Tensor, vocab_size: int, tp: TensorParallel) -> torch.Tensor:
    """fp32 logits with the padding columns (ids >= vocab_size) at -inf."""
    logits = local_logits.float()
    start = tp.rank * local_logits.shape[-1]
    if start + local_logits.shape[-1] > vocab_size:
        columns = torch.arange(start, start + local_logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
    return logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, vocab_size, tp):
        logits = _masked_local_logits(local_logits, vocab_size, tp)             # [M, V/tp]
        row_max = all_reduce_no_grad(logits.max(-1).values, tp, dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp()
        sum_exp = all_reduce_no_grad(exp.sum(-1), tp)
        start = tp.rank * local_logits.shape[-1]
        local_target = target - start
        here = (local_target >= 0) & (local_target < local_logits.shape[-1])
        target_logit = torch.where(here, logits.gather(-1, local_target.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
                                   - row_max, torch.zeros_like(row_max))
        target_logit = all_reduce_no_grad(target_logit, tp)
        ctx.save_for_backward(exp / sum_exp[:, None], here, local_target)
        ctx.input_dtype = local_logits.dtype
        return sum_exp.log() - target_logit                                     # [M]

    @staticmethod
    def backward(ctx, grad):
        softmax, here, local_target = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.nonzero(here)[:, 0]
        grad_logits[rows, local_target[rows]] -= 1.0
        return (grad_logits * grad[:, None]).to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 tp: TensorParallel):
    """Per-row cross-entropy of vocabulary-split logits [M, V/tp]; no rank holds the full logits."""
    if tp.size == 1:
        return F.cross_entropy(local_logits[:, :vocab_size].float(), target, reduction="none")
    return _VocabParallelCrossEntropy.apply(local_logits, target, vocab_size, tp)


@torch.no_grad()
def vocab_parallel_argmax(local_scores: torch.Tensor, vocab_size: int, tp: TensorParallel) -> torch.Tensor:
    """Global argmax over vocabulary-split scores [M, V/tp]; ties go to the lowest id, as torch.argmax."""
    scores = _masked_local_logits(local_scores, vocab_size, tp)
    if tp.size == 1:
        return scores.argmax(-1)
    values, indices = scores.max(-1)
    indices = indices + tp.rank * local_scores.shape[-1]
    gathered = [torch.empty(2, *values.shape, dtype=torch.float64, device=values.device) for _ in range(tp.size)]
    dist.all_gather(gathered, torch.stack([values.double(), indices.double()]), group=tp.group)
    stacked = torch.stack(gathered)                                            # [tp, 2, M]
    best_rank = stacked[:, 0].argmax(0)                                        # first rank with the max value
    return stacked[best_rank, 1, torch.arange(values.shape[0], device=values.device)].long()
