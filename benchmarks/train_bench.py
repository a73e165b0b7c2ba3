"""Pre-training throughput on one GPU: deberta_ds against the peers people train with today.

Systems, each in its own process (clean peak memory), on the same token batches (the built-in
corpus through this repo's data prep, masked by PretrainingSamples):
  deberta_ds    the `base` RTD pair (generator + discriminator), GDES, decoupled, bf16, ZeRO-2,
                the trainer's own loop (prefetcher, engines, attention_impl auto: the fused kernel,
                train.compile's default: compiled encoder layers)
  deberta_ds-reference  the same with attention_impl reference (the unfused attention): the
                alternative `auto` chooses against (the first GPU run's attention bench had the
                reference's forward+backward faster than the fused kernel's, at 6-68x its memory)
  hf-deberta    transformers DebertaV2ForMaskedLM at the discriminator's shape, eager attention,
                bf16 autocast, torch AdamW (fused)
  hf-deberta-df the same with DisentangledFlash's fused training attention (optimize_deberta_training)
  modernbert    transformers ModernBertForMaskedLM at its base shape, bf16 autocast, AdamW (fused)
Each runs --warmup steps, then times --steps steps (CUDA-synchronised wall clock). The micro-batch
starts at --micro-batch and halves on out-of-memory until a step fits ("as large as fits").

Model FLOPs per token are the matrix products each system performs per token in a training
step (forward + backward, counted as torch.utils.flop_counter counts them; tests/test_flops.py
checks each count against FlopCounterMode): deberta_ds's from RTDConfig.flops_per_token (the
generator's vocabulary head on the masked rows only, the EMD's two passes, c2p and p2c), HF
DeBERTa's from ModelConfig.mlm_training_flops (its LM head on every token), ModernBERT's from
modernbert_training_flops (its sliding-window layers attend to 2 x 64 + 1 keys). MFU = tokens/s x
FLOPs per token / the card's dense bf16 peak (read from the device name). Writes
OUT/train_bench.json ({system: {tokens_per_s, model_tflops, mfu, peak_memory_gb, micro_batch,
data_wait_fraction, ...} or {unavailable: reason}}) and prints a table with MFU ratios.

    python benchmarks/train_bench.py --out OUT            # on a GPU
    python benchmarks/train_bench.py --out OUT --cpu-smoke   # tiny shapes on the CPU: harness check only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from deberta_ds.training.metrics import peak_tflops  # noqa: E402  (after the path above)

SYSTEMS = ("deberta_ds", "deberta_ds-reference", "hf-deberta", "hf-deberta-df", "modernbert")


def modernbert_training_flops(config, seq_len: int, batch: int, sliding_window: bool = True) -> float:
    """Model FLOPs of one ModernBERT MLM training step (forward + backward = 3 x forward): per
    layer Wqkv, Wo, the GLU's Wi (2 x intermediate) and Wo, QK^T and PV over the keys each query
    sees (all L in global layers; |i - j| <= local_attention / 2 in sliding-window layers when
    `sliding_window`, else all L, which is what eager/SDPA attention computes before masking),
    then the head (dense + tied decoder) on every token (sparse_prediction off)."""
    hidden, tokens = config.hidden_size, batch * seq_len
    half = config.local_attention // 2
    window_pairs = sum(min(seq_len - 1, i + half) - max(0, i - half) + 1 for i in range(seq_len))
    forward = 0.0
    for layer_type in config.layer_types:
        pairs = window_pairs if sliding_window and layer_type == "sliding_attention" else seq_len * seq_len
        forward += 2.0 * tokens * hidden * (4 * hidden + 3 * config.intermediate_size) + 4.0 * batch * pairs * hidden
    forward += 2.0 * tokens * hidden * (hidden + config.vocab_size)
    return 3.0 * forward


def prepare_data(folder: Path, corpus_bytes: int, vocab_size: int) -> dict:
    """Tokenizer and shards of the built-in corpus (no download), built once per benchmark."""
    from data_prep.cli import main as data_prep

    if not (folder / "shards_00000.idx").exists():
        data_prep(["default-corpus", "--output", str(folder / "corpus.txt"), "--max-bytes", str(corpus_bytes)])
        data_prep(["train-tokenizer", "--input", str(folder / "corpus.txt"), "--output-dir", str(folder / "tok"),
                   "--vocab-size", str(vocab_size)])
        data_prep(["tokenize", "--input", str(folder / "corpus.txt"), "--output-prefix", str(folder / "shards"),
                   "--tokenizer", str(folder / "tok"), "--no-progress"])
    return {"train": str(folder / "shards_00000"), "tokenizer": str(folder / "tok")}


def shape(smoke: bool) -> dict:
    if smoke:
        return {"preset": "tiny", "seq_len": 64, "vocab": 4096}
    return {"preset": "base", "seq_len": 512, "vocab": 128100}


def run_deberta_ds(args, data: dict, micro_batch: int) -> dict:
    from deberta_ds.parallel_env import init_distributed, single_process_environment
    from deberta_ds.training.run_config import run_config_from_dict
    from deberta_ds.training.trainer import Trainer

    os.environ.update({k: v for k, v in single_process_environment().items() if k not in os.environ})
    if not torch.distributed.is_initialized():
        init_distributed()
    dims = shape(args.cpu_smoke)
    steps = args.warmup + args.steps
    config = run_config_from_dict({
        "model": dims["preset"], "seed": 1, "output_dir": str(Path(args.out) / f"{args.system}_run"),
        "model_overrides": {"vocab_size": dims["vocab"],
                            "attention_impl": "reference" if args.system == "deberta_ds-reference" else "auto"},
        "data": {"train": [data["train"]], "tokenizer": data["tokenizer"], "max_length": dims["seq_len"]},
        "optim": {"lr": 1e-4, "warmup_steps": 10},
        "train": {"steps": steps, "global_batch_size": micro_batch, "micro_batch_size": micro_batch,
                  "mode": "decoupled", "precision": "bf16", "zero_stage": 2, "log_every": 10 ** 9}})
    trainer = Trainer(config, resume="none")
    prefetcher = trainer.batch_prefetcher()
    try:
        for _ in range(args.warmup):
            trainer.train_step(prefetcher.next_step())
        synchronize()
        waited, start = prefetcher.wait_s, time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(prefetcher.next_step())
        synchronize()
        elapsed = time.perf_counter() - start
        wait_fraction = (prefetcher.wait_s - waited) / elapsed
        if args.profile_steps:
            write_profile(profile_steps(trainer, prefetcher, args.profile_steps),
                          Path(args.out) / f"profile_{args.system}.md", args.system)
    finally:
        prefetcher.close()
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"elapsed_s": elapsed, "tokens": args.steps * micro_batch * dims["seq_len"],
            "flops_per_token": trainer.flops_per_token, "params": params, "data_wait_fraction": wait_fraction,
            "attention_impl": trainer.model.config.discriminator.attention_impl}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def profile_steps(trainer, prefetcher, steps: int) -> dict:
    """torch.profiler over `steps` training steps: the top 30 device kernels by time (CPU ops on a
    CPU machine), the device's idle gaps between kernels (time the GPU waited for the host), and
    the host synchronisations (the calls in SYNC_CALLS)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(prefetcher.next_step())
        synchronize()
    averages = prof.key_averages()
    on_device = torch.cuda.is_available()
    timed = [e for e in averages if (e.self_device_time_total if on_device else e.self_cpu_time_total) > 0
             and (not on_device or e.device_type.name == "CUDA")]
    timed.sort(key=lambda e: e.self_device_time_total if on_device else e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_device_time_total if on_device else e.self_cpu_time_total for e in timed)
    top = [{"name": e.key[:90], "calls": e.count, "ms": (e.self_device_time_total if on_device
                                                           else e.self_cpu_time_total) / 1e3} for e in timed[:30]]
    syncs = {name: sum(e.count for e in averages if e.key == name) for name in SYNC_CALLS}
    kernels = sorted(((e.time_range.start, e.time_range.end) for e in prof.events()
                      if on_device and e.device_type.name == "CUDA"), key=lambda r: r[0])
    gaps, reach = [], kernels[0][1] if kernels else 0
    for start, end in kernels[1:]:
        if start > reach:
            gaps.append(start - reach)
        reach = max(reach, end)
    span = (kernels[-1][1] - kernels[0][0]) if kernels else 0
    return {"steps": steps, "total_kernel_ms": total_us / 1e3, "top": top, "syncs": syncs,
            "idle_gaps": {"count": len(gaps), "total_ms": sum(gaps) / 1e3, "span_ms": span / 1e3,
                          "over_100us": sum(g > 100 for g in gaps), "largest_ms": max(gaps, default=0) / 1e3}}


def write_profile(summary: dict, path: Path, system: str) -> None:
    gaps = summary["idle_gaps"]
    lines = [f"# {system}: {summary['steps']} profiled training steps",
             f"kernel time {summary['total_kernel_ms']:.1f} ms; device idle between kernels "
             f"{gaps['total_ms']:.1f} ms of "
             f"{gaps['span_ms']:.1f} ms ({gaps['count']} gaps, {gaps['over_100us']} over 100 us, largest "
             f"{gaps['largest_ms']:.2f} ms)",
             "host syncs: " + ", ".join(f"{name} {count}" for name, count in summary["syncs"].items()),
             "", "| kernel | calls | ms |", "|---|---|---|"]
    lines += [f"| {row['name']} | {row['calls']} | {row['ms']:.2f} |" for row in summary["top"]]
    path.write_text("\n".join(lines) + "\n")


def hf_model(system: str, smoke: bool, micro_batch: int):
    """The peer's model at its shape (the discriminator's for DeBERTa, base for ModernBERT) and its
    model FLOPs per token at `micro_batch`."""
    from deberta_ds.config import preset
    from deberta_ds.hf_format import model_config_to_hf

    dims = shape(smoke)
    if system == "modernbert":
        from transformers import ModernBertConfig, ModernBertForMaskedLM

        tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    vocab_size=dims["vocab"])
        config = ModernBertConfig(pad_token_id=0, **(tiny if smoke else {}))  # our [PAD] is 0
        tokens = micro_batch * dims["seq_len"]
        return ModernBertForMaskedLM(config), modernbert_training_flops(config, dims["seq_len"], micro_batch) / tokens
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    ours = preset(dims["preset"], vocab_size=dims["vocab"])
    config = DebertaV2Config(**model_config_to_hf(ours))
    config._attn_implementation = "eager"
    model = DebertaV2ForMaskedLM(config)
    if system == "hf-deberta-df":
        from disentangled_flash import optimize_deberta_training
        optimize_deberta_training(model.deberta, backend="triton")
    return model, ours.mlm_training_flops(dims["seq_len"], micro_batch) / (micro_batch * dims["seq_len"])


def run_hf(args, data: dict, micro_batch: int) -> dict:
    from deberta_ds.data.tokenizer import load_tokenizer
    from deberta_ds.training.data_setup import build_data
    from deberta_ds.training.model_setup import build_rtd_config
    from deberta_ds.training.prefetch import to_device, to_tensors
    from deberta_ds.training.run_config import run_config_from_dict

    dims = shape(args.cpu_smoke)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    model, flops_per_token = hf_model(args.system, args.cpu_smoke, micro_batch)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    config = run_config_from_dict({"model": dims["preset"], "data": {
        "train": [data["train"]], "tokenizer": data["tokenizer"], "max_length": dims["seq_len"]}})
    processor, meta = load_tokenizer(data["tokenizer"])
    samples, _ = build_data(config, build_rtd_config(config, meta).discriminator, processor, meta)

    def step(index: int) -> None:
        indices = range(index * micro_batch, (index + 1) * micro_batch)
        batch = to_device(to_tensors(samples.batch(list(indices))), device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(args.warmup):
        step(index)
    synchronize()
    start = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        step(index)
    synchronize()
    params = sum(p.numel() for p in model.parameters())
    return {"elapsed_s": time.perf_counter() - start, "tokens": args.steps * micro_batch * dims["seq_len"],
            "flops_per_token": flops_per_token, "params": params}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(args) -> None:
    """One system in this process: halve the micro-batch on OOM, then write its JSON row."""
    data = json.loads(Path(args.data).read_text())
    micro_batch = args.micro_batch
    while True:
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            run = run_deberta_ds if args.system.startswith("deberta_ds") else run_hf
            row = run(args, data, micro_batch)
            break
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise
            micro_batch //= 2
            gc.collect()
            torch.cuda.empty_cache()
            print(f"{args.system}: out of memory, micro-batch {micro_batch}", flush=True)
    row["micro_batch"] = micro_batch
    row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    Path(args.row).write_text(json.dumps(row))


def finish(row: dict, device_name: str) -> dict:
    tokens_per_s = row["tokens"] / row["elapsed_s"]
    tflops = tokens_per_s * row["flops_per_token"] / 1e12
    peak = peak_tflops(device_name)
    return row | {"tokens_per_s": tokens_per_s, "model_tflops": tflops, "mfu": tflops / peak if peak else None}


def driver(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out / "data", *((400_000, 1000) if args.cpu_smoke else (2_000_000, 4000)))
    (out / "data.json").write_text(json.dumps(data))
    device_name = "cpu (smoke run: numbers mean nothing)" if args.cpu_smoke else torch.cuda.get_device_name()
    results = {"device": device_name, "date": str(datetime.date.today()), "torch": torch.__version__,
               "peak_bf16_tflops": peak_tflops(device_name), "systems": {}}
    for system in args.systems:
        row_file = out / f"row_{system}.json"
        row_file.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--child", "--system", system, "--data", str(out / "data.json"),
                   "--row", str(row_file), "--out", str(out), "--micro-batch", str(args.micro_batch),
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
        command += ["--cpu-smoke"] if args.cpu_smoke else []
        command += ["--profile-steps", str(args.profile_steps)] if args.profile_steps else []
        process = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
        if process.returncode == 0 and row_file.exists():
            results["systems"][system] = finish(json.loads(row_file.read_text()), device_name)
        else:
            lines = (process.stderr or process.stdout).strip().splitlines() or ["no output"]
            results["systems"][system] = {"unavailable": lines[-1][:300]}
        print(f"{system}: {results['systems'][system]}", flush=True)
    (out / "train_bench.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(f"device: {results['device']}, date: {results['date']}, torch {results['torch']}, "
          f"dense bf16 peak {results['peak_bf16_tflops']} TFLOP/s")
    print("| system | micro-batch | tokens/s | model TFLOP/s | MFU | MFU / HF DeBERTa's | peak GB | data wait |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = results["systems"].get("hf-deberta", {}).get("mfu")
    for system, row in results["systems"].items():
        if "unavailable" in row:
            print(f"| {system} | unavailable: {row['unavailable']} |||||||")
            continue
        ratio = f"{row['mfu'] / baseline:.2f}x" if row["mfu"] and baseline else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        peak = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
        wait = f"{row['data_wait_fraction']:.1%}" if "data_wait_fraction" in row else "-"
        print(f"| {system} | {row['micro_batch']} | {row['tokens_per_s']:.0f} | {row['model_tflops']:.1f} | {mfu} | "
              f"{ratio} | {peak} | {wait} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for train_bench.json, the data and the runs")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--micro-batch", type=int, default=None, help="first micro-batch tried (halved on OOM)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--timeout-s", type=float, default=300, help="per system")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the harness only")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="deberta_ds systems: after the timed steps, profile this many more and write "
                             "OUT/profile_<system>.md (top 30 kernels, device idle gaps, host syncs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smoke_defaults = {"micro_batch": 2, "warmup": 1, "steps": 2}
    gpu_defaults = {"micro_batch": 64, "warmup": 10, "steps": 20}
    for name, value in (smoke_defaults if args.cpu_smoke else gpu_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("train_bench.py measures a GPU; no CUDA device is visible (--cpu-smoke for a harness check)")
    if args.child:
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
