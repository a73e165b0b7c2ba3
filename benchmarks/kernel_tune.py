"""Launch-configuration sweep of the fused attention kernel on one GPU, in one command.

Every candidate `Tiles(block, num_warps, num_stages)` is compiled first, all of them at once in
parallel worker processes (they fill Triton's on-disk cache; compiling is most of a sweep's
time), then timed one after another in this process: forward and forward+backward (median of
CUDA-event timings), bf16, deberta-v3-base heads (h = 12, d = 64, 256 buckets, 2k = 512),
c2p + p2c, padding mask, B x L = --tokens, beside SDPA (flash) on the same q, k, v without the
position terms as the named peer. Each candidate's worst error against the float64 reference
at L = 512 is recorded with it, so a fast but wrong configuration cannot win. One more row per
length times the packed case: L / 512 documents of 512 tokens with document ids, against the
same tokens as separate samples of 512 (what skipping tiles without a shared document saves).

    python benchmarks/kernel_tune.py --out OUT/kernel_tune.json [--lengths 512 2048 8192]
    TRITON_INTERPRET=1 python benchmarks/kernel_tune.py --out x.json --cpu-smoke   # harness check only

Writes the JSON (device, versions, date, one row per candidate and length) and prints a table.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.attention_bench import BUCKETS, HEAD_DIM, HEADS, MAX_REL, timed  # noqa: E402
from deberta_ds.kernels.reference import default_scale, disentangled_attention_reference  # noqa: E402
from deberta_ds.kernels.triton_attention import DEFAULT_TILES, Tiles, fused_backward, fused_forward  # noqa: E402

# 32 x 32 tiles at 4 and 8 warps, 1 to 3 pipeline stages (3: the default), and 64 x 64 tiles
# (their slot windows are 128 wide, so fewer stages fit in shared memory).
CANDIDATES = [Tiles(32, warps, stages) for warps in (4, 8) for stages in (1, 2)] + [DEFAULT_TILES] + [
    Tiles(64, 4, 2), Tiles(64, 8, 1), Tiles(64, 8, 2)]


def make_inputs(batch: int, seq_len: int, device: str, dtype=torch.bfloat16, seed: int = 0) -> dict:
    dtype = dtype if device == "cuda" else torch.float32  # the interpreter mishandles bf16
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen, dtype=dtype)  # noqa: E731
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    mask[-1, seq_len - seq_len // 8:] = 0                          # one padded tail, as in real batches
    return dict(q=randn(batch, HEADS, seq_len, HEAD_DIM), k=randn(batch, HEADS, seq_len, HEAD_DIM),
                v=randn(batch, HEADS, seq_len, HEAD_DIM), pos_key=randn(HEADS, 2 * BUCKETS, HEAD_DIM),
                pos_query=randn(HEADS, 2 * BUCKETS, HEAD_DIM), attention_mask=mask)


def fused_pass(x: dict, tiles: Tiles, backward: bool, document_ids=None):
    """The output, and with `backward` the gradients (dq, dk, dv, dKr, dQr) for an all-ones dO."""
    scale = default_scale(HEAD_DIM, x["pos_key"], x["pos_query"])
    args = (x["q"], x["k"], x["v"], x["pos_key"], x["pos_query"], x["attention_mask"], BUCKETS, MAX_REL, scale, 0.0, 0)
    out, lse = fused_forward(*args, document_ids=document_ids, tiles=tiles)
    if not backward:
        return out, None
    return out, fused_backward(torch.ones_like(out), *args[:6], out, lse, *args[6:], document_ids=document_ids,
                               tiles=tiles)


def compile_one(tiles: Tiles, seq_len: int, device: str) -> str:
    """Worker: one small call of every kernel of this candidate (fills the compile cache)."""
    try:
        x = make_inputs(1, seq_len, device)
        fused_pass(x, tiles, backward=True)
        fused_pass(x, tiles, backward=True, document_ids=torch.zeros(1, seq_len, dtype=torch.long, device=device))
        return ""
    except Exception as error:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
        return f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"


def worst_error(tiles: Tiles, seq_len: int, device: str) -> float:
    """max |fused - float64 reference| / max |reference| over the output and dq, dk, dv."""
    x = make_inputs(2, seq_len, device, seed=1)
    out, grads_out = fused_pass(x, tiles, backward=True)
    leaves = {name: x[name].double().requires_grad_(name in ("q", "k", "v")) for name in
              ("q", "k", "v", "pos_key", "pos_query")}
    expected = disentangled_attention_reference(*leaves.values(), x["attention_mask"], position_buckets=BUCKETS,
                                                max_relative_positions=MAX_REL)
    expected_grads = torch.autograd.grad(expected, [leaves["q"], leaves["k"], leaves["v"]], torch.ones_like(expected))
    pairs = [(out, expected), *zip(grads_out[:3], expected_grads)]
    return max((got.double() - want).abs().max().item() / max(1.0, want.abs().max().item()) for got, want in pairs)


def document_rows(tiles: Tiles, seq_len: int, document: int, tokens: int, repeats: int, device: str) -> dict:
    """fwd+bwd of packed documents of `document` tokens with ids vs the same tokens as samples."""
    packed = make_inputs(tokens // seq_len, seq_len, device)
    packed["attention_mask"] = torch.ones_like(packed["attention_mask"])
    ids = (torch.arange(seq_len, device=device) // document).expand(tokens // seq_len, seq_len).contiguous()
    separate = make_inputs(tokens // document, document, device)
    separate["attention_mask"] = torch.ones_like(separate["attention_mask"])
    return {"packed_ms": timed(lambda: fused_pass(packed, tiles, True, ids), repeats),
            "separate_ms": timed(lambda: fused_pass(separate, tiles, True), repeats)}


def sweep(lengths, tokens: int, repeats: int, candidates, device: str) -> dict:
    shortest = min(lengths)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(len(candidates), 12), mp_context=context) as pool:
        errors = list(pool.map(compile_one, candidates, [shortest] * len(candidates), [device] * len(candidates)))
    rows = []
    for tiles, compile_error in zip(candidates, errors):
        row = {"block": tiles.block, "num_warps": tiles.num_warps, "num_stages": tiles.num_stages,
               "default": tiles == DEFAULT_TILES}
        if compile_error:
            rows.append(row | {"error": compile_error})
            print(f"{tiles}: {compile_error}", flush=True)
            continue
        row["worst_relative_error"] = worst_error(tiles, shortest, device)
        for seq_len in lengths:
            x = make_inputs(tokens // seq_len, seq_len, device)
            row[f"L{seq_len}"] = {"fwd_ms": timed(lambda: fused_pass(x, tiles, False), repeats),  # noqa: B023
                                  "fwd_bwd_ms": timed(lambda: fused_pass(x, tiles, True), repeats)}  # noqa: B023
            if seq_len > shortest:
                row[f"L{seq_len}"] |= document_rows(tiles, seq_len, shortest, tokens, repeats, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "sdpa": {f"L{seq_len}": sdpa_ms(seq_len, tokens, repeats, device) for seq_len in lengths}}


def sdpa_ms(seq_len: int, tokens: int, repeats: int, device: str) -> dict:
    x = make_inputs(tokens // seq_len, seq_len, device)
    q, k, v = (x[name].detach().requires_grad_(True) for name in ("q", "k", "v"))

    def forward_backward():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    with torch.no_grad():
        fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    return {"fwd_ms": fwd, "fwd_bwd_ms": timed(forward_backward, repeats)}


def print_table(result: dict, lengths) -> None:
    print(f"device: {result['device']}, {result['date']}, torch {result['torch']}, triton {result['triton']}; "
          f"bf16 h={HEADS} d={HEAD_DIM} buckets={BUCKETS}, {result['tokens']} tokens per call; ms fwd / fwd+bwd")
    print("| block | warps | stages | worst rel. error | " + " | ".join(f"L={n}" for n in lengths) + " |")
    print("|---|---|---|---|" + "---|" * len(lengths))
    for row in result["rows"]:
        name = f"| {row['block']} | {row['num_warps']} | {row['num_stages']}{' (default)' if row['default'] else ''} |"
        if "error" in row:
            print(f"{name} does not compile: {row['error']} |")
            continue
        cells = [f"{row[f'L{n}']['fwd_ms']:.2f} / {row[f'L{n}']['fwd_bwd_ms']:.2f}" for n in lengths]
        print(f"{name} {row['worst_relative_error']:.1e} | " + " | ".join(cells) + " |")
    sdpa = [f"{result['sdpa'][f'L{n}']['fwd_ms']:.3f} / {result['sdpa'][f'L{n}']['fwd_bwd_ms']:.3f}" for n in lengths]
    print("| SDPA (flash, no position terms) | | | | " + " | ".join(sdpa) + " |")
    timed_rows = [row for row in result["rows"] if "error" not in row]
    for n in lengths:
        best = min(timed_rows, key=lambda row: row[f"L{n}"]["fwd_bwd_ms"])  # noqa: B023
        best_ms, sdpa = best[f"L{n}"]["fwd_bwd_ms"], result["sdpa"][f"L{n}"]["fwd_bwd_ms"]
        line = (f"best at L={n}: block {best['block']}, {best['num_warps']} warps, {best['num_stages']} stages, "
                f"{best_ms:.2f} ms fwd+bwd = {best_ms / sdpa:.1f}x SDPA")
        if n > lengths[0]:
            line += (f"; packed documents of {lengths[0]} {best[f'L{n}']['packed_ms']:.2f} ms vs the same tokens "
                     f"as samples {best[f'L{n}']['separate_ms']:.2f} ms")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens", type=int, default=16384, help="B x L per call")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1: harness only")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.lengths, args.tokens, args.repeats = [32, 64], 64, 1
    elif not torch.cuda.is_available():
        raise SystemExit("kernel_tune.py times a GPU; no CUDA device is visible (--cpu-smoke for a harness check)")
    import triton

    device = "cpu" if args.cpu_smoke else "cuda"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: numbers mean nothing)",
              "date": str(datetime.date.today()), "torch": torch.__version__, "triton": triton.__version__,
              "tokens": args.tokens}
    candidates = [DEFAULT_TILES] if args.cpu_smoke else CANDIDATES   # the interpreter ignores warps and stages
    result |= sweep(args.lengths, args.tokens, args.repeats, candidates, device)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result, args.lengths)


if __name__ == "__main__":
    main()
