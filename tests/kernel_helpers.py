"""Tile-by-tile classification of the fused kernel's tiles, elementwise from the slot table: the
oracle for the kernels' scalar corner tests and for benchmarks/kernel_work.py's per-diagonal count."""

from __future__ import annotations

from collections import Counter

import torch


def tile_classes(L: int, k: int, max_rel: int, rows: int, cols: int, key_major: bool = False) -> Counter:
    """How many tiles of a grid of `rows` x `cols` tiles (query-major; rows are keys when key_major) are
    'saturated high' / 'saturated low' (every real pair on the top / bottom slot), 'band' (no pair on
    either saturated slot) or 'mixed', from each pair's slot."""
    from deberta_ds.kernels.tables import slot_table

    slots, kinds = slot_table(L, k, max_rel, "cpu"), Counter()
    top, bottom = int(slots.max()), int(slots.min())
    query_step, key_step = (cols, rows) if key_major else (rows, cols)
    for m0 in range(0, L, query_step):
        for n0 in range(0, L, key_step):
            rel = torch.arange(m0, min(m0 + query_step, L))[:, None] - torch.arange(n0, min(n0 + key_step, L))[None]
            tile = slots[rel + L - 1]
            kind = ("saturated high" if (tile == top).all() and top != bottom else
                    "saturated low" if (tile == bottom).all() else
                    "band" if ((tile != top) & (tile != bottom)).all() else "mixed")
            kinds[kind] += 1
    return kinds
