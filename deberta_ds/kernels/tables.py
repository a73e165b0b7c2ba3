"""Distance-space position tables of the fused kernel: layout, construction and the backward's fold.

score[i, j] = q_i.k_j * scale + c2p[i, j] + p2c[i, j], with c2p[i, j] = q_i.Kr[s(i - j)] * scale and
p2c[i, j] = k_j.Qr[s(i - j)] * scale. Every distance r = i - j whose slot is not one of the two
saturated ends lies in the band [r_min, r_max]; the tables hold one column per band distance plus
one saturated column per side, C = r_max - r_min + 3 columns (1,019 at 256 buckets):
  E[i, t] = q_i.Kr[slot of column t] (c2p), t = j - i + r_max + 1 in the band, t = 0: r > r_max,
            t = C - 1: r < r_min;
  F[j, t] = k_j.Qr[slot of column t] (p2c), t = i - j - r_min + 1 in the band, t = 0: r < r_min,
            t = C - 1: r > r_max.
Both come from one dense GEMM each (q against Kr gathered into distance order). Each row is stored
with stride CS (CS - 1 a multiple of 8) after an origin pad, so E[i, j - i + r_max + 1] lies at
i * (CS - 1) + j + const: the view of stride CS - 1 is an [L, L] matrix whose band tiles are plain
2D boxes (tensor-descriptor loads, no gather), F likewise transposed. The backward writes dS of
band cells into buffers G_c2p, G_p2c of the same layout (one writer per cell) and folds them with
dense GEMMs into dq, dk, dKr, dQr. Memory O(L * CS) per head, not O(L^2).

Rows are padded on both sides by at least the sum of a tile's two sides ("mixed-block"), and the
pads are saturated columns too (t < 0 like t = 0, t >= C like t = C - 1): a tile with both band and
saturated cells reads all of its cells' values from its two block loads, as a band tile, and
block-stores all of its dS, the out-of-band cells landing in their own row's saturated or pad
columns, which the fold sums into the saturated slots (tests/test_fused_attention.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from deberta_ds.relative_position import slots_of_distances

LOG2E = math.log2(math.e)  # the kernels run their softmax in base 2: tables are stored times log2(e)


def slot_table(seq_len: int, position_buckets: int, max_relative_positions: int, device) -> torch.Tensor:
    """Slot of every relative distance i - j in [-(L-1), L-1], int32 [2L - 1], built on `device`."""
    relative = torch.arange(-(seq_len - 1), seq_len, device=device)
    return slots_of_distances(relative, position_buckets, max_relative_positions).to(torch.int32)


def table_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """How E and F (and the backward's band buffers) are stored for inputs of `input_dtype`: fp16 inputs
    get fp32 tables (a position score of q and Kr with std 200 is ~1e5, past fp16's 65,504, and at std
    30 fp16's 11 bits lose what the fp32 scores of the reference keep); bf16 has fp32's range and keeps
    its own dtype (the products are accumulated in fp32 all the same)."""
    return torch.float32 if input_dtype == torch.float16 else input_dtype


class Layout(NamedTuple):
    """Where everything lies in one head's table buffer of `head_stride` elements (rows of CS)."""
    seq_len: int
    r_min: int          # band: distances r = i - j in [r_min, r_max]
    r_max: int
    columns: int        # C = r_max - r_min + 3
    row_stride: int     # CS: CS - 1 a multiple of 8, so the skewed view's rows are 16-byte aligned
    e_pad: int          # E's column 0 sits at row offset e_pad (>= the mixed-block pad); e_pad + r_max + 1 is a
    f_pad: int          # multiple of 8. F's column 0 at f_pad (likewise), f_pad + 1 - r_min a multiple of 8
    rows: int           # L rounded up to 8: per-head buffers stay 16-byte aligned
    position_buckets: int
    max_relative_positions: int

    @property
    def head_stride(self) -> int:
        return self.rows * self.row_stride


def band_of(slots: torch.Tensor) -> tuple[int, int]:
    """(r_min, r_max): the distances whose slot is neither saturated end (slots grow with i - j).
    No such distance (L = 1): an empty band, r_min = r_max + 1."""
    seq_len = (slots.numel() + 1) // 2
    inner = (slots != slots.min()) & (slots != slots.max())
    if not bool(inner.any()):
        return 0, -1
    distances = torch.arange(-(seq_len - 1), seq_len)[inner]
    return int(distances.min()), int(distances.max())


@functools.lru_cache(maxsize=64)
def layout(seq_len: int, position_buckets: int, max_relative_positions: int, tile_sum: int) -> Layout:
    """The layout at this length; `tile_sum` = the largest BM + BN of any kernel (the mixed-block pad)."""
    slots = slot_table(seq_len, position_buckets, max_relative_positions, "cpu").long()
    r_min, r_max = band_of(slots)
    columns = r_max - r_min + 3
    extra = tile_sum + (-tile_sum) % 8
    row_stride = columns + 1 + (-columns) % 8 + 8 + 2 * extra   # origin pad <= extra + 7, then >= extra + 2 after
    return Layout(seq_len, r_min, r_max, columns, row_stride, extra + (-(r_max + 1)) % 8, extra + (-(1 - r_min)) % 8,
                  seq_len + (-seq_len) % 8, position_buckets, max_relative_positions)


def _fold(lay: Layout, pad: int, reverse: bool, table_rows: int, device: torch.device) -> torch.Tensor:
    """One-hot [CS, table_rows], fp32: stored row `pad + t` -> the slot of p2c column t (c2p columns,
    `reverse`: the same slots in reverse order); the pads (t < 0, t >= C) continue the saturated
    columns on their side. Built on `device` from aranges: no host data is copied to the device, at
    any new length."""
    column = torch.arange(lay.row_stride, device=device) - pad                     # [CS]
    if reverse:
        column = lay.columns - 1 - column
    distance = (column + lay.r_min - 1).clamp(-(lay.seq_len - 1), lay.seq_len - 1)
    slot = slots_of_distances(distance, lay.position_buckets, lay.max_relative_positions)
    return (slot[:, None] == torch.arange(table_rows, device=device)[None, :]).float()


@functools.lru_cache(maxsize=64)
def _folds(lay: Layout, table_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The c2p and p2c folds (`_fold`): gathering (fold @ Kr) and the gradient's segment sum
    (fold^T @ x) are dense GEMMs. Cached per layout and device (rebuilding one is a few device ops)."""
    return _fold(lay, lay.e_pad, True, table_rows, device), _fold(lay, lay.f_pad, False, table_rows, device)


def gathered(table: torch.Tensor, fold: torch.Tensor, factor: float) -> torch.Tensor:
    """[h, 2k, d] -> [h, CS, d]: the table's row for each stored column, times factor."""
    return (fold.to(table.dtype) @ table) * factor


def position_tables(q, k, pos_key, pos_query, lay: Layout, scale: float, dtype: torch.dtype | None = None):
    """E, F [B*h, rows * CS] in `dtype` (default `table_dtype` of q's; None where the term is off), in
    base-2 units (times scale * log2 e): one GEMM each, accumulated in fp32 at least (fp16 inputs: the
    products in fp32, as the reference's scores). q, k [B, h, L, d]; pos_key, pos_query [h, 2k, d] or None."""
    batch, heads, seq_len, _ = q.shape
    folds = _folds(lay, (pos_key if pos_key is not None else pos_query).shape[1], q.device)
    pad_rows = (0, 0, 0, lay.rows - seq_len)
    stored = dtype or table_dtype(q.dtype)
    product = torch.float32 if q.dtype == torch.float16 else stored   # bf16 GEMMs accumulate in fp32

    def table(x, rel, fold):
        if rel is None:
            return None
        x = torch.nn.functional.pad(x, pad_rows).to(product)                        # [B, h, rows, d]
        out = x @ gathered(rel.to(product), fold, scale * LOG2E).transpose(-1, -2)  # [B, h, rows, CS]
        return out.to(stored).reshape(batch * heads, lay.head_stride)
    return table(q, pos_key, folds[0]), table(k, pos_query, folds[1])


def fold_gradients(q, k, pos_key, pos_query, g_c2p, g_p2c, sat_c2p, sat_p2c, lay: Layout, scale: float):
    """The position parts of dq, dk [B, h, L, d] (fp32) and dKr, dQr [h, 2k, d] from the band buffers
    (g_*: [B*h, rows * CS], dS of every cell of a band or mixed tile) and the saturated tiles' sums
    (sat_*: fp32 [B*h, L, 2]).
    Every sum is a GEMM or a sum in a fixed order: deterministic."""
    batch, heads, seq_len, _ = q.shape
    folds = _folds(lay, (pos_key if pos_key is not None else pos_query).shape[1], q.device)

    def fold(g, sat, x, rel, fold, pad):
        if rel is None:
            return 0.0, None
        g = g.view(batch, heads, lay.rows, lay.row_stride)[:, :, :seq_len]          # [B, h, L, CS]
        sat = sat.view(batch, heads, seq_len, 2).to(g.dtype)
        g[..., pad] += sat[..., 0]
        g[..., pad + lay.columns - 1] += sat[..., 1]
        x_grad = (g @ gathered(rel, fold, scale).to(g.dtype)).float()              # [B, h, L, d]
        per_column = (g.transpose(-1, -2) @ x.to(g.dtype)).float().sum(0)          # [h, CS, d]
        rel_grad = (fold.t() @ per_column) * scale                                  # [h, 2k, d]
        return x_grad, rel_grad.to(rel.dtype)
    dq, dkr = fold(g_c2p, sat_c2p, q, pos_key, folds[0], lay.e_pad)
    dk, dqr = fold(g_p2c, sat_p2c, k, pos_query, folds[1], lay.f_pad)
    return dq, dk, dkr, dqr


def document_ranges(document_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, 5, L] for the kernels: the ids; the first and last position holding each position's
    id (a block visits only the key blocks between its positions' extremes); the start and end of
    the run of equal ids each position is in (a tile inside one run needs no elementwise test)."""
    ids = document_ids.long()
    batch, seq_len = ids.shape
    positions = torch.arange(seq_len, device=ids.device).expand(batch, seq_len)
    # ids -> 0 .. L-1 per row by a stable sort (no host synchronisation, unlike torch.unique)
    sorted_ids, order = ids.sort(dim=1, stable=True)
    new_id = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_id[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    inverse = torch.empty_like(order).scatter_(1, order, new_id.long().cumsum(1) - 1)
    first = torch.full_like(ids, seq_len).scatter_reduce(1, inverse, positions, "amin")
    last = torch.full_like(ids, -1).scatter_reduce(1, inverse, positions, "amax")
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_start = torch.where(starts, positions, 0).cummax(1).values
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    run_end = torch.where(ends, positions, seq_len).flip(1).cummin(1).values.flip(1)
    return torch.stack([inverse, first.gather(1, inverse), last.gather(1, inverse), run_start, run_end],
                       1).to(torch.int32).contiguous()
