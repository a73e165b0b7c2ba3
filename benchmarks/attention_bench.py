"""Disentangled attention on a GPU: the fused Triton kernel against its peers, same process.

For deberta-v3-base heads (h=12, d=64, 256 buckets, bf16) and L = 128 ... 16384, with B chosen
so B x L = --tokens: forward and forward+backward time (median of CUDA-event timings) and
peak attention memory, for
  fused    deberta_ds Triton kernel
  ours-ref deberta_ds reference path (the model's unfused attention)
  hf       transformers DebertaV2 DisentangledSelfAttention, eager (includes its q/k/v projections)
  flashdeberta  when the package imports
  disentangled-flash  DisentangledFlash's Triton training attention layer (fused backward), when
           it imports; like hf it includes its q/k/v projections
  sdpa     torch scaled_dot_product_attention (flash) on the same q, k, v WITHOUT position terms
TFLOP/s uses DisentangledFlash's FLOP count, B h (14 L^2 d + 16 L R d) forward+backward with R
the relative-table rows reachable at length L, so the figures compare with its published tables.
The last column is the fused kernel's tensor-core work over SDPA's at that length
(`kernel_work.py`). A last line gives the fused kernel's peak memory at B = 1 (B x h = 12) and
the longest L. A peer that fails (import, shape, memory) is reported in its row, not fatal.

    python benchmarks/attention_bench.py [--tokens 65536] [--lengths 128 512 2048]

`--device cpu` (with TRITON_INTERPRET=1) runs the same harness at tiny sizes as a smoke test of
this script; its timings mean nothing and it reports no memory.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.kernel_work import work_ratios  # noqa: E402
from deberta_ds.kernels.fused import disentangled_attention_fused  # noqa: E402
from deberta_ds.kernels.reference import disentangled_attention_reference  # noqa: E402
from deberta_ds.relative_position import log_bucket  # noqa: E402

HEADS, HEAD_DIM, BUCKETS, MAX_REL = 12, 64, 256, 512


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb(fn) -> float:
    """Peak memory fn() adds on the GPU (NaN on the CPU, which has no allocator statistics)."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def candidates(batch: int, seq_len: int, device: str, fused_only: bool = False):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # Triton's CPU interpreter mishandles bf16
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = (make(batch, HEADS, seq_len, HEAD_DIM) for _ in range(3))
    pos_key, pos_query = make(HEADS, 2 * BUCKETS, HEAD_DIM), make(HEADS, 2 * BUCKETS, HEAD_DIM)
    kwargs = dict(position_buckets=BUCKETS, max_relative_positions=MAX_REL)
    runs = {
        "fused": lambda: disentangled_attention_fused(q, k, v, pos_key, pos_query, None, **kwargs),
        "ours-ref": lambda: disentangled_attention_reference(q, k, v, pos_key, pos_query, None, **kwargs),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    if fused_only:
        return {"fused": runs["fused"]}
    try:
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder, DisentangledSelfAttention
        config = DebertaV2Config(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, relative_attention=True,
                                 position_buckets=BUCKETS, max_relative_positions=MAX_REL, share_att_key=True,
                                 pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", num_hidden_layers=1,
                                 attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        hf = DisentangledSelfAttention(config).to(device, dtype)
        encoder = DebertaV2Encoder(config).to(device, dtype)
        hidden = make(batch, seq_len, HEADS * HEAD_DIM)
        mask = encoder.get_attention_mask(torch.ones(batch, seq_len, device=device))
        rel_pos = encoder.get_rel_pos(hidden)
        # the normalised table is rebuilt per call (it is part of every forward's graph)
        runs["hf"] = lambda: hf(hidden, mask, relative_pos=rel_pos, rel_embeddings=encoder.get_rel_embedding())[0]
        if device == "cuda":  # DisentangledFlash runs on CUDA only
            padding = torch.ones(batch, seq_len, dtype=torch.long, device=device)  # it takes [B, L] masks
            runs["disentangled-flash"] = disentangled_flash_run(config, hidden, padding, encoder, device, dtype)
    except ImportError:
        pass
    try:
        if device == "cuda":  # FlashDeBERTa runs on CUDA only
            runs["flashdeberta"] = flashdeberta_run(q, k, v, pos_key, pos_query)
    except ImportError:
        pass
    return runs


def flashdeberta_run(q, k, v, pos_key, pos_query):
    """FlashDeBERTa's forward on the same tensors; its arguments changed between releases."""
    from flashdeberta.ops.flash_attention import flash_attention_with_disentangled as flashdeberta

    scale = 1 / math.sqrt(HEAD_DIM * 3)
    if "seq_lengths" in inspect.signature(flashdeberta).parameters:  # 0.0.8: [1, h, 2k, d] tables
        return lambda: flashdeberta(q, k, v, None, pos_key[None], pos_query[None], False, scale, BUCKETS, MAX_REL)
    # 0.0.5: the caller builds the [B, h, L, 2k] score tables (counted in its time and memory)
    return lambda: flashdeberta(q, k, v, q @ pos_key.transpose(-1, -2), k @ pos_query.transpose(-1, -2), False,
                                scale, BUCKETS, MAX_REL)


def disentangled_flash_run(config, hidden, mask, encoder, device, dtype):
    """DisentangledFlash 1.1.1's training attention layer on HF's config and inputs (a failure to
    import or build is reported in its row)."""
    try:
        from disentangled_flash import TritonTrainingDisentangledSelfAttention
        layer = TritonTrainingDisentangledSelfAttention(config).to(device, dtype)
    except Exception as error:  # noqa: BLE001 - the peer's row says why it is missing
        return unavailable(error)
    return lambda: layer(hidden, mask, rel_embeddings=encoder.get_rel_embedding())[0]


def unavailable(error: Exception):
    def run():
        raise RuntimeError(f"unavailable: {type(error).__name__}: {error}")
    return run


def relative_rows(seq_len: int) -> int:
    """Rows of the 2k relative table reachable at this length (DisentangledFlash's R)."""
    slots = log_bucket(torch.arange(-(seq_len - 1), seq_len), BUCKETS, MAX_REL)
    return int(slots.max() - slots.min()) + 1


def forward_backward(forward):
    def run():
        forward().float().sum().backward()
    return run


def measure(batch: int, seq_len: int, device: str, repeats: int) -> dict:
    rows = {}
    for name, forward in candidates(batch, seq_len, device).items():
        both = forward_backward(forward)
        try:
            rows[name] = (timed(forward, repeats), timed(both, repeats), peak_mb(both))
        except torch.cuda.OutOfMemoryError:
            rows[name] = "OOM"
        except Exception as error:  # noqa: BLE001 - a failing peer is a row, not the end of the run
            rows[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="B x L per measurement")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke run of this script under TRITON_INTERPRET=1, no meaningful numbers")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("attention_bench.py measures GPU kernels; no CUDA device is visible (--device cpu for a "
                         "smoke run)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke run: numbers mean nothing)"
    print(f"device: {name}, date: {datetime.date.today()}, torch {torch.__version__}, "
          f"h={HEADS} d={HEAD_DIM} buckets={BUCKETS}")
    print("| L | B | impl | fwd ms | fwd+bwd ms | peak MB | fwd+bwd TFLOP/s (DisentangledFlash's count) | "
          "fwd+bwd speed-up of fused | fwd+bwd products / SDPA's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.lengths:
        batch = max(1, args.tokens // seq_len)
        rows = measure(batch, seq_len, args.device, args.repeats)
        flops = batch * HEADS * (14 * seq_len ** 2 * HEAD_DIM + 16 * seq_len * relative_rows(seq_len) * HEAD_DIM)
        fused = rows.get("fused")
        # The fused kernel's tensor-core work over SDPA's (benchmarks/kernel_work.py): its time ratio to
        # SDPA divided by this is how much slower it runs each product than SDPA does.
        work = {"fused": f"{work_ratios(seq_len, BUCKETS, MAX_REL)['total']:.2f}x", "sdpa": "1x"}
        for impl, row in rows.items():
            if isinstance(row, str):
                print(f"| {seq_len} | {batch} | {impl} | {row} | - | - | - | - | {work.get(impl, '-')} |")
                continue
            ratio = row[1] / fused[1] if isinstance(fused, tuple) else float("nan")
            print(f"| {seq_len} | {batch} | {impl} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.0f} | "
                  f"{flops / row[1] / 1e9:.1f} | {ratio:.2f}x | {work.get(impl, '-')} |")
    longest = max(args.lengths)
    fused = candidates(1, longest, args.device, fused_only=True)["fused"]
    print(f"fused fwd+bwd peak memory at L={longest}, B*h={HEADS}: {peak_mb(forward_backward(fused)):.0f} MB "
          "(inputs' gradients included)")


if __name__ == "__main__":
    main()
