"""Encoder forward+backward: deberta_ds vs transformers.DebertaV2Model on the same weights.

Timed alternately in one process (median of N rounds); peak memory is the growth of the
peak resident set over one step of each model in a fresh process (median of 3, Linux only).

    python benchmarks/model_bench.py [--rounds 10] [--batch 8 --length 256]
"""

from __future__ import annotations

import argparse
import gc
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from deberta_ds.config import preset  # noqa: E402
from deberta_ds.hf_format import encoder_from_hf  # noqa: E402
from deberta_ds.hf_oracle import random_hf_model  # noqa: E402


def build(args, hf_dir: str):
    config = preset("tiny", vocab_size=8000, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.hidden // 64, intermediate_size=4 * args.hidden, position_buckets=256,
                    max_relative_positions=512, hidden_dropout=0.0, attention_dropout=0.0,
                    attention_impl="reference")
    hf = random_hf_model(config)
    hf.save_pretrained(hf_dir)
    return hf.train(), encoder_from_hf(hf_dir).train(), config


def step(model, ids, mask, is_hf: bool) -> None:
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state if is_hf else model(ids, mask)
    out.float().pow(2).mean().backward()


def _proc_status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mb(model, ids, mask, is_hf: bool) -> float:
    """Peak resident-memory growth of one step: Linux resets VmHWM on writing 5 to clear_refs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _proc_status_mb("VmRSS")
    step(model, ids, mask, is_hf)
    return _proc_status_mb("VmHWM") - before


def fresh_process_peak_mb(which: str, hf_dir: str, args) -> float:
    """One step of one model in a new process, so no allocator cache from earlier steps hides memory."""
    code = (f"import sys; sys.argv = ['x'] + {sys.argv[1:]!r}; sys.path.insert(0, {str(REPO)!r}); "
            f"import benchmarks.model_bench as b; b.memory_child({which!r}, {hf_dir!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(which: str, hf_dir: str) -> None:
    args = parse_args()
    if which == "hf":
        from transformers import DebertaV2Model
        model = DebertaV2Model.from_pretrained(hf_dir).train()
    else:
        model = encoder_from_hf(hf_dir).train()
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (args.batch, args.length))
    print(peak_memory_mb(model, ids, torch.ones_like(ids), which == "hf"))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    hf_dir = tempfile.mkdtemp(prefix="model_bench_")
    hf, ours, config = build(args, hf_dir)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.length))
    mask = torch.ones_like(ids)
    mask[0, args.length // 2:] = 0
    for model, is_hf in ((hf, True), (ours, False)):  # warm-up
        step(model, ids, mask, is_hf)
    times = {"hf": [], "ours": []}
    for _ in range(args.rounds):
        for name, model, is_hf in (("hf", hf, True), ("ours", ours, False)):
            start = time.perf_counter()
            step(model, ids, mask, is_hf)
            times[name].append(time.perf_counter() - start)
    hf_ms, ours_ms = (statistics.median(times[n]) * 1e3 for n in ("hf", "ours"))
    hf_mb = statistics.median(fresh_process_peak_mb("hf", hf_dir, args) for _ in range(3))
    ours_mb = statistics.median(fresh_process_peak_mb("ours", hf_dir, args) for _ in range(3))
    shutil.rmtree(hf_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"shape: B={args.batch} L={args.length} H={args.hidden} layers={args.layers} buckets=256")
    print("| model | fwd+bwd ms (median) | peak RSS growth MB |")
    print("|---|---|---|")
    print(f"| transformers DebertaV2Model | {hf_ms:.1f} | {hf_mb:.0f} |")
    print(f"| deberta_ds Encoder | {ours_ms:.1f} | {ours_mb:.0f} |")
    print(f"| ratio ours / HF | {ours_ms / hf_ms:.2f} | {ours_mb / hf_mb:.2f} |")


if __name__ == "__main__":
    main()
