"""Matrix-multiply work and tile classes of the fused kernel against FlashAttention-2 (SDPA).

A static model, no GPU needed, so a GPU session can read its timings against it. Products per
score element (unit: one multiply-add per element and head dim): SDPA 2 forward (QK^T, PV) and 5
backward (scores, dP, dV, dK, dQ). The fused kernel's tiles do the same 2 forward and 7 backward
(each backward kernel recomputes the scores and dP), plus the dense GEMMs over the distance-space
tables, L x CS per head each: 2 forward (E, F), 6 backward (E, F again; the fold's dq, dk, dKr, dQr).
The tile classes (per kernel, from the scalar corner tests the kernels use) say how much of the grid
is saturated (two vectors, no table block), band (block loads) or mixed (block loads and a where).

    python benchmarks/kernel_work.py [--buckets 256 --max-relative 512]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deberta_ds.kernels.tables import layout  # noqa: E402
from deberta_ds.kernels.triton_attention import DEFAULT_TILES  # noqa: E402


def tile_counts(seq_len: int, buckets: int, max_relative: int, rows: int, cols: int,
                key_major: bool = False) -> Counter:
    """Tile classes of the grid by the distances each tile really holds (its last tiles cut at L)."""
    lay = layout(seq_len, buckets, max_relative, DEFAULT_TILES.pad)
    query_step, key_step = (cols, rows) if key_major else (rows, cols)
    kinds = Counter()
    for m0 in range(0, seq_len, query_step):
        for n0 in range(0, seq_len, key_step):
            lowest = m0 - (min(n0 + key_step, seq_len) - 1)
            highest = min(m0 + query_step, seq_len) - 1 - n0
            kinds["saturated high" if lowest > lay.r_max else "saturated low" if highest < lay.r_min else
                  "band" if lowest >= lay.r_min and highest <= lay.r_max else "mixed"] += 1
    return kinds


def work_ratios(seq_len: int, buckets: int, max_relative: int) -> dict:
    """Forward, backward and total product work of the fused kernel over SDPA's, and its tile classes."""
    stride = layout(seq_len, buckets, max_relative, DEFAULT_TILES.pad).row_stride
    tables = stride / seq_len                                   # one L x CS GEMM per L^2 score elements
    kinds = tile_counts(seq_len, buckets, max_relative, DEFAULT_TILES.forward.rows, DEFAULT_TILES.forward.cols)
    forward, backward = 2 + 2 * tables, 7 + 6 * tables
    return {"saturated": (kinds["saturated high"] + kinds["saturated low"]) / kinds.total(),
            "mixed": kinds["mixed"] / kinds.total(), "forward": forward / 2, "backward": backward / 5,
            "total": (forward + backward) / 7}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", type=int, default=256, help="position buckets (deberta-v3: 256)")
    parser.add_argument("--max-relative", type=int, default=512, help="max relative positions (deberta-v3: 512)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    args = parser.parse_args()
    tile = DEFAULT_TILES.forward
    print(f"fused kernel product work / SDPA's, forward tiles {tile.rows} x {tile.cols}, buckets {args.buckets}, "
          f"max relative {args.max_relative}")
    print("| L | saturated tiles | mixed tiles | forward | backward | forward+backward |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.lengths:
        ratios = work_ratios(seq_len, args.buckets, args.max_relative)
        print(f"| {seq_len} | {ratios['saturated']:.0%} | {ratios['mixed']:.0%} | {ratios['forward']:.2f}x | "
              f"{ratios['backward']:.2f}x | {ratios['total']:.2f}x |")


if __name__ == "__main__":
    main()
