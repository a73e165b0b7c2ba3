"""Megatron-style tensor-parallel layers; at TP = 1 each is exactly nn.Linear / nn.Embedding.

Each parameter carries `partition_dim` (the dimension split across TP ranks, or None when it is
replicated) and `tensor_model_parallel` (what DeepSpeed reads to count replicated parameters
once in the gradient norm). Initialisation draws the FULL weight from the global RNG and keeps
this rank's slice, so a model is initialised identically whatever the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deberta_ds.parallel import state
from deberta_ds.parallel.mappings import all_reduce_no_grad, copy_to_tp, reduce_from_tp


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Rows of a vocabulary-parallel table: the vocabulary itself at TP = 1, else padded to a
    multiple of 128 x TP so every rank holds an equal, aligned range."""
    if tp_size == 1:
        return vocab_size
    multiple = 128 * tp_size
    return -(-vocab_size // multiple) * multiple


def mark_partitioned(param: nn.Parameter, dim: int | None, vocab_parallel: bool = False) -> nn.Parameter:
    param.partition_dim = dim
    param.vocab_parallel = vocab_parallel
    param.tensor_model_parallel = dim is not None and state.tp_size() > 1
    return param


def init_partitioned_(param: nn.Parameter, full_shape, std: float) -> None:
    """N(0, std) drawn for the full tensor, this rank's slice kept (identical init at any TP)."""
    full = torch.empty(full_shape, dtype=param.dtype).normal_(std=std)
    dim = getattr(param, "partition_dim", None)
    local = full if dim is None or state.tp_size() == 1 else full.chunk(state.tp_size(), dim=dim)[state.tp_rank()]
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

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        if out_features % state.tp_size():
            raise ValueError(f"{out_features} output features are not divisible by the tensor-parallel size "
                             f"{state.tp_size()}")
        super().__init__(in_features, out_features // state.tp_size(), bias=bias)
        self.full_shape = (out_features, in_features)
        mark_partitioned(self.weight, 0)
        if bias:
            mark_partitioned(self.bias, 0)

    def forward(self, x):
        return F.linear(copy_to_tp(x), self.weight, self.bias)


class RowParallelLinear(_NoRandomInit, nn.Linear):
    """y = all-reduce(x_local W_local^T) + b; W split along the input dimension, b replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        if in_features % state.tp_size():
            raise ValueError(f"{in_features} input features are not divisible by the tensor-parallel size "
                             f"{state.tp_size()}")
        super().__init__(in_features // state.tp_size(), out_features, bias=bias)
        self.full_shape = (out_features, in_features)
        mark_partitioned(self.weight, 1)
        if bias:
            mark_partitioned(self.bias, None)

    def forward(self, x):
        out = reduce_from_tp(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def vocab_range(vocab_rows: int) -> tuple[int, int]:
    """[start, end) of this rank's rows of a vocabulary-parallel table with `vocab_rows` rows in all."""
    per_rank = vocab_rows // state.tp_size()
    return state.tp_rank() * per_rank, (state.tp_rank() + 1) * per_rank


def parallel_embedding(input_ids: torch.Tensor, local_weight: torch.Tensor, padding_idx: int | None = None):
    """Look ids up in a vocabulary-split table: each rank fills the ids in its range, then all-reduce."""
    if state.tp_size() == 1:
        return F.embedding(input_ids, local_weight, padding_idx=padding_idx)
    start = state.tp_rank() * local_weight.shape[0]
    outside = (input_ids < start) | (input_ids >= start + local_weight.shape[0])
    local_ids = (input_ids - start).masked_fill(outside, 0)
    holds_padding = padding_idx is not None and start <= padding_idx < start + local_weight.shape[0]
    local_padding = padding_idx - start if holds_padding else None
    embedded = F.embedding(local_ids, local_weight, padding_idx=local_padding)
    return reduce_from_tp(embedded.masked_fill(outside.unsqueeze(-1), 0.0))


class VocabParallelEmbedding(_NoRandomInit, nn.Embedding):
    """Contiguous vocabulary ranges per rank (vocabulary padded to a multiple of 128 x TP)."""

    def __init__(self, vocab_size: int, hidden: int, padding_idx: int | None = None):
        rows = padded_vocab_size(vocab_size, state.tp_size())
        start, end = vocab_range(rows)
        local_padding = padding_idx - start if padding_idx is not None and start <= padding_idx < end else None
        super().__init__(rows // state.tp_size(), hidden, padding_idx=local_padding)
        self.global_padding_idx = padding_idx
        self.full_shape = (rows, hidden)
        mark_partitioned(self.weight, 0, vocab_parallel=True)

    def forward(self, input_ids):
        return parallel_embedding(input_ids, self.weight, self.global_padding_idx)


def _masked_local_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits with the padding columns (ids >= vocab_size) at -inf."""
    logits = local_logits.float()
    start = state.tp_rank() * local_logits.shape[-1]
    if start + local_logits.shape[-1] > vocab_size:
        columns = torch.arange(start, start + local_logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
    return logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, vocab_size):
        logits = _masked_local_logits(local_logits, vocab_size)                 # [M, V/tp]
        row_max = all_reduce_no_grad(logits.max(-1).values, dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp()
        sum_exp = all_reduce_no_grad(exp.sum(-1))
        start = state.tp_rank() * local_logits.shape[-1]
        local_target = target - start
        here = (local_target >= 0) & (local_target < local_logits.shape[-1])
        target_logit = torch.where(here, logits.gather(-1, local_target.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
                                   - row_max, torch.zeros_like(row_max))
        target_logit = all_reduce_no_grad(target_logit)
        ctx.save_for_backward(exp / sum_exp[:, None], here, local_target)
        ctx.input_dtype = local_logits.dtype
        return sum_exp.log() - target_logit                                     # [M]

    @staticmethod
    def backward(ctx, grad):
        softmax, here, local_target = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.nonzero(here)[:, 0]
        grad_logits[rows, local_target[rows]] -= 1.0
        return (grad_logits * grad[:, None]).to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, vocab_size: int):
    """Per-row cross-entropy of vocabulary-split logits [M, V/tp]; no rank holds the full logits."""
    if state.tp_size() == 1:
        return F.cross_entropy(local_logits[:, :vocab_size].float(), target, reduction="none")
    return _VocabParallelCrossEntropy.apply(local_logits, target, vocab_size)


@torch.no_grad()
def vocab_parallel_argmax(local_scores: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Global argmax over vocabulary-split scores [M, V/tp]; ties go to the lowest id, as torch.argmax."""
    scores = _masked_local_logits(local_scores, vocab_size)
    if state.tp_size() == 1:
        return scores.argmax(-1)
    values, indices = scores.max(-1)
    indices = indices + state.tp_rank() * local_scores.shape[-1]
    gathered = [torch.empty(2, *values.shape, dtype=torch.float64, device=values.device)
                for _ in range(state.tp_size())]
    dist.all_gather(gathered, torch.stack([values.double(), indices.double()]), group=state.get().tp_group)
    stacked = torch.stack(gathered)                                            # [tp, 2, M]
    best_rank = stacked[:, 0].argmax(0)                                        # first rank with the max value
    return stacked[best_rank, 1, torch.arange(values.shape[0], device=values.device)].long()
