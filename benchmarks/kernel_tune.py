"""Launch-configuration sweep of the fused attention kernel on one GPU, in one command.

Every candidate `Tiles` (the three kernels' tiles, warps and pipeline stages, and the tables'
precision) is compiled first, all at once in parallel worker processes (they fill Triton's on-disk
cache), then timed one after another in this process: forward and forward+backward (median of
CUDA-event timings) with attention dropout 0 and 0.1, bf16, deberta-v3-base heads (h = 12, d = 64,
256 buckets, 2k = 512), c2p + p2c, a padding mask, B x L = --tokens; with the device time of each
phase (the table GEMMs and the fold, the forward kernel, the dQ and dK/dV kernels) from the
profiler. Beside them on the same shapes: SDPA (flash, no position terms), the project's reference
attention and, where installed, DisentangledFlash and FlashDeBERTa (benchmarks/attention_bench.py).
Each candidate's worst error against the float64 reference at the shortest length (output and all
five gradients) is recorded with it, so a fast but wrong configuration cannot win.

The candidates (issue 23), each a change to the tiles this Triton launches with (`launch_tiles`):
forward 128 x 64 at 2 (default) and 3 stages, 128 x 128, 64 x 64 at 4 warps; both backward kernels
128 x 64 at 8 warps (default) and 64 x 64 at 4; 3 stages in the backward (more stages let the
pipeliner prefetch the next tile's loads: static counts cannot price latency); with dropout the
dK/dV kernel stepping 64 queries at one stage instead of 32 (fewer instructions per element,
1.01-1.04 against 1.06-1.15, but it spills 24 B: `compile_check`); tables in the input dtype
(default) against fp32; table blocks by tensor descriptors (default) against masked pointer loads
(which spill 8-528 B and take 1.8-2.1 instructions per element in every tile).

    python benchmarks/kernel_tune.py --out OUT/kernel_tune.json [--lengths 512 2048 8192]
    TRITON_INTERPRET=1 python benchmarks/kernel_tune.py --out x.json --cpu-smoke   # harness check only

Writes the JSON (device, versions, date, one row per candidate) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.attention_bench import (  # noqa: E402
    BUCKETS,
    HEAD_DIM,
    HEADS,
    MAX_REL,
    candidates,
    forward_backward,
    timed,
)
from deberta_ds.atomic_files import write_atomic  # noqa: E402
from deberta_ds.kernels.reference import default_scale, disentangled_attention_reference  # noqa: E402
from deberta_ds.kernels.settings import AttentionSettings  # noqa: E402
from deberta_ds.kernels.triton_attention import Tile, Tiles, fused_backward, fused_forward, launch_tiles  # noqa: E402

LAUNCH = launch_tiles(HEAD_DIM)   # what the kernels launch with under this Triton
CANDIDATES = {
    "default": LAUNCH,
    "forward 3 stages": LAUNCH._replace(forward=Tile(128, 64, 8, 3)),
    "forward 128x128": LAUNCH._replace(forward=Tile(128, 128, 8, 2)),
    "forward 64x64 4 warps": LAUNCH._replace(forward=Tile(64, 64, 4, 2)),
    "backward 64x64 4 warps": LAUNCH._replace(dq=Tile(64, 64, 4, 2), dkdv=Tile(64, 64, 4, 2)),
    "backward 3 stages": LAUNCH._replace(dq=Tile(128, 64, 8, 3), dkdv=Tile(128, 64, 8, 3)),
    "dK/dV dropout 64 queries": LAUNCH._replace(dkdv_dropout=Tile(128, 64, 8, 1)),
    "fp32 tables": LAUNCH._replace(fp32_tables=True),
    "pointer loads": LAUNCH._replace(tma=False),
}
PHASES = {"_forward_kernel": "forward kernel", "_backward_dq_kernel": "dQ kernel",
          "_backward_dkdv_kernel": "dK/dV kernel"}   # every other device kernel: "GEMMs and the rest"


def make_inputs(batch: int, seq_len: int, device: str, seed: int = 0) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter mishandles bf16
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen, dtype=dtype)  # noqa: E731
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    mask[-1, seq_len - seq_len // 8:] = 0                          # one padded tail, as in real batches
    return dict(q=randn(batch, HEADS, seq_len, HEAD_DIM), k=randn(batch, HEADS, seq_len, HEAD_DIM),
                v=randn(batch, HEADS, seq_len, HEAD_DIM), pos_key=randn(HEADS, 2 * BUCKETS, HEAD_DIM),
                pos_query=randn(HEADS, 2 * BUCKETS, HEAD_DIM), attention_mask=mask)


def fused_pass(x: dict, tiles: Tiles, backward: bool, dropout_p: float = 0.0):
    """The output, and with `backward` the gradients (dq, dk, dv, dKr, dQr) for an all-ones dO."""
    settings = AttentionSettings(BUCKETS, MAX_REL, default_scale(HEAD_DIM, x["pos_key"], x["pos_query"]), dropout_p,
                                 "fused")
    tensors = (x["q"], x["k"], x["v"], x["pos_key"], x["pos_query"], x["attention_mask"], None)
    seed = torch.ones(1, dtype=torch.int64, device=x["q"].device)
    out, lse = fused_forward(*tensors, settings, seed, tiles)
    if not backward:
        return out, None
    return out, fused_backward(torch.ones_like(out), *tensors, out, lse, settings, seed, tiles)


def compile_one(tiles: Tiles, seq_len: int, device: str) -> str:
    """Worker: one small call of every kernel of this candidate, with and without dropout."""
    try:
        x = make_inputs(1, seq_len, device)
        fused_pass(x, tiles, backward=True)
        fused_pass(x, tiles, backward=True, dropout_p=0.1)
        return ""
    except Exception as error:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
        return f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"


def worst_error(tiles: Tiles, seq_len: int, device: str) -> float:
    """max |fused - float64 reference| / max |reference| over the output and all five gradients."""
    x = make_inputs(2, seq_len, device, seed=1)
    out, grads = fused_pass(x, tiles, backward=True)
    leaves = [x[name].double().requires_grad_() for name in ("q", "k", "v", "pos_key", "pos_query")]
    expected = disentangled_attention_reference(*leaves, x["attention_mask"], position_buckets=BUCKETS,
                                                max_relative_positions=MAX_REL)
    expected_grads = torch.autograd.grad(expected, leaves, torch.ones_like(expected))
    pairs = [(out, expected), *zip(grads, expected_grads)]
    return max((got.double() - want).abs().max().item() / max(1.0, want.abs().max().item()) for got, want in pairs)


def phases_ms(fn, device: str) -> dict:
    """Device milliseconds of one call of fn per phase (the profiler's CUDA kernel times)."""
    if device != "cuda":
        return {}
    fn()
    out = dict.fromkeys([*PHASES.values(), "GEMMs and the rest"], 0.0)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            fn()
            torch.cuda.synchronize()
        for event in profile.key_averages():
            phase = next((name for kernel, name in PHASES.items() if kernel in event.key), "GEMMs and the rest")
            out[phase] += getattr(event, "device_time_total", 0.0) / 1e3
    except Exception as error:  # noqa: BLE001 - a profiler that fails costs the phases, not the sweep
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    return out


def candidate_row(name: str, tiles: Tiles, lengths, tokens: int, repeats: int, device: str) -> dict:
    row = {"candidate": name, "tiles": tiles._asdict(), "worst_relative_error": worst_error(tiles, min(lengths),
                                                                                             device)}
    for seq_len in lengths:
        x = make_inputs(tokens // seq_len, seq_len, device)
        for dropout_p in (0.0, 0.1):
            row[f"L{seq_len} p{dropout_p}"] = {
                "fwd_ms": timed(lambda: fused_pass(x, tiles, False, dropout_p), repeats),  # noqa: B023
                "fwd_bwd_ms": timed(lambda: fused_pass(x, tiles, True, dropout_p), repeats),  # noqa: B023
                "phases_ms": phases_ms(lambda: fused_pass(x, tiles, True, dropout_p), device)}  # noqa: B023
    return row


def peers(lengths, tokens: int, repeats: int, device: str) -> dict:
    """fwd+bwd ms of SDPA, the reference and the installed peers (a failure is its row's text)."""
    out = {}
    for seq_len in lengths:
        out[f"L{seq_len}"] = {}
        for name, forward in candidates(tokens // seq_len, seq_len, device).items():
            if name in ("fused", "hf"):
                continue
            try:
                out[f"L{seq_len}"][name] = timed(forward_backward(forward), repeats)
            except Exception as error:  # noqa: BLE001 - a failing peer is a row, not the end of the run
                out[f"L{seq_len}"][name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def sweep(lengths, tokens: int, repeats: int, names, device: str) -> dict:
    context = multiprocessing.get_context("spawn")
    tiles = [CANDIDATES[name] for name in names]
    with concurrent.futures.ProcessPoolExecutor(min(len(names), 12), mp_context=context) as pool:
        errors = list(pool.map(compile_one, tiles, [min(lengths)] * len(names), [device] * len(names)))
    rows = []
    for name, candidate, compile_error in zip(names, tiles, errors):
        if compile_error:
            rows.append({"candidate": name, "tiles": candidate._asdict(), "error": compile_error})
            print(f"{name}: {compile_error}", flush=True)
            continue
        rows.append(candidate_row(name, candidate, lengths, tokens, repeats, device))
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "peers": peers(lengths, tokens, repeats, device)}


def print_table(result: dict, lengths) -> None:
    print(f"device: {result['device']}, {result['date']}, torch {result['torch']}, triton {result['triton']}; "
          f"bf16 h={HEADS} d={HEAD_DIM} buckets={BUCKETS}, {result['tokens']} tokens per call; "
          "ms fwd / fwd+bwd, dropout 0 | 0.1")
    print("| candidate | worst rel. error | " + " | ".join(f"L={n}" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for row in result["rows"]:
        if "error" in row:
            print(f"| {row['candidate']} | does not compile: {row['error']} |")
            continue
        cells = [" \\| ".join(f"{row[f'L{n} p{p}']['fwd_ms']:.2f} / {row[f'L{n} p{p}']['fwd_bwd_ms']:.2f}"
                              for p in (0.0, 0.1)) for n in lengths]
        print(f"| {row['candidate']} | {row['worst_relative_error']:.1e} | " + " | ".join(cells) + " |")
    for peer in result["peers"][f"L{lengths[0]}"]:
        cells = [result["peers"][f"L{n}"].get(peer, "-") for n in lengths]
        print(f"| {peer} (fwd+bwd) | | " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c)
                                                         for c in cells) + " |")
    timed_rows = [row for row in result["rows"] if "error" not in row]
    for n in lengths if timed_rows else []:
        best = min(timed_rows, key=lambda row: row[f"L{n} p0.0"]["fwd_bwd_ms"])  # noqa: B023
        cell = best[f"L{n} p0.0"]
        sdpa = result["peers"][f"L{n}"].get("sdpa")
        ratio = f" = {cell['fwd_bwd_ms'] / sdpa:.1f}x SDPA" if isinstance(sdpa, float) else ""
        phases = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in cell["phases_ms"].items())
        print(f"best at L={n}: {best['candidate']}, {cell['fwd_bwd_ms']:.2f} ms fwd+bwd{ratio}"
              + (f" (phases ms: {phases})" if phases else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens", type=int, default=16384, help="B x L per call")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1: harness only")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.lengths, args.tokens, args.repeats, args.candidates = [32, 64], 64, 1, ["default"]
    elif not torch.cuda.is_available():
        raise SystemExit("kernel_tune.py times a GPU; no CUDA device is visible (--cpu-smoke for a harness check)")
    import triton

    device = "cpu" if args.cpu_smoke else "cuda"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: numbers mean nothing)",
              "date": str(datetime.date.today()), "torch": torch.__version__, "triton": triton.__version__,
              "tokens": args.tokens}
    result |= sweep(args.lengths, args.tokens, args.repeats, args.candidates, device)
    write_atomic(args.out, json.dumps(result, indent=1))
    print_table(result, args.lengths)


if __name__ == "__main__":
    main()
