"""Fused disentangled attention in Triton (FlashAttention-2 style), forward and backward.

Per (query block, key block) tile, on chip and never in HBM:
  c2c = q k^T; c2p[i, j] = q_i . Kr[s(i, j)]; p2c[i, j] = k_j . Qr[s(i, j)].
The slots s(i, j) of one tile are a contiguous window of at most BM + BN - 1 rows of the
relative table (s grows with i - j), so each tile multiplies q (and k) with just that window
(a [BM, W] and a [BN, W] matmul) and gathers its [BM, BN] values from it. Two tile kinds skip
work: near the diagonal the slot is i - j + k (no table read), and beyond the saturation
distance every pair shares one slot, so c2p + p2c is a per-row plus a per-column vector (and
in the backward, row and column sums). In the backward, the gradient of each window row is a
sum over the run of a tile row that shares its slot (slots never decrease with i - j), taken
as a difference of prefix sums. The softmax is online in fp32; the output is O(L)
memory: O plus a log-sum-exp per row.

Dropout of the probabilities uses counter-based random numbers (tl.rand) keyed by
(seed, batch*head, i, j); the backward regenerates the same mask. Gradients are
deterministic: every program owns the rows it writes (dK, dV per key block; dQ per query
block) and the relative-table gradients go to per-program partial buffers that are summed
in a fixed order afterwards; no floating-point atomics.

Slots come from a [2L - 1] table computed by the same float32 code as the reference, so the
bucket boundaries agree exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deberta_ds.relative_position import log_bucket

_NEG = tl.constexpr(-1.0e30)  # masked score (finite, so a fully masked row gives no NaN before it is zeroed)


@triton.jit
def _tile_window(m0, n0, slot_ptr, seq_len, buckets, BM: tl.constexpr, BN: tl.constexpr):
    """First and last relative-table slot of the tile whose first query is m0 and first key n0,
    from two scalar reads (slots never decrease with i - j), and whether the tile is near the
    diagonal (every |i - j| <= buckets / 2: the slot is i - j + buckets, no table read)."""
    lowest, highest = m0 - n0 - (BN - 1), m0 + (BM - 1) - n0                 # extreme i - j of the tile
    near = tl.maximum(highest, -lowest) <= buckets // 2
    if near:
        first, last = lowest + buckets, highest + buckets
    else:
        first = tl.load(slot_ptr + tl.minimum(tl.maximum(lowest + seq_len - 1, 0), 2 * seq_len - 2))
        last = tl.load(slot_ptr + tl.minimum(tl.maximum(highest + seq_len - 1, 0), 2 * seq_len - 2))
    return first, last, near


@triton.jit
def _tile_slots(offs_m, offs_n, slot_ptr, seq_len, buckets, near):
    """Relative-table slots of a tile [BM, BN] (read only for unsaturated tiles)."""
    rel = offs_m[:, None] - offs_n[None, :]
    if near:
        slot = rel + buckets
    else:
        slot = tl.load(slot_ptr + tl.minimum(tl.maximum(rel + seq_len - 1, 0), 2 * seq_len - 2))
    return slot


@triton.jit
def _tile_scores(q, k, kr_ptr, qr_ptr, slot_ptr, m0, n0, offs_m, offs_n, seq_len, buckets, table_rows, stride_r,
                 offs_d, d_mask, scale, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled scores of one tile [BM, BN], the first slot of its window and whether the tile is
    saturated (one slot for every pair: the terms are a row plus a column vector)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    window_start, last_slot, near = _tile_window(m0, n0, slot_ptr, seq_len, buckets, BM, BN)
    saturated = last_slot == window_start
    if saturated:
        if HAS_C2P:
            kr_row = tl.load(kr_ptr + window_start * stride_r + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            s += tl.sum(q.to(tl.float32) * kr_row[None, :], axis=1)[:, None]
        if HAS_P2C:
            qr_row = tl.load(qr_ptr + window_start * stride_r + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            s += tl.sum(k.to(tl.float32) * qr_row[None, :], axis=1)[None, :]
    else:
        local = _tile_slots(offs_m, offs_n, slot_ptr, seq_len, buckets, near) - window_start   # [BM, BN]
        rows = window_start + tl.arange(0, W)
        row_ok = rows < table_rows
        if HAS_C2P:
            kr = tl.load(kr_ptr + rows[:, None] * stride_r + offs_d[None, :],
                         mask=row_ok[:, None] & d_mask[None, :], other=0.0)
            c2p_window = tl.dot(q, tl.trans(kr), input_precision=PRECISION)               # [BM, W]
            s += tl.gather(c2p_window, local, axis=1)
        if HAS_P2C:
            qr = tl.load(qr_ptr + rows[:, None] * stride_r + offs_d[None, :],
                         mask=row_ok[:, None] & d_mask[None, :], other=0.0)
            if HAS_C2P:
                p2c_window = tl.dot(k, tl.trans(qr), input_precision=PRECISION)           # [BN, W]
                s += tl.trans(tl.gather(p2c_window, tl.trans(local), axis=1))
            else:  # Triton 3.6's layout pass fails on the form above without c2p; this form
                # (no transposes) compiles everywhere but spills at d = 128 beside c2p.
                p2c_window = tl.dot(qr, tl.trans(k), input_precision=PRECISION)           # [W, BN]
                s += tl.gather(p2c_window, local, axis=0)
    return s * scale, window_start, saturated


@triton.jit
def _document_ranges(doc_ptr, b, offs, ok, seq_len):
    """Document ids of a block [N] and their smallest and largest (over its real positions)."""
    docs = tl.load(doc_ptr + b * seq_len + offs, mask=ok, other=0)
    return docs, tl.min(tl.where(ok, docs, 2147483647), axis=0), tl.max(tl.where(ok, docs, -2147483647), axis=0)


@triton.jit
def _keep_mask(seed, bh, offs_m, offs_n, seq_len, dropout_p):
    offsets = offs_m[:, None] * seq_len + offs_n[None, :]
    return tl.rand(seed + bh * 7919, offsets) >= dropout_p


@triton.jit
def _load_query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, offs_m, offs_d, d_mask, seq_len, stride_l):
    """q, dO, log-sum-exp and rowsum(dO * O) of one query block."""
    row_ok = offs_m < seq_len
    block_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=block_mask, other=0.0)
    do = tl.load(do_ptr + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=block_mask, other=0.0)
    lse = tl.load(lse_ptr + bh * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * seq_len + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta, row_ok


@triton.jit
def _load_key_block(k_ptr, v_ptr, base, offs_n, offs_d, d_mask, seq_len, stride_l):
    col_ok = offs_n < seq_len
    block_mask = col_ok[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + base + offs_n[:, None] * stride_l + offs_d[None, :], mask=block_mask, other=0.0)
    v = tl.load(v_ptr + base + offs_n[:, None] * stride_l + offs_d[None, :], mask=block_mask, other=0.0)
    return k, v, col_ok


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, kr_ptr, qr_ptr, slot_ptr, mask_ptr, doc_ptr, out_ptr, lse_ptr,
                    seq_len, heads, buckets, table_rows, head_dim, scale, dropout_p, seed,
                    stride_b, stride_h, stride_l, stride_rh, stride_r,
                    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                    DOCS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                    PRECISION: tl.constexpr):
    block_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    m0 = block_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    d_mask = offs_d < head_dim
    base = b * stride_b + h * stride_h
    row_ok = offs_m < seq_len
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None] & d_mask[None, :],
                other=0.0)
    if DOCS:
        query_docs, query_first_doc, query_last_doc = _document_ranges(doc_ptr, b, offs_m, row_ok, seq_len)
    kr_base, qr_base = kr_ptr + h * stride_rh, qr_ptr + h * stride_rh
    m_i = tl.full([BM], _NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start_n in range(0, seq_len, BN):
        offs_n = start_n + tl.arange(0, BN)
        shares_document = True
        if DOCS:  # a tile where no query shares a key's document adds nothing: skipped, no work
            key_docs, key_first_doc, key_last_doc = _document_ranges(doc_ptr, b, offs_n, offs_n < seq_len, seq_len)
            shares_document = (query_first_doc <= key_last_doc) & (key_first_doc <= query_last_doc)
        if shares_document:
            k, v, col_ok = _load_key_block(k_ptr, v_ptr, base, offs_n, offs_d, d_mask, seq_len, stride_l)
            s, _, _ = _tile_scores(q, k, kr_base, qr_base, slot_ptr, m0, start_n, offs_m, offs_n, seq_len, buckets,
                                   table_rows, stride_r, offs_d, d_mask, scale, HAS_C2P, HAS_P2C, BM, BN, W,
                                   PRECISION)
            keep = col_ok[None, :]
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + b * seq_len + offs_n, mask=col_ok, other=0) != 0)[None, :]
            if DOCS:
                keep = keep & (query_docs[:, None] == key_docs[None, :])
            s = tl.where(keep, s, _NEG)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                p = tl.where(_keep_mask(seed, bh, offs_m, offs_n, seq_len, dropout_p), p / (1.0 - dropout_p), 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    out = acc / l_i[:, None]
    query_ok = row_ok
    if HAS_MASK:
        query_ok = query_ok & (tl.load(mask_ptr + b * seq_len + offs_m, mask=row_ok, other=0) != 0)
    out = tl.where(query_ok[:, None], out, 0.0)                              # padded query rows output 0
    tl.store(out_ptr + base + offs_m[:, None] * stride_l + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])
    tl.store(lse_ptr + bh * seq_len + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _interval_sums(x, lo, hi):
    """out[r, w] = sum of x[r, lo[r, w]:hi[r, w]], [R, C] -> [R, W], from one prefix sum per row."""
    prefix = tl.cumsum(x, axis=1)
    upper = tl.where(hi > 0, tl.gather(prefix, tl.maximum(hi - 1, 0), axis=1), 0.0)
    lower = tl.where(lo > 0, tl.gather(prefix, tl.maximum(lo - 1, 0), axis=1), 0.0)
    return upper - lower


@triton.jit
def _window_sum(x, offs_rows, first_col, slot_start_ptr, window_start, table_rows, ROWS_ARE_QUERIES: tl.constexpr,
                W: tl.constexpr):
    """Scatter-add of a tile's score gradients x [R, C] into its slot window [R, W] (sum over C).

    Slots are monotone in i - j, so the columns of one row that share a slot are a contiguous
    run, found from the first distance of each slot (`slot_start`): each window entry is a
    difference of two prefix sums, O(R * (C + W)) instead of a [R, C, W] one-hot. Rows are
    queries (columns keys: a slot's run ends at j = i - start) or keys (columns queries: it
    starts at i = j + start)."""
    slots = window_start + tl.arange(0, W)
    start = tl.load(slot_start_ptr + tl.minimum(slots, table_rows))[None, :]         # first i - j of slot
    start_next = tl.load(slot_start_ptr + tl.minimum(slots + 1, table_rows))[None, :]
    width = x.shape[1]
    if ROWS_ARE_QUERIES:  # columns j with i - j >= start form the prefix [0, i - start - first_col + 1)
        lo = tl.minimum(tl.maximum(offs_rows[:, None] - start_next - first_col + 1, 0), width)
        hi = tl.minimum(tl.maximum(offs_rows[:, None] - start - first_col + 1, 0), width)
    else:  # rows j with i - j >= start form the suffix [j + start - first_col, C)
        lo = tl.minimum(tl.maximum(offs_rows[:, None] + start - first_col, 0), width)
        hi = tl.minimum(tl.maximum(offs_rows[:, None] + start_next - first_col, 0), width)
    return _interval_sums(x, lo, hi)


@triton.jit
def _position_grads(ds_rows, offs_rows, first_col, operand, table_ptr, part_ptr, saturated,
                    slot_start_ptr, window_start, table_rows, stride_r, offs_d, d_mask,
                    ROWS_ARE_QUERIES: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr):
    """One positional term's gradients for a tile whose score gradients are ds_rows [R, C] (rows =
    the side the term multiplies, `operand` [R, D]): adds d_window^T @ operand to this program's
    partial of the table gradient and returns d_window @ table, the operand's gradient [R, D].
    A saturated tile (one slot for every pair, most tiles at long L) has one window column, the
    row sums: both products are then vector operations, not [R, W] matmuls."""
    if saturated:
        d_rows = tl.sum(ds_rows, axis=1)                                                  # [R]
        table_row = tl.load(table_ptr + window_start * stride_r + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        partial_row = part_ptr + window_start * stride_r + offs_d
        row_grad = tl.sum(d_rows[:, None] * operand.to(tl.float32), axis=0)              # [D]
        tl.store(partial_row, tl.load(partial_row, mask=d_mask, other=0.0) + row_grad, mask=d_mask)
        operand_grad = d_rows[:, None] * table_row[None, :]
    else:
        d_window = _window_sum(ds_rows, offs_rows, first_col, slot_start_ptr, window_start, table_rows,  # [R, W]
                               ROWS_ARE_QUERIES, W)
        rows = window_start + tl.arange(0, W)
        window_mask = (rows < table_rows)[:, None] & d_mask[None, :]
        table = tl.load(table_ptr + rows[:, None] * stride_r + offs_d[None, :], mask=window_mask, other=0.0)
        partial = part_ptr + rows[:, None] * stride_r + offs_d[None, :]
        table_grad = tl.dot(tl.trans(d_window), operand.to(tl.float32), input_precision=PRECISION)
        tl.store(partial, tl.load(partial, mask=window_mask, other=0.0) + table_grad, mask=window_mask)
        operand_grad = tl.dot(d_window.to(table.dtype), table, input_precision=PRECISION)
    return operand_grad


@triton.jit
def _backward_kernel(q_ptr, k_ptr, v_ptr, kr_ptr, qr_ptr, slot_ptr, slot_start_ptr, mask_ptr, doc_ptr, do_ptr,
                     lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, dkr_part_ptr, dqr_part_ptr,
                     seq_len, heads, buckets, table_rows, head_dim, scale, dropout_p, seed, num_blocks,
                     blocks_per_program, stride_b, stride_h, stride_l, stride_rh, stride_r, stride_part,
                     KEY_SIDE: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr,
                     DROPOUT: tl.constexpr, DOCS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     D: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr):
    """KEY_SIDE: each program computes dK, dV of `blocks_per_program` consecutive key blocks and
    their dQr partial. Otherwise each program computes dQ of as many query blocks and their dKr
    partial. One partial per program (not per block) keeps the partial buffers small at long L."""
    program, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    offs_d = tl.arange(0, D)
    d_mask = offs_d < head_dim
    base = b * stride_b + h * stride_h
    kr_base, qr_base = kr_ptr + h * stride_rh, qr_ptr + h * stride_rh
    part = (bh * tl.num_programs(0) + program) * stride_part
    for block in range(program * blocks_per_program, tl.minimum(program * blocks_per_program + blocks_per_program,
                                                                  num_blocks)):
        if KEY_SIDE:
            n0 = block * BN
            offs_n = n0 + tl.arange(0, BN)
            k, v, col_ok = _load_key_block(k_ptr, v_ptr, base, offs_n, offs_d, d_mask, seq_len, stride_l)
            dk = tl.zeros([BN, D], tl.float32)
            dv = tl.zeros([BN, D], tl.float32)
            if DOCS:
                key_docs, key_first_doc, key_last_doc = _document_ranges(doc_ptr, b, offs_n, col_ok, seq_len)
        else:
            m0 = block * BM
            offs_m = m0 + tl.arange(0, BM)
            q, do, lse, delta, row_ok = _load_query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, offs_m, offs_d,
                                                          d_mask, seq_len, stride_l)
            dq = tl.zeros([BM, D], tl.float32)
            if DOCS:
                query_docs, query_first_doc, query_last_doc = _document_ranges(doc_ptr, b, offs_m, row_ok, seq_len)
        for start in range(0, seq_len, BM if KEY_SIDE else BN):
            shares_document = True
            if KEY_SIDE:
                m0 = start
                offs_m = start + tl.arange(0, BM)
                if DOCS:
                    query_docs, query_first_doc, query_last_doc = _document_ranges(doc_ptr, b, offs_m,
                                                                                   offs_m < seq_len, seq_len)
            else:
                n0 = start
                offs_n = start + tl.arange(0, BN)
                if DOCS:
                    key_docs, key_first_doc, key_last_doc = _document_ranges(doc_ptr, b, offs_n, offs_n < seq_len,
                                                                             seq_len)
            if DOCS:  # as in the forward: tiles with no pair in one document are skipped
                shares_document = (query_first_doc <= key_last_doc) & (key_first_doc <= query_last_doc)
            if shares_document:
                if KEY_SIDE:
                    q, do, lse, delta, row_ok = _load_query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, offs_m,
                                                                  offs_d, d_mask, seq_len, stride_l)
                else:
                    k, v, col_ok = _load_key_block(k_ptr, v_ptr, base, offs_n, offs_d, d_mask, seq_len, stride_l)
                s, window_start, saturated = _tile_scores(q, k, kr_base, qr_base, slot_ptr, m0, n0, offs_m, offs_n,
                                                          seq_len, buckets, table_rows, stride_r, offs_d, d_mask,
                                                          scale, HAS_C2P, HAS_P2C, BM, BN, W, PRECISION)
                keep = col_ok[None, :] & row_ok[:, None]
                if HAS_MASK:
                    key_keep = tl.load(mask_ptr + b * seq_len + offs_n, mask=col_ok, other=0) != 0
                    query_keep = tl.load(mask_ptr + b * seq_len + offs_m, mask=row_ok, other=0) != 0
                    keep = keep & key_keep[None, :] & query_keep[:, None]   # padded query rows carry no gradient
                if DOCS:
                    keep = keep & (query_docs[:, None] == key_docs[None, :])
                p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)                 # [BM, BN] probabilities
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                p_used = p
                if DROPOUT:
                    kept = _keep_mask(seed, bh, offs_m, offs_n, seq_len, dropout_p)
                    p_used = tl.where(kept, p / (1.0 - dropout_p), 0.0)
                    dp = tl.where(kept, dp / (1.0 - dropout_p), 0.0)
                ds = p * (dp - delta[:, None]) * scale                            # d(score before scaling)
                if KEY_SIDE:
                    dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=PRECISION)
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
                    if HAS_P2C:  # p2c[i, j] = k_j . Qr[s]: dK from Qr, dQr from k
                        dk += _position_grads(tl.trans(ds), offs_n, start, k, qr_base, dqr_part_ptr + part, saturated,
                                              slot_start_ptr, window_start, table_rows, stride_r, offs_d, d_mask,
                                              False, W, PRECISION)
                else:
                    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                    if HAS_C2P:  # c2p[i, j] = q_i . Kr[s]: dQ from Kr, dKr from q
                        dq += _position_grads(ds, offs_m, start, q, kr_base, dkr_part_ptr + part, saturated,
                                              slot_start_ptr, window_start, table_rows, stride_r, offs_d, d_mask,
                                              True, W, PRECISION)
        if KEY_SIDE:
            store = col_ok[:, None] & d_mask[None, :]
            tl.store(dk_ptr + base + offs_n[:, None] * stride_l + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=store)
            tl.store(dv_ptr + base + offs_n[:, None] * stride_l + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
                     mask=store)
        else:
            tl.store(dq_ptr + base + offs_m[:, None] * stride_l + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_mask[None, :])


# ---------------------------------------------------------------- host side

class Tiles(NamedTuple):
    """A launch configuration. Tiles are square: the backward launches both passes (query side
    and key side) over cdiv(L, block) blocks. The default: at 32 x 32 tiles 4 warps need more
    than 255 registers per thread and spill (the window matmuls, gathers and dropout bits are
    live together; `compile_check` reports this), so 8. `benchmarks/kernel_tune.py` times the
    alternatives on a GPU (RESULTS.md)."""
    block: int = 32
    num_warps: int = 8
    num_stages: int = 3


DEFAULT_TILES = Tiles()
BLOCK_M = BLOCK_N = DEFAULT_TILES.block
# Backward programs per launch, at most: past this each program takes several consecutive blocks,
# so the fp32 table-gradient partials ([B*h, programs, 2k, d], one per program) stop growing
# with L: about 270 MB in all at L = 16384, B*h = 12, 2k = 512, d = 64, instead of 1.6 GB.
# 1024 programs still fill any current GPU several times over.
MAX_BACKWARD_PROGRAMS = 1024


def launch_constants(dtype: torch.dtype, head_dim: int, block: int = BLOCK_M) -> dict:
    """The compile-time constants every kernel is launched with (also what `compile_check`
    compiles): tiles, padded head dim, slot-window width, and the matmul precision (fp32 inputs
    get exact fp32 products, no TF32 rounding; fp16/bf16 use the tensor cores)."""
    return dict(BM=block, BN=block, D=max(16, triton.next_power_of_2(head_dim)),
                W=triton.next_power_of_2(2 * block), PRECISION="ieee" if dtype == torch.float32 else "tf32")


def slot_table(seq_len: int, position_buckets: int, max_relative_positions: int, device) -> torch.Tensor:
    """Slot of every relative distance i - j in [-(L-1), L-1], int32 [2L - 1]."""
    relative = torch.arange(-(seq_len - 1), seq_len)
    slots = log_bucket(relative, position_buckets, max_relative_positions) + position_buckets
    return slots.clamp_(0, 2 * position_buckets - 1).to(torch.int32).to(device)


def slot_starts(slots: torch.Tensor, table_rows: int) -> torch.Tensor:
    """For every slot v in [0, table_rows], the smallest relative distance i - j whose slot is >= v
    (slots never decrease with i - j); 4L when none is, int32 [table_rows + 1]."""
    seq_len = (slots.numel() + 1) // 2
    first = torch.searchsorted(slots, torch.arange(table_rows + 1, dtype=slots.dtype, device=slots.device))
    return torch.where(first < slots.numel(), first - (seq_len - 1), 4 * seq_len).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _slot_tables(seq_len: int, position_buckets: int, max_relative_positions: int, table_rows: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_table, slot_starts) on `device`, built once per shape: every layer's forward and
    backward reuse them instead of rebuilding and copying them to the GPU on each call."""
    slots = slot_table(seq_len, position_buckets, max_relative_positions, "cpu")
    return slots.to(device), slot_starts(slots, table_rows).to(device)


def _launch_args(q, pos_key, pos_query, position_buckets, max_relative_positions):
    batch, heads, seq_len, head_dim = q.shape
    table = pos_key if pos_key is not None else pos_query
    dummy = torch.zeros(heads, 2 * position_buckets, head_dim, device=q.device, dtype=q.dtype)
    kr = pos_key.contiguous() if pos_key is not None else dummy
    qr = pos_query.contiguous() if pos_query is not None else dummy
    rows = table.shape[1] if table is not None else 2 * position_buckets
    slots, starts = _slot_tables(seq_len, position_buckets, max_relative_positions, rows, q.device)
    return batch, heads, seq_len, head_dim, kr, qr, slots, starts, rows


def _int32_or_placeholder(tensor, placeholder):
    """A [B, L] mask or document-id tensor as the kernel reads it; the placeholder stands for an
    absent one (its pointer is never read: the matching constexpr switch is off)."""
    return tensor.to(torch.int32).contiguous() if tensor is not None else placeholder


def fused_forward(q, k, v, pos_key, pos_query, attention_mask, position_buckets, max_relative_positions, scale,
                  dropout_p, seed, document_ids=None, tiles: Tiles = DEFAULT_TILES):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, seq_len, head_dim, kr, qr, slots, _, rows = _launch_args(q, pos_key, pos_query, position_buckets,
                                                                              max_relative_positions)
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads, seq_len, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(seq_len, tiles.block), batch * heads)
    _forward_kernel[grid](q, k, v, kr, qr, slots, _int32_or_placeholder(attention_mask, slots),
                          _int32_or_placeholder(document_ids, slots), out, lse, seq_len, heads, position_buckets,
                          rows, head_dim, scale, dropout_p, seed, q.stride(0), q.stride(1), q.stride(2),
                          kr.stride(0), kr.stride(1), HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None,
                          HAS_MASK=attention_mask is not None, DROPOUT=dropout_p > 0, DOCS=document_ids is not None,
                          **launch_constants(q.dtype, head_dim, tiles.block), num_warps=tiles.num_warps,
                          num_stages=tiles.num_stages)
    return out, lse


def fused_backward(grad_out, q, k, v, pos_key, pos_query, attention_mask, out, lse, position_buckets,
                   max_relative_positions, scale, dropout_p, seed, document_ids=None, tiles: Tiles = DEFAULT_TILES):
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    batch, heads, seq_len, head_dim, kr, qr, slots, starts, rows = _launch_args(q, pos_key, pos_query,
                                                                                  position_buckets,
                                                                                  max_relative_positions)
    delta = (grad_out.float() * out.float()).sum(-1).reshape(batch * heads, seq_len).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    blocks = triton.cdiv(seq_len, tiles.block)
    blocks_per_program = triton.cdiv(blocks * batch * heads, MAX_BACKWARD_PROGRAMS)
    programs = triton.cdiv(blocks, blocks_per_program)
    # Per-program partial sums of the table gradients, reduced below in a fixed order.
    dkr_parts = torch.zeros(batch * heads, programs, *kr.shape[1:], device=q.device, dtype=torch.float32)
    dqr_parts = torch.zeros_like(dkr_parts)
    common = dict(HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None, HAS_MASK=attention_mask is not None,
                  DROPOUT=dropout_p > 0, DOCS=document_ids is not None,
                  **launch_constants(q.dtype, head_dim, tiles.block), num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages)
    args = (q, k, v, kr, qr, slots, starts, _int32_or_placeholder(attention_mask, slots),
            _int32_or_placeholder(document_ids, slots), grad_out, lse, delta, dq, dk, dv, dkr_parts,
            dqr_parts, seq_len, heads, position_buckets, rows, head_dim, scale, dropout_p, seed, blocks,
            blocks_per_program, q.stride(0), q.stride(1), q.stride(2), kr.stride(0), kr.stride(1), dkr_parts.stride(1))
    _backward_kernel[(programs, batch * heads)](*args, KEY_SIDE=True, **common)
    _backward_kernel[(programs, batch * heads)](*args, KEY_SIDE=False, **common)

    def table_grad(parts, table):
        if table is None:
            return None
        return parts.reshape(batch, heads, programs, *parts.shape[2:]).sum(dim=(0, 2)).to(table.dtype)

    return dq, dk, dv, table_grad(dkr_parts, pos_key), table_grad(dqr_parts, pos_query)
