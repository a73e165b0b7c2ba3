"""Tile-by-tile classification of the fused kernel's 32 x 32 tiles: the oracle for the kernel's
own tile branches and for benchmarks/kernel_work.py's per-diagonal count."""

from __future__ import annotations

from collections import Counter

import torch


def tile_kinds(L: int, k: int, max_rel: int) -> Counter:
    """How many tiles of the L x L grid are 'linear' (every |i - j| <= k / 2: slot = i - j + k),
    'saturated' (one slot over the tile's clamped distances) or 'mixed'."""
    from deberta_ds.kernels.triton_attention import BLOCK_M, BLOCK_N, slot_table

    slots, kinds = slot_table(L, k, max_rel, "cpu"), Counter()
    for m0 in range(0, L, BLOCK_M):
        for n0 in range(0, L, BLOCK_N):
            rel = torch.arange(m0, m0 + BLOCK_M)[:, None] - torch.arange(n0, n0 + BLOCK_N)[None, :]
            tile = slots[(rel + L - 1).clamp(0, 2 * L - 2)]
            if rel.abs().max() <= k // 2:
                kinds["linear"] += 1
            elif tile.min() == tile.max():
                kinds["saturated"] += 1
            else:
                kinds["mixed"] += 1
    return kinds
