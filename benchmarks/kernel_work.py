"""Matrix-multiply work of the fused kernel against FlashAttention-2 (SDPA) on the same shape.

A static model, no GPU needed: it counts the tensor-core products the kernel issues at each length
from its tiling and the kinds of its tiles, so a GPU session can read its timings against it (a
kernel doing 3x SDPA's products cannot be within 2.5x of SDPA's time unless it runs them faster).
Unit: the c2c product of one BLOCK_M x BLOCK_N tile (BLOCK_M * BLOCK_N * d multiply-adds).

Per tile, forward: c2c and PV (2), plus the c2p and p2c window products (W / BLOCK_N + W / BLOCK_M)
unless the tile is saturated (one slot: vector operations). Backward: both kernels recompute the
scores and dP; dV, dK (key side), dQ (query side); the window gradients, 2 W / BLOCK per side, in
unsaturated tiles. SDPA: 2 forward, 5 backward (scores, dP, dV, dK, dQ).

    python benchmarks/kernel_work.py [--buckets 256 --max-relative 512]
"""

from __future__ import annotations

import argparse

import torch
import triton

from deberta_ds.kernels.triton_attention import BLOCK_M, BLOCK_N, launch_constants, slot_table


def tile_counts(seq_len: int, buckets: int, max_relative: int) -> tuple[int, int]:
    """(tiles, saturated tiles) of the L x L grid. Blocks are square, so a tile's distances are
    m0 - n0 - (BLOCK_N - 1) ... m0 - n0 + (BLOCK_M - 1), clamped to the table as the kernel does."""
    assert BLOCK_M == BLOCK_N
    slots = slot_table(seq_len, buckets, max_relative, "cpu")
    blocks = triton.cdiv(seq_len, BLOCK_M)
    diagonals = torch.arange(-(blocks - 1), blocks)
    tiles_on_diagonal = blocks - diagonals.abs()
    lowest = (diagonals * BLOCK_M - (BLOCK_N - 1)).clamp(-(seq_len - 1), seq_len - 1) + seq_len - 1
    highest = (diagonals * BLOCK_M + (BLOCK_M - 1)).clamp(-(seq_len - 1), seq_len - 1) + seq_len - 1
    saturated = slots[lowest] == slots[highest]
    return int(tiles_on_diagonal.sum()), int(tiles_on_diagonal[saturated].sum())


def work_ratios(seq_len: int, buckets: int, max_relative: int, head_dim: int = 64) -> dict:
    """Forward, backward and total product work of the fused kernel over SDPA's."""
    tiles, saturated = tile_counts(seq_len, buckets, max_relative)
    window = launch_constants(torch.bfloat16, head_dim)["W"]
    windowed = tiles - saturated
    windows = window / BLOCK_N + window / BLOCK_M                     # c2p + p2c products of one tile
    forward = 2 * tiles + windowed * windows
    backward = 2 * forward + 3 * tiles + windowed * 2 * windows       # two recomputes (dP counted as PV)
    return {"saturated": saturated / tiles, "forward": forward / (2 * tiles), "backward": backward / (5 * tiles),
            "total": (forward + backward) / (7 * tiles)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", type=int, default=256, help="position buckets (deberta-v3: 256)")
    parser.add_argument("--max-relative", type=int, default=512, help="max relative positions (deberta-v3: 512)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192, 16384])
    args = parser.parse_args()
    print(f"fused kernel product work / SDPA's, {BLOCK_M} x {BLOCK_N} tiles, buckets {args.buckets}, "
          f"max relative {args.max_relative}")
    print("| L | saturated tiles | forward | backward | forward+backward |")
    print("|---|---|---|---|---|")
    for seq_len in args.lengths:
        ratios = work_ratios(seq_len, args.buckets, args.max_relative)
        print(f"| {seq_len} | {ratios['saturated']:.0%} | {ratios['forward']:.2f}x | {ratios['backward']:.2f}x | "
              f"{ratios['total']:.2f}x |")


if __name__ == "__main__":
    main()
