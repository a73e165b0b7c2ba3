"""Log-bucketed relative positions of DeBERTaV2/V3.

Clamping decision for sequences longer than ``max_relative_positions`` (documented in
README): the published DeBERTa code clamps the distance to +/-(max_relative_positions - 1)
before bucketing, Hugging Face does not. The two differ only for |i - j| >= max_relative_positions
on the negative side (HF's bucket falls below -k and the slot clamps to 0; the published code
stops at slot 1). We follow Hugging Face so that an exported model behaves identically in
``transformers``; ``tests/test_attention_reference.py`` (slots at L = 700) and
``tests/test_hf_parity.py`` (HF parity at L = 513 and 700) pin this.
"""

from __future__ import annotations

import functools

import torch


def log_bucket(relative: torch.Tensor, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    """Bucket of each relative distance r = i - j; odd in r, exact for |r| <= buckets // 2.

    The arithmetic is float32, as in HF, so rounding at bucket boundaries coincides.
    """
    mid = position_buckets // 2
    sign = torch.sign(relative)
    # |r| < mid never reaches the log branch; substituting mid - 1 keeps log() finite.
    abs_pos = torch.where(relative.abs() < mid, mid - 1, relative.abs())  # a Python scalar: no host->device copy
    log_ratio = torch.log(abs_pos / mid) / torch.log(torch.tensor((max_relative_positions - 1) / mid))
    log_pos = torch.ceil(log_ratio * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative.to(log_pos.dtype), log_pos * sign).long()


def slots_of_distances(relative: torch.Tensor, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    """clamp(bucket(r) + k, 0, 2k - 1): the relative table's row for each distance r (int64, r's shape)."""
    slots = log_bucket(relative, position_buckets, max_relative_positions) + position_buckets
    return slots.clamp(0, 2 * position_buckets - 1)


def slots_of_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, position_buckets: int,
                       max_relative_positions: int) -> torch.Tensor:
    """clamp(bucket(i - j) + k, 0, 2k - 1) for positions i [Lq] and j [Lk]: int64 [Lq, Lk]."""
    relative = query_positions[:, None] - key_positions[None, :]
    return slots_of_distances(relative, position_buckets, max_relative_positions)


@functools.lru_cache(maxsize=64)
def _slot_table(query_len: int, key_len: int, position_buckets: int, max_relative_positions: int,
                device: torch.device) -> torch.Tensor:
    return slots_of_positions(torch.arange(query_len, device=device), torch.arange(key_len, device=device),
                              position_buckets, max_relative_positions)


@functools.lru_cache(maxsize=64)
@torch.compiler.assume_constant_result  # of plain ints: a compiled graph keeps the value (no break)
def reachable_slots(seq_len: int, position_buckets: int, max_relative_positions: int) -> tuple[int, int]:
    """(first, last): the relative-table rows an [L, L] attention reaches, the slots of distances
    -(L - 1) and L - 1 (slots grow with i - j). Computed on the host from L alone, so reading it
    never waits for a device."""
    ends = torch.tensor([0, seq_len - 1])
    slots = slots_of_positions(ends, ends, position_buckets, max_relative_positions)  # [2, 2] on the CPU
    return int(slots[0, 1]), int(slots[1, 0])


def relative_slots(query_len: int, key_len: int, position_buckets: int, max_relative_positions: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """idx[i, j] = clamp(bucket(i - j) + k, 0, 2k - 1): the row of the relative table for (i, j).

    Returns int64 [query_len, key_len], built once per shape and device (every layer of every
    step reuses it: no rebuild, no host-to-GPU copy). Slots grow with i - j, so the reachable
    slots at this length are the contiguous range [idx[0, -1], idx[-1, 0]].
    """
    return _slot_table(query_len, key_len, position_buckets, max_relative_positions, torch.device(device))
