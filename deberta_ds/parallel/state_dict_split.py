"""Splitting full (TP = 1) weights into TP shards and merging shards back, by each parameter's
`partition_dim` (None: replicated) and `vocab_parallel` flag (rows padded to 128 x TP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deberta_ds.parallel.layers import padded_vocab_size


def partition_plan(model: nn.Module) -> dict[str, tuple[int | None, bool]]:
    """{parameter name: (partition dim or None, vocabulary-parallel)} of a model (any TP size)."""
    return {name: (getattr(p, "partition_dim", None), getattr(p, "vocab_parallel", False))
            for name, p in model.named_parameters()}


def split_state(full: dict, plan: dict, vocab_size: int, tp_size: int, tp_rank: int) -> dict:
    shards = {}
    for name, tensor in full.items():
        dim, vocab = plan.get(name, (None, False))
        if dim is None or tp_size == 1:
            shards[name] = tensor
            continue
        if vocab:  # pad the vocabulary rows so every rank holds an equal range
            extra = padded_vocab_size(vocab_size, tp_size) - tensor.shape[0]
            tensor = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, extra))
        shards[name] = tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return shards


def merge_states(shards: list[dict], plan: dict, vocab_size: int) -> dict:
    merged = {}
    for name, tensor in shards[0].items():
        dim, vocab = plan.get(name, (None, False))
        if dim is None or len(shards) == 1:
            merged[name] = tensor
            continue
        full = torch.cat([shard[name] for shard in shards], dim=dim)
        merged[name] = full[:vocab_size] if vocab else full
    return merged
