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


def _vocab_columns(local_width: int, vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """(first global id, real columns) of this rank's [., V/tp] block: the padding columns (ids >=
    vocab_size, only on the last ranks at TP > 1) are left out by slicing, never copied."""
    start = tp.rank * local_width
    return start, max(0, min(local_width, vocab_size - start))


def _global_argmax(values: torch.Tensor, indices: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Per row, the global id of the largest of every rank's (value [M], global id [M]); ties go
    to the lowest rank (the lowest id, as torch.argmax)."""
    gathered = [torch.empty(2, *values.shape, dtype=torch.float64, device=values.device) for _ in range(tp.size)]
    dist.all_gather(gathered, torch.stack([values.double(), indices.double()]), group=tp.group)
    stacked = torch.stack(gathered)                                            # [tp, 2, M]
    best_rank = stacked[:, 0].argmax(0)                                        # first rank with the max value
    return stacked[best_rank, 1, torch.arange(values.shape[0], device=values.device)].long()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Row cross-entropy of vocabulary-split logits [M, V/tp] at any TP size (TP = 1: the
    reductions are no-ops). Saves the logits as they came (bf16 in training) and the row's
    log-sum-exp [M], not an fp32 softmax: the backward recomputes it. Rows whose target is
    outside [0, V) (IGNORE_INDEX padding) get loss 0 and gradient 0."""

    @staticmethod
    def forward(ctx, local_logits, target, vocab_size, tp):
        start, width = _vocab_columns(local_logits.shape[-1], vocab_size, tp)
        logits = local_logits[:, :width]                                        # [M, V/tp] view
        row_max = all_reduce_no_grad(logits.amax(-1).float(), tp, dist.ReduceOp.MAX)        # [M]
        # bf16 - fp32 promotes to one fp32 temporary, exponentiated in place: no separate copy.
        sum_exp = all_reduce_no_grad(torch.sub(logits, row_max[:, None]).exp_().sum(-1), tp)
        lse = sum_exp.log() + row_max                                           # [M]
        local_target = target - start
        here = (local_target >= 0) & (local_target < width)                    # this rank holds the target
        picked = logits.gather(-1, local_target.clamp(0, max(width - 1, 0))[:, None])[:, 0].float()
        target_logit = all_reduce_no_grad(torch.where(here, picked, 0.0), tp)
        valid = (target >= 0) & (target < vocab_size)
        ctx.save_for_backward(local_logits, lse, here, local_target, valid)
        ctx.width = width
        return torch.where(valid, lse - target_logit, 0.0)                     # [M]

    @staticmethod
    def backward(ctx, grad):
        local_logits, lse, here, local_target, valid = ctx.saved_tensors
        scale = torch.where(valid, grad, 0.0)                                   # [M]
        width = ctx.width
        softmax = torch.sub(local_logits[:, :width], lse[:, None]).exp_()      # one fp32 [M, V/tp] buffer
        softmax.scatter_add_(-1, local_target.clamp(0, max(width - 1, 0))[:, None], -here.float()[:, None])
        if width == local_logits.shape[-1]:  # written straight in the logits' dtype
            return torch.mul(softmax, scale[:, None], out=torch.empty_like(local_logits)), None, None, None
        grad_logits = torch.zeros_like(local_logits)                            # padding columns: 0
        torch.mul(softmax, scale[:, None], out=grad_logits[:, :width])
        return grad_logits, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 tp: TensorParallel):
    """Per-row cross-entropy of vocabulary-split logits [M, V/tp]; no rank holds the full logits;
    rows with target IGNORE_INDEX (padding) give 0."""
    return _VocabParallelCrossEntropy.apply(local_logits, target, vocab_size, tp)


@torch.no_grad()
def vocab_parallel_argmax(local_scores: torch.Tensor, vocab_size: int, tp: TensorParallel) -> torch.Tensor:
    """Global argmax over vocabulary-split scores [M, V/tp] (read as they are: argmax is exact in
    bf16); ties go to the lowest id, as torch.argmax."""
    start, width = _vocab_columns(local_scores.shape[-1], vocab_size, tp)
    if tp.size == 1:
        return local_scores[:, :width].argmax(-1)
    if width == 0:  # only padding columns here
        values = torch.full(local_scores.shape[:1], float("-inf"), device=local_scores.device)
        return _global_argmax(values, torch.zeros_like(values, dtype=torch.long), tp)
    values, indices = local_scores[:, :width].max(-1)
    return _global_argmax(values, indices + start, tp)


@torch.no_grad()
def vocab_parallel_gumbel_max(local_logits: torch.Tensor, vocab_size: int, temperature: float, tp: TensorParallel,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of softmax(logits / T) [M, V/tp] -> global ids [M] (Gumbel-max).

    argmax(l / T + G) with G = -log(E), E ~ Exp(1), is argmin(log(E) - l / T). E is drawn in place
    for the whole vocabulary [M, V] on every rank from the same stream and each rank keeps its
    columns, so every TP size gives exactly the samples of TP = 1. One fp32 [M, V] buffer: drawn,
    log_ and sub_ in place, then read by argmin; the logits are read once, in their own dtype.
    """
    start, width = _vocab_columns(local_logits.shape[-1], vocab_size, tp)
    noise = torch.empty((local_logits.shape[0], vocab_size), device=local_logits.device).exponential_(
        generator=generator)                                                     # [M, V]
    mine = noise[:, start:start + width].log_().sub_(local_logits[:, :width], alpha=1.0 / temperature)
    if tp.size == 1:
        return mine.argmin(-1)
    if width == 0:
        values = torch.full(local_logits.shape[:1], float("-inf"), device=local_logits.device)
        return _global_argmax(values, torch.zeros_like(values, dtype=torch.long), tp)
    values, indices = mine.min(-1)
    return _global_argmax(-values, indices + start, tp)
