"""Fused disentangled attention in Triton on distance-space tables (design: `tables.py`).

Three kernels, FlashAttention-2 style, scores never in HBM:
  forward    query-major: out and the base-2 log-sum-exp per query row;
  dQ         query-major: dq's content part, dS of band cells into G_c2p, saturated row sums;
  dK/dV      key-major: dk's content part and dv, dS^T of band cells into G_p2c, saturated key sums.
Every tile is classified by two scalar tests on its corners (highest and lowest i - j):
  saturated high / low  every pair on one saturated slot: a row plus a column vector, no table tile;
  band or mixed         some pair in the band: two block loads of the skewed table views.
The table views are tensor descriptors ([L, L], row stride CS - 1), so a band tile costs two 2D block
loads in the forward and a block store of dS in the backward. A mixed tile (band and saturated pairs)
costs the same: the rows are padded on both sides with their saturated values, so its out-of-band
cells read those, and its dS stores land there, which the fold sums into the saturated slots.

Masking: key padding sets the score to -1e30; padded query rows output 0 and keep lse = +inf, so the
backward gives them p = 0 without a test. Document ids: a block visits only the key (or query) blocks
between the first and last position of its documents; a tile inside one run of equal ids needs no
elementwise test, the others compare ids. Dropout: one random byte per cell, 16 per Philox call
(counter i * ceil(L / 16) + j / 16 and b*h, keyed by the seed the kernels read from device memory),
the rate in whole 1/256 (`settings.dropout_threshold`); the backward regenerates the same mask.
Deterministic: every output element and band cell has one writer, the saturated sums go to per-row
buffers, no atomics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deberta_ds.kernels.settings import DROPOUT_LEVELS, dropout_threshold, quantised_dropout_rate
from deberta_ds.kernels.tables import LOG2E, document_ranges, fold_gradients, layout, position_tables

_NEG = tl.constexpr(-1.0e30)  # masked score: finite, so a masked-out tile gives no NaN in the online softmax
_LOG2E = tl.constexpr(LOG2E)
_LEVELS = tl.constexpr(float(DROPOUT_LEVELS))
_PHILOX_ROUNDS = tl.constexpr(7)  # FlashAttention's (Philox4x32-7 passes BigCrush, Salmon et al. 2011)


@triton.jit
def _rows(base, offs, offs_d, mask, HEAD_DIM: tl.constexpr):
    """A [len(offs), D] tile of a row-major [L, HEAD_DIM] matrix (q, k, v, do) at `base`."""
    return tl.load(base + offs[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _skewed_view(origin, seq_len, CS, ROWS: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """The [L, L] view of row stride CS - 1 at `origin`: a tensor descriptor of ROWS x COLS boxes, or
    for pointer loads (TMA off) the origin itself."""
    view = origin
    if TMA:
        view = tl.make_tensor_descriptor(origin, [seq_len, seq_len], [CS - 1, 1], [ROWS, COLS])
    return view


@triton.jit
def _view_load(view, r0, c0, seq_len, CS, ROWS: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """The view's [ROWS, COLS] block at (r0, c0), 0 outside [L, L]."""
    if TMA:
        block = view.load([r0, c0])
    else:
        rows, cols = r0 + tl.arange(0, ROWS), c0 + tl.arange(0, COLS)
        block = tl.load(view + rows[:, None] * (CS - 1) + cols[None, :],
                        mask=(rows < seq_len)[:, None] & (cols < seq_len)[None, :], other=0.0)
    return block


@triton.jit
def _view_store(view, r0, c0, value, seq_len, CS, ROWS: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """Stores value [ROWS, COLS] at (r0, c0), dropping what falls outside [L, L]."""
    if TMA:
        view.store([r0, c0], value)
    else:
        rows, cols = r0 + tl.arange(0, ROWS), c0 + tl.arange(0, COLS)
        tl.store(view + rows[:, None] * (CS - 1) + cols[None, :], value,
                 mask=(rows < seq_len)[:, None] & (cols < seq_len)[None, :])


@triton.jit
def _position(m0, n0, offs_m, offs_n, prog_hi, prog_lo, loop_ptr, offs_loop, loop_ok, loop_hi_col, loop_lo_col,
              loop_other, seq_len, CS, e_view, f_view, r_min, r_max, HAS_PROG: tl.constexpr,
              HAS_LOOP: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, KEY_MAJOR: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr, SELECT_MIXED: tl.constexpr = False):
    """c2p + p2c of the tile with queries m0 + [0, BM) and keys n0 + [0, BN), fp32 in base-2 units, rows
    = the program's side (queries; keys when KEY_MAJOR). prog_*: the program side's saturated values
    [rows] (E of the queries, or F of the keys); the loop side's are read here per tile (loop_ptr rows of
    CS, columns loop_hi_col / loop_lo_col; `loop_other` past L). SELECT_MIXED (query-major only): mixed
    tiles take their saturated cells from those vectors too, not from the block loads' pads."""
    lowest, highest = m0 - n0 - (BN - 1), m0 + (BM - 1) - n0
    if (lowest > r_max) | (highest < r_min):               # saturated: a row plus a column vector
        high = lowest > r_max
        col = tl.where(high, loop_hi_col, loop_lo_col)
        if HAS_PROG:
            pos = tl.where(high, prog_hi, prog_lo)[:, None]
            if HAS_LOOP:
                pos = pos + tl.load(loop_ptr + offs_loop * CS + col, mask=loop_ok, other=loop_other)[None, :]
            pos = tl.broadcast_to(pos, [prog_hi.shape[0], offs_loop.shape[0]])
        else:
            pos = tl.load(loop_ptr + offs_loop * CS + col, mask=loop_ok, other=loop_other).to(tl.float32)
            pos = tl.broadcast_to(pos[None, :], [prog_hi.shape[0], offs_loop.shape[0]])
    else:                                                  # band or mixed: block loads of the views (`tables`)
        if HAS_C2P:
            c2p = _view_load(e_view, m0, n0, seq_len, CS, BM, BN, TMA)      # [BM, BN]
            if KEY_MAJOR:
                c2p = tl.trans(c2p)
            pos = c2p.to(tl.float32)
        if HAS_P2C:
            p2c = _view_load(f_view, n0, m0, seq_len, CS, BN, BM, TMA)      # [BN, BM]
            if not KEY_MAJOR:
                p2c = tl.trans(p2c)
            if HAS_C2P:
                pos = pos + p2c.to(tl.float32)
            else:
                pos = p2c.to(tl.float32)
        if SELECT_MIXED and ((lowest < r_min) | (highest > r_max)):   # the pads hold these values too, but
            # without this select Triton 3.6-3.9 compute the forward's dropout Philox in the MMA layout,
            # replicated per thread (`compile_check`, mask + dropout, d = 64: 2.0 warp-instructions per
            # element instead of 0.9 under 3.6 / 3.7, 1.05-1.2 instead of 0.85-0.97 under 3.8 / 3.9)
            rel = offs_m[:, None] - offs_n[None, :]
            high = rel > r_max
            sat = tl.where(high, prog_hi[:, None], prog_lo[:, None])
            if HAS_LOOP:
                loop_hi = tl.load(loop_ptr + offs_loop * CS + loop_hi_col, mask=loop_ok, other=loop_other)
                loop_lo = tl.load(loop_ptr + offs_loop * CS + loop_lo_col, mask=loop_ok, other=loop_other)
                sat = sat + tl.where(high, loop_hi[None, :].to(tl.float32), loop_lo[None, :].to(tl.float32))
            pos = tl.where((rel >= r_min) & (rel <= r_max), pos, sat)
    return pos


@triton.jit
def _tile_ds(ds, G, g_view, m0, n0, r_min, r_max, sat_hi, sat_lo, seq_len, CS, BM: tl.constexpr, BN: tl.constexpr,
             KEY_MAJOR: tl.constexpr, TMA: tl.constexpr):
    """Where the backward puts dS of the tile with queries m0 + [0, BM) and keys n0 + [0, BN) (ds [BM, BN],
    [BN, BM] when KEY_MAJOR): a saturated tile's row sums into sat_hi / sat_lo, a band or mixed tile's cells
    block-stored into the band buffer G (the fold sums the out-of-band cells into the saturated slots)."""
    lowest, highest = m0 - n0 - (BN - 1), m0 + (BM - 1) - n0
    if lowest > r_max:
        sat_hi += tl.sum(ds, axis=1)
    elif highest < r_min:
        sat_lo += tl.sum(ds, axis=1)
    elif KEY_MAJOR:
        _view_store(g_view, n0, m0, ds.to(G.dtype.element_ty), seq_len, CS, BN, BM, TMA)
    else:
        _view_store(g_view, m0, n0, ds.to(G.dtype.element_ty), seq_len, CS, BM, BN, TMA)
    return sat_hi, sat_lo


@triton.jit
def _seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed, read from device memory ([1] int64): no host value, so a captured graph
    replays with whatever seed the tensor holds."""
    seed = tl.zeros([], tl.int64)
    if DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _dropout_keep(seed, bh, offs_m, n0, seq_len, threshold, BN: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """Keep-mask of queries offs_m and keys n0 + [0, BN), [BM, BN] ([BN, BM] when KEY_MAJOR: drawn
    query-major, then transposed): one byte per cell, as FlashAttention: Philox4x32-7 keyed by the seed,
    counter (i * ceil(L / 16) + j // 16, b*h, 0, 0); a call's four words give 16 consecutive keys their
    bytes (key 16g + 4w + c: byte c of word w); a cell is kept when its byte is at least `threshold`
    (the rate in 1/256, `dropout_threshold`)."""
    groups = n0 // 16 + tl.arange(0, BN // 16)
    counters = offs_m[:, None] * ((seq_len + 15) // 16) + groups[None, :]         # [BM, BN / 16]
    r0, r1, r2, r3 = tl.philox(seed, counters, bh, 0, 0, _PHILOX_ROUNDS)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))          # [BM, BN / 16, k, l]: word 2k + l
    shifts = tl.reshape(tl.arange(0, 4) * 8, [1, 1, 1, 1, 4])
    cells = tl.reshape((words[:, :, :, :, None] >> shifts) & 0xFF, [offs_m.shape[0], BN])   # byte c of [..., c]
    keep = cells >= threshold
    if KEY_MAJOR:
        keep = tl.trans(keep)
    return keep


@triton.jit
def _keep_scale(threshold):
    """1 / (1 - rate) of the quantised rate threshold / 256."""
    return _LEVELS / (_LEVELS - threshold.to(tl.float32))


@triton.jit
def _document_span(doc_ptr, b, p0, offs, ok, seq_len, STEP: tl.constexpr):
    """For the program's block (positions offs, first p0): its ids, the loop range [start, end) of the
    other side's blocks of STEP that can share a document, and the run of equal ids around p0 with
    whether the whole block lies in it."""
    base = doc_ptr + b.to(tl.int64) * 5 * seq_len
    ids = tl.load(base + offs, mask=ok, other=-1)
    first = tl.min(tl.load(base + seq_len + offs, mask=ok, other=seq_len), axis=0)
    last = tl.max(tl.load(base + 2 * seq_len + offs, mask=ok, other=-1), axis=0)
    run_start = tl.load(base + 3 * seq_len + p0)
    run_end = tl.load(base + 4 * seq_len + p0)
    block_in_run = run_end >= tl.minimum(p0 + offs.shape[0], seq_len) - 1
    return ids, (first // STEP) * STEP, last + 1, run_start, run_end, block_in_run


@triton.jit
def _loop_range(start, end, seq_len, DOCS: tl.constexpr, DROPOUT: tl.constexpr):
    """The dK/dV loop's range: with documents [start, end) (`_document_span`), except with dropout too,
    where it runs over every step and skips the others (`_visits`): bounds that are loaded data take
    the loop variable out of the uniform registers there, and every TMA coordinate pays for it (0.07
    per element). Without dropout (2 stages) the skipping loop spills, and the query-major loops do
    better with [start, end) as well."""
    first, last = start, end
    if DOCS and DROPOUT:
        first, last = 0, seq_len
    return first, last


@triton.jit
def _visits(l0, start, end, DOCS: tl.constexpr, DROPOUT: tl.constexpr):
    """Whether the loop step at l0 of `_loop_range` lies in [start, end)."""
    visit = True
    if DOCS and DROPOUT:
        visit = (l0 >= start) & (l0 < end)
    return visit


@triton.jit
def _same_document(s, doc_ptr, b, ids, l0, offs_loop, loop_ok, seq_len, run_start, run_end, block_in_run):
    """s with the cells whose query and key lie in different documents masked; a tile whose both
    blocks lie in one run of equal ids skips the test. The loop block's positions past L read id -2,
    no document's, and a loop block reaching past L is never uniform: the test masks them too.
    Padded positions are one document of their own (`_int32`): the test masks padded keys as well."""
    uniform = block_in_run & (l0 >= run_start) & (l0 + offs_loop.shape[0] - 1 <= run_end)
    if not uniform:
        loop_ids = tl.load(doc_ptr + b.to(tl.int64) * 5 * seq_len + offs_loop, mask=loop_ok, other=-2)
        s = tl.where(ids[:, None] == loop_ids[None, :], s, _NEG)
    return s


@triton.jit
def _forward_kernel(Q, K, V, E, F, MASK, DOC, OUT, LSE, seq_len, heads, CS, C, TS, E_PAD, F_PAD, r_min, r_max,
                    scale, threshold, SEED,
                    HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr,
                    DROPOUT: tl.constexpr, DOCS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                    PRECISION: tl.constexpr, TMA: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b = bh // heads
    seed = _seed(SEED, DROPOUT)
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < seq_len
    qkv = bh.to(tl.int64) * seq_len * HEAD_DIM
    tile_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = _rows(Q + qkv, offs_m, offs_d, tile_mask, HEAD_DIM)
    Eb, Fb = E + bh.to(tl.int64) * TS, F + bh.to(tl.int64) * TS
    e_hi = tl.zeros([BM], tl.float32)
    e_lo = e_hi
    e_view = None
    f_view = None
    if HAS_C2P:
        e_hi = tl.load(Eb + offs_m * CS + E_PAD, mask=row_ok, other=0.0).to(tl.float32)           # r > r_max
        e_lo = tl.load(Eb + offs_m * CS + E_PAD + C - 1, mask=row_ok, other=0.0).to(tl.float32)   # r < r_min
        e_view = _skewed_view(Eb + E_PAD + r_max + 1, seq_len, CS, BM, BN, TMA)
    if HAS_P2C:
        f_view = _skewed_view(Fb + F_PAD + 1 - r_min, seq_len, CS, BN, BM, TMA)
    start, end = 0, seq_len
    if DOCS:
        ids, start, end, run_start, run_end, block_in_run = _document_span(DOC, b, m0, offs_m, row_ok, seq_len, BN)
    m_i = tl.full([BM], _NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        col_ok = offs_n < seq_len
        kv_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = _rows(K + qkv, offs_n, offs_d, kv_mask, HEAD_DIM)
        v = _rows(V + qkv, offs_n, offs_d, kv_mask, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_C2P or HAS_P2C:
            s += _position(m0, n0, offs_m, offs_n, e_hi, e_lo, Fb, offs_n, col_ok, F_PAD + C - 1, F_PAD, 0.0,
                           seq_len, CS, e_view, f_view, r_min, r_max, HAS_C2P, HAS_P2C, HAS_C2P, HAS_P2C, False,
                           BM, BN, TMA, DROPOUT)
        if DOCS:  # masks padded keys and keys past L too
            s = _same_document(s, DOC, b, ids, n0, offs_n, col_ok, seq_len, run_start, run_end, block_in_run)
        else:
            keep = col_ok
            if HAS_MASK:
                keep = tl.load(MASK + b.to(tl.int64) * seq_len + offs_n, mask=col_ok, other=0) != 0
            s = tl.where(keep[None, :], s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m, n0, seq_len, threshold, BN, False), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * _keep_scale(threshold)
    lse = m_i + tl.math.log2(l_i)
    if HAS_MASK:                                                                 # padded query rows: 0, p = 0
        query_ok = tl.load(MASK + b.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0) != 0
        out = tl.where(query_ok[:, None], out, 0.0)
        lse = tl.where(query_ok, lse, float("inf"))
    tl.store(OUT + qkv + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=tile_mask)
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, E, F, MASK, DOC, LSE, DELTA, DQ, GC, SATC, seq_len, heads, CS, C, TS, E_PAD,
                        F_PAD, r_min, r_max, scale, threshold, SEED,
                        HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
                        HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOCS: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Query-major: dq's content part (scaled, fp32) of BM queries; with c2p, dS of their band and mixed
    tiles into G_c2p and their saturated tiles' sums into SATC [b*h, L, 2] (r > r_max, r < r_min)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b = bh // heads
    seed = _seed(SEED, DROPOUT)
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < seq_len
    qkv = bh.to(tl.int64) * seq_len * HEAD_DIM
    tile_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = _rows(Q + qkv, offs_m, offs_d, tile_mask, HEAD_DIM)
    do = _rows(DO + qkv, offs_m, offs_d, tile_mask, HEAD_DIM)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=float("inf"))   # past L: p = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    Eb, Fb, Gb = E + bh.to(tl.int64) * TS, F + bh.to(tl.int64) * TS, GC + bh.to(tl.int64) * TS
    e_hi = tl.zeros([BM], tl.float32)
    e_lo = e_hi
    e_view = None
    f_view = None
    if HAS_C2P:
        e_hi = tl.load(Eb + offs_m * CS + E_PAD, mask=row_ok, other=0.0).to(tl.float32)
        e_lo = tl.load(Eb + offs_m * CS + E_PAD + C - 1, mask=row_ok, other=0.0).to(tl.float32)
        e_view = _skewed_view(Eb + E_PAD + r_max + 1, seq_len, CS, BM, BN, TMA)
        g_view = _skewed_view(Gb + E_PAD + r_max + 1, seq_len, CS, BM, BN, TMA)
    if HAS_P2C:
        f_view = _skewed_view(Fb + F_PAD + 1 - r_min, seq_len, CS, BN, BM, TMA)
    start, end = 0, seq_len
    if DOCS:
        ids, start, end, run_start, run_end, block_in_run = _document_span(DOC, b, m0, offs_m, row_ok, seq_len, BN)
    dq = tl.zeros([BM, D], tl.float32)
    sat_hi = tl.zeros([BM], tl.float32)
    sat_lo = tl.zeros([BM], tl.float32)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        col_ok = offs_n < seq_len
        kv_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = _rows(K + qkv, offs_n, offs_d, kv_mask, HEAD_DIM)
        v = _rows(V + qkv, offs_n, offs_d, kv_mask, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_C2P or HAS_P2C:  # keys past L read -inf saturated values: p = 0 there without a test
            s += _position(m0, n0, offs_m, offs_n, e_hi, e_lo, Fb, offs_n, col_ok, F_PAD + C - 1, F_PAD,
                           float("-inf"), seq_len, CS, e_view, f_view, r_min, r_max, HAS_C2P, HAS_P2C, HAS_C2P,
                           HAS_P2C, False, BM, BN, TMA)
        if DOCS:  # masks padded keys and keys past L too
            s = _same_document(s, DOC, b, ids, n0, offs_n, col_ok, seq_len, run_start, run_end, block_in_run)
        elif HAS_MASK:
            key_ok = tl.load(MASK + b.to(tl.int64) * seq_len + offs_n, mask=col_ok, other=0) != 0
            s = tl.where(key_ok[None, :], s, _NEG)
        elif HAS_C2P and not HAS_P2C:  # no -inf p2c values past L: keep those keys out of the saturated sums
            s = tl.where(col_ok[None, :], s, _NEG)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:  # lse, delta as `fused_backward` passes them with dropout
            dp = tl.where(_dropout_keep(seed, bh, offs_m, n0, seq_len, threshold, BN, False), dp, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_C2P:
            sat_hi, sat_lo = _tile_ds(ds, GC, g_view, m0, n0, r_min, r_max, sat_hi, sat_lo, seq_len, CS, BM, BN,
                                      False, TMA)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + qkv + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq * (scale / _LOG2E), mask=tile_mask)
    if HAS_C2P:
        sat = SATC + bh.to(tl.int64) * seq_len * 2 + offs_m * 2
        tl.store(sat, sat_hi, mask=row_ok)
        tl.store(sat + 1, sat_lo, mask=row_ok)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, E, F, MASK, DOC, LSE, DELTA, DK, DV, GP, SATP, seq_len, heads, CS, C, TS,
                          E_PAD, F_PAD, r_min, r_max, scale, threshold, SEED,
                          HEAD_DIM: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
                          HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOCS: tl.constexpr, BN: tl.constexpr,
                          BM: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Key-major: BN keys per program, tiles [keys, queries]: dk's content part (scaled, fp32) and dv;
    with p2c, dS^T of their band and mixed tiles into G_p2c and their saturated tiles' sums into SATP
    [b*h, L, 2] (r < r_min, r > r_max)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b = bh // heads
    seed = _seed(SEED, DROPOUT)
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    key_ok = offs_n < seq_len
    qkv = bh.to(tl.int64) * seq_len * HEAD_DIM
    tile_mask = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = _rows(K + qkv, offs_n, offs_d, tile_mask, HEAD_DIM)
    v = _rows(V + qkv, offs_n, offs_d, tile_mask, HEAD_DIM)
    Eb, Fb, Gb = E + bh.to(tl.int64) * TS, F + bh.to(tl.int64) * TS, GP + bh.to(tl.int64) * TS
    f_lo = tl.zeros([BN], tl.float32)
    f_hi = f_lo
    e_view = None
    f_view = None
    if HAS_P2C:
        f_lo = tl.load(Fb + offs_n * CS + F_PAD, mask=key_ok, other=0.0).to(tl.float32)           # r < r_min
        f_hi = tl.load(Fb + offs_n * CS + F_PAD + C - 1, mask=key_ok, other=0.0).to(tl.float32)   # r > r_max
        f_view = _skewed_view(Fb + F_PAD + 1 - r_min, seq_len, CS, BN, BM, TMA)
        g_view = _skewed_view(Gb + F_PAD + 1 - r_min, seq_len, CS, BN, BM, TMA)
    if HAS_C2P:
        e_view = _skewed_view(Eb + E_PAD + r_max + 1, seq_len, CS, BM, BN, TMA)
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + b.to(tl.int64) * seq_len + offs_n, mask=key_ok, other=0) != 0)
    start, end = 0, seq_len
    if DOCS:
        ids, start, end, run_start, run_end, block_in_run = _document_span(DOC, b, n0, offs_n, offs_n < seq_len,
                                                                           seq_len, BM)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    sat_lo = tl.zeros([BN], tl.float32)
    sat_hi = tl.zeros([BN], tl.float32)
    first, last = _loop_range(start, end, seq_len, DOCS, DROPOUT)
    for m0 in range(first, last, BM):
        if _visits(m0, start, end, DOCS, DROPOUT):
            offs_m = m0 + tl.arange(0, BM)
            q_ok = offs_m < seq_len
            qd_mask = q_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            q = _rows(Q + qkv, offs_m, offs_d, qd_mask, HEAD_DIM)
            do = _rows(DO + qkv, offs_m, offs_d, qd_mask, HEAD_DIM)
            lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=q_ok, other=float("inf"))   # past L: p = 0
            delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=q_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale                 # [BN keys, BM queries]
            if HAS_C2P or HAS_P2C:
                st += _position(m0, n0, offs_m, offs_n, f_hi, f_lo, Eb, offs_m, q_ok, E_PAD, E_PAD + C - 1, 0.0,
                                seq_len, CS, e_view, f_view, r_min, r_max, HAS_P2C, HAS_C2P, HAS_C2P, HAS_P2C, True,
                                BM, BN, TMA)
            if DOCS:
                st = _same_document(st, DOC, b, ids, m0, offs_m, q_ok, seq_len, run_start, run_end, block_in_run)
            elif HAS_MASK:
                st = tl.where(key_ok[:, None], st, _NEG)
            pt = tl.math.exp2(st - lse[None, :])
            if DROPOUT:  # lse, delta as `fused_backward` passes them with dropout
                kept = tl.where(_dropout_keep(seed, bh, offs_m, n0, seq_len, threshold, BN, True), pt, 0.0)
                dv += tl.dot(kept.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dst = kept * dpt - pt * delta[None, :]
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
            if HAS_P2C:
                sat_hi, sat_lo = _tile_ds(dst, GP, g_view, m0, n0, r_min, r_max, sat_hi, sat_lo, seq_len, CS, BM, BN,
                                          True, TMA)
    tl.store(DK + qkv + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk * (scale / _LOG2E), mask=tile_mask)
    tl.store(DV + qkv + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_mask)
    if HAS_P2C:
        sat = SATP + bh.to(tl.int64) * seq_len * 2 + offs_n * 2
        tl.store(sat, sat_lo, mask=offs_n < seq_len)
        tl.store(sat + 1, sat_hi, mask=offs_n < seq_len)


# ---------------------------------------------------------------- host side

class Tile(NamedTuple):
    """One kernel's launch: `rows` per program (queries; keys for dK/dV) by `cols` per loop step."""
    rows: int
    cols: int
    num_warps: int
    num_stages: int


class Tiles(NamedTuple):
    """The three kernels' launches, the tables' precision (fp32_tables: fp32 tables and band
    buffers for half-precision inputs) and how table blocks are read and written (tma). Defaults:
    128 x 64 at 8 warps (wgmma, 0 spill at half precision, `compile_check`); with dropout or
    documents the dK/dV kernel steps 32 queries at a time, one stage (dkdv_dropout): at 64 queries
    it spills with dropout (24 B), and with documents alone under Triton 3.7 (24 B).
    `benchmarks/kernel_tune.py` times the alternatives on a GPU."""
    forward: Tile = Tile(128, 64, 8, 2)
    dq: Tile = Tile(128, 64, 8, 2)
    dkdv: Tile = Tile(128, 64, 8, 2)
    dkdv_dropout: Tile = Tile(128, 32, 8, 1)
    fp32_tables: bool = False
    tma: bool = True    # table blocks by tensor descriptors (TMA on sm_90); False: masked pointer loads

    def dkdv_for(self, dropout: bool, documents: bool) -> Tile:
        """The dK/dV kernel's tile for a launch (the one home of this rule: `compile_check` compiles it)."""
        return self.dkdv_dropout if dropout or documents else self.dkdv

    @property
    def pad(self) -> int:
        """Row padding of the tables and band buffers: every tile's rows + cols (mixed-block stores)."""
        return max(tile.rows + tile.cols for tile in (self.forward, self.dq, self.dkdv, self.dkdv_dropout))


DEFAULT_TILES = Tiles()
# What differs from DEFAULT_TILES per compiler at d <= 64 (Triton (major, minor): Tiles fields), found
# with `compile_check` (its gates: 0 spill, wgmma, per-element limits; RESULTS.md).
# Triton 3.6 (the GPU image's): one stage in the forward and dQ kernels, whose loops it otherwise
# issues 0.05-0.13 more instructions per element for (3.7-3.9 issue fewer at two stages); Triton 3.8:
# one stage in the forward (with documents, fp16: 0.985 per element in saturated tiles, 1.005 at two).
TRITON_TILES: dict[tuple[int, int], dict] = {(3, 6): {"forward": Tile(128, 64, 8, 1), "dq": Tile(128, 64, 8, 1)},
                                              (3, 8): {"forward": Tile(128, 64, 8, 1)}}
# d > 64, in place of DEFAULT_TILES and TRITON_TILES: the d = 64 tiles spill 48-296 B there (fp32 accumulators
# of [rows, 128]). These spill none under Triton 3.6-3.9 in every half-precision variant (`compile_check`, the
# compile test), with a smaller tile per compiler where these spill.
WIDE_HEAD_TILES: dict = {"dq": Tile(64, 64, 4, 2), "dkdv": Tile(128, 32, 8, 2), "dkdv_dropout": Tile(64, 32, 8, 2)}
TRITON_WIDE_TILES: dict[tuple[int, int], dict] = {   # 128 x 64 forward: 40 B; 64 x 64 dQ: 8 B there
    (3, 6): {"forward": Tile(64, 64, 4, 1), "dq": Tile(64, 32, 4, 2)},
    # dK/dV with dropout or documents: 16-query steps issue 1.6-2.0 per element against 1.9-3.1 at 64 x 32 (which
    # spills 8 B with documents in fp16 under 3.8); 128 x 16 spills 16-24 B under 3.6 and 3.7, 64 x 16 under 3.6
    (3, 7): {"dkdv_dropout": Tile(64, 16, 4, 2)},
    (3, 8): {"dkdv_dropout": Tile(128, 16, 8, 2)},
    (3, 9): {"dq": Tile(64, 32, 4, 2), "dkdv_dropout": Tile(128, 16, 8, 2)},
}


def launch_tiles(head_dim: int, triton_version: str = triton.__version__) -> Tiles:
    """The tiles the kernels launch with for this head dim under this Triton."""
    major, minor = (int(part) for part in triton_version.split(".")[:2])
    if head_dim > 64:
        return DEFAULT_TILES._replace(**{**WIDE_HEAD_TILES, **TRITON_WIDE_TILES.get((major, minor), {})})
    return DEFAULT_TILES._replace(**TRITON_TILES.get((major, minor), {}))


def launch_constants(dtype: torch.dtype, head_dim: int) -> dict:
    """Compile-time constants besides the features and tiles (also what `compile_check` compiles):
    the padded head dim and the product precision (fp32 inputs get exact fp32 products, no TF32)."""
    return dict(HEAD_DIM=head_dim, D=max(16, triton.next_power_of_2(head_dim)),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _allocate(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _settings_args(q, pos_key, pos_query, settings, seed, tiles):
    """Layout, scalar arguments and feature switches shared by the three kernels."""
    if seed.dtype != torch.int64 or seed.shape != (1,) or seed.device != q.device:
        raise ValueError(f"fused attention: seed must be an int64 tensor of shape [1] on q's device ({q.device}), "
                         f"got {seed.dtype} {list(seed.shape)} on {seed.device}")
    seq_len = q.shape[2]
    lay = layout(seq_len, settings.position_buckets, settings.max_relative_positions, tiles.pad)
    threshold = dropout_threshold(settings.dropout_p)
    scalars = (seq_len, q.shape[1], lay.row_stride, lay.columns, lay.head_stride, lay.e_pad, lay.f_pad, lay.r_min,
               lay.r_max, settings.scale * LOG2E, threshold, seed)
    features = dict(HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None, DROPOUT=threshold > 0,
                    TMA=tiles.tma, **launch_constants(q.dtype, q.shape[-1]))
    if q.is_cuda:  # device-side tensor descriptors need a scratch allocator (per thread: autograd's too)
        triton.set_allocator(_allocate)
    return lay, scalars, features


def _tables(q, k, pos_key, pos_query, lay, settings, tiles):
    """E, F (None for a term that is off; both None without position terms)."""
    if pos_key is None and pos_query is None:
        return None, None
    return position_tables(q, k, pos_key, pos_query, lay, settings.scale,
                           torch.float32 if tiles.fp32_tables else None)


def _int32(mask, document_ids, placeholder):
    """The mask [B, L] and document ranges [B, 5, L] as the kernels read them (a placeholder when absent:
    its pointer is never read, the constexpr switch is off)."""
    mask_arg = mask.to(torch.int32).contiguous() if mask is not None else placeholder
    if mask is not None and document_ids is not None:  # padded positions: one document of their own, apart
        # from every real one, so the dK/dV kernel's document test masks padded keys as well
        document_ids = torch.where(mask.bool(), document_ids.long(), torch.iinfo(torch.int64).min)
    docs_arg = document_ranges(document_ids) if document_ids is not None else placeholder
    return mask_arg, docs_arg, dict(HAS_MASK=mask is not None, DOCS=document_ids is not None)


def fused_forward(q, k, v, pos_key, pos_query, attention_mask, document_ids, settings, seed: torch.Tensor,
                  tiles: Tiles | None = None):
    """out [B, h, L, d] and the base-2 log-sum-exp [B*h, L] (fp32); `settings`: AttentionSettings
    (scale resolved, the dropout rate of this call); seed [1] int64 on q's device: the dropout seed,
    read by the kernels (never copied to the host); tiles: None for `launch_tiles`."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tiles = launch_tiles(q.shape[-1]) if tiles is None else tiles
    batch, heads, seq_len, _ = q.shape
    lay, scalars, features = _settings_args(q, pos_key, pos_query, settings, seed, tiles)
    e, f = _tables(q, k, pos_key, pos_query, lay, settings, tiles)
    mask, docs, switches = _int32(attention_mask, document_ids, q)
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads, seq_len, device=q.device, dtype=torch.float32)
    tile = tiles.forward
    _forward_kernel[(triton.cdiv(seq_len, tile.rows), batch * heads)](
        q, k, v, e if e is not None else q, f if f is not None else q, mask, docs, out, lse, *scalars,
        **features, **switches, BM=tile.rows, BN=tile.cols, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out, lse


def fused_backward(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, out, lse, settings,
                   seed: torch.Tensor, tiles: Tiles | None = None):
    """dq, dk, dv and dKr, dQr (None for a term that is off) for fused_forward's out, lse (and its seed)."""
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    tiles = launch_tiles(q.shape[-1]) if tiles is None else tiles
    batch, heads, seq_len, _ = q.shape
    lay, scalars, features = _settings_args(q, pos_key, pos_query, settings, seed, tiles)
    e, f = _tables(q, k, pos_key, pos_query, lay, settings, tiles)
    mask, docs, switches = _int32(attention_mask, document_ids, q)
    delta = (grad_out.float() * out.float()).sum(-1).reshape(batch * heads, seq_len)   # rowsum(dO * O)
    if features["DROPOUT"]:  # p = exp2(s - lse) then comes out times the keep scale and delta over it, so the
        # kernels' p (kept dP - delta) is dS = P (keep_scale kept dP - delta) and the kept p give dV unscaled
        keep_rate = 1.0 - quantised_dropout_rate(settings.dropout_p)
        lse, delta = lse + math.log2(keep_rate), delta * keep_rate
    g_c2p = torch.zeros_like(e) if e is not None else q
    g_p2c = torch.zeros_like(f) if f is not None else q
    sat_c2p = torch.empty(batch * heads, seq_len, 2, device=q.device, dtype=torch.float32)
    sat_p2c = torch.empty_like(sat_c2p)
    dq, dk = torch.empty(q.shape, device=q.device, dtype=torch.float32), torch.empty(k.shape, device=q.device,
                                                                                    dtype=torch.float32)
    dv = torch.empty_like(v)
    tables = (e if e is not None else q, f if f is not None else q, mask, docs, lse, delta)
    tile = tiles.dq
    _backward_dq_kernel[(triton.cdiv(seq_len, tile.rows), batch * heads)](
        q, k, v, grad_out, *tables, dq, g_c2p, sat_c2p, *scalars, **features, **switches, BM=tile.rows,
        BN=tile.cols, num_warps=tile.num_warps, num_stages=tile.num_stages)
    tile = tiles.dkdv_for(features["DROPOUT"], switches["DOCS"])
    _backward_dkdv_kernel[(triton.cdiv(seq_len, tile.rows), batch * heads)](
        q, k, v, grad_out, *tables, dk, dv, g_p2c, sat_p2c, *scalars, **features, **switches, BN=tile.rows,
        BM=tile.cols, num_warps=tile.num_warps, num_stages=tile.num_stages)
    dkr = dqr = None
    if e is not None or f is not None:
        dq_pos, dk_pos, dkr, dqr = fold_gradients(q, k, pos_key, pos_query, g_c2p, g_p2c, sat_c2p, sat_p2c, lay,
                                                  settings.scale)
        dq, dk = dq + dq_pos, dk + dk_pos
    return dq.to(q.dtype), dk.to(k.dtype), dv, dkr, dqr
