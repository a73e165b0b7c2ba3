"""Peak memory of one training step of the `base` RTD pair, with and without activation checkpointing.

One step = generator + discriminator forward and backward (RTD sampling included, dropout on)
and an AdamW step, at --micro-batch x --length, each mode in a fresh process. Peak memory is
torch.cuda.max_memory_allocated on a GPU and the process's peak resident set on the CPU; the
ratio checkpointed / plain is the figure (target: at most 45%). Also printed: the part of the
peak above the model's weights (what checkpointing can shrink).

    python benchmarks/activation_memory.py                          # CPU: micro-batch 8
    python benchmarks/activation_memory.py --device cuda --micro-batch 32
    python benchmarks/activation_memory.py --device cuda --micro-batch 1 --length 8192   # context extension

Past L = 512 the generator's absolute position table is made L rows long (what a context-extended
checkpoint has; its size is negligible beside the activations). "Per sample" figures divide the
peak above the weights by the micro-batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deberta_ds.config import RTDConfig, preset  # noqa: E402
from deberta_ds.model import ReplacedTokenDetection  # noqa: E402
from deberta_ds.model.encoder import set_activation_checkpointing  # noqa: E402
from deberta_ds.training.metrics import peak_memory_bytes  # noqa: E402


def current_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def one_step(args) -> dict:
    torch.manual_seed(0)
    config = preset("base", attention_impl="auto", max_position_embeddings=max(512, args.length))
    model = ReplacedTokenDetection(RTDConfig(discriminator=config, mask_token_id=config.vocab_size - 1))
    model = model.to(args.device).train()
    set_activation_checkpointing(model, args.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, config.vocab_size - 1, (args.micro_batch, args.length), device=args.device)
    labels = torch.where(torch.rand(ids.shape, device=args.device) < 0.15, ids, -100)
    mask = torch.ones_like(ids)
    weights = current_bytes(args.device)
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        out = model(ids.masked_fill(labels != -100, config.vocab_size - 1), mask, labels,
                    rng=torch.Generator(device=args.device).manual_seed(1))
    out.loss.backward()
    optimizer.step()
    return {"peak_bytes": peak_memory_bytes(args.device), "weights_bytes": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args)))
        return
    rows = {}
    for mode in ("none", "layers"):
        command = [sys.executable, __file__, "--child", "--device", args.device, "--micro-batch",
                   str(args.micro_batch), "--length", str(args.length)]
        command += ["--checkpointing"] if mode == "layers" else []
        rows[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    plain, checkpointed = rows["none"], rows["layers"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (peak resident set)"
    above = [row["peak_bytes"] - row["weights_bytes"] for row in (plain, checkpointed)]
    ratio = checkpointed["peak_bytes"] / plain["peak_bytes"]
    print(f"{datetime.date.today()}, {name}, torch {torch.__version__}: base RTD pair, micro-batch "
          f"{args.micro_batch} x L {args.length}, one step (fwd + bwd + AdamW)")
    print(f"peak without checkpointing {plain['peak_bytes'] / 2 ** 30:.2f} GiB, with "
          f"{checkpointed['peak_bytes'] / 2 ** 30:.2f} GiB: ratio {ratio:.1%} "
          f"(target <= 45%); above the weights: {above[0] / 2 ** 30:.2f} -> {above[1] / 2 ** 30:.2f} GiB, "
          f"ratio {above[1] / above[0]:.1%}; per sample above the weights "
          f"{above[0] / args.micro_batch / 2 ** 30:.3f} -> {above[1] / args.micro_batch / 2 ** 30:.3f} GiB")


if __name__ == "__main__":
    main()
