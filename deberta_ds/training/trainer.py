"""RTD + GDES pre-training on DeepSpeed: `python -m deberta_ds.train --config run.yaml [key=value ...]`.

Launch with `deepspeed --num_gpus N --module deberta_ds.train --config run.yaml` (the
launcher's --local_rank is accepted). Everything is validated before the first step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from deberta_ds.data.mixture import MixtureSamples
from deberta_ds.data.random import hash64
from deberta_ds.data.sampler import GlobalBatchSampler
from deberta_ds.data.tokenizer import load_tokenizer
from deberta_ds.errors import UserError
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.context import extend_absolute_positions
from deberta_ds.model.encoder import set_activation_checkpointing
from deberta_ds.model.rtd import compile_training_step
from deberta_ds.parallel.random import seed_streams
from deberta_ds.parallel.state import MPU
from deberta_ds.parallel.state import initialize as initialize_parallel
from deberta_ds.parallel_env import collect_cycles_then_destroy_process_groups, init_distributed
from deberta_ds.training import checkpoint
from deberta_ds.training.data_setup import build_data
from deberta_ds.training.metrics import ScalarLog, TrainingStatistics, peak_memory_bytes, peak_tflops, roc_auc
from deberta_ds.training.model_setup import build_rtd_config
from deberta_ds.training.prefetch import BatchPrefetcher, to_device, to_tensors
from deberta_ds.training.run_config import RunConfig, load_run_config
from deberta_ds.training.run_logs import append_log, log_entry, truncate_log


class TrainingError(UserError):
    """A condition that stops training with a message for the user (exit code 1)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config: a YAML or JSON file (see deberta_ds/training/run_config.py) "
                        "or a shipped recipe by name (python -m deberta_ds.resources recipes lists them)")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from the newest complete checkpoint in OUTPUT/checkpoints, if any "
                             "(default); none: start fresh (refused if checkpoints exist); PATH: continue from that "
                             "complete checkpoint "
                             "folder (refused if OUTPUT/checkpoints holds newer ones)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (same as train.tp=N)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="run-config overrides")
    return parser.parse_args(argv)


def check_writable(folder: Path, what: str = "output_dir") -> None:
    """Fail at start-up, not at the first log line or checkpoint, when `folder` cannot be written."""
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"{what} {folder}: cannot write there ({error}); choose a writable output_dir, or "
                            "move away what stands in the way") from None


def loss_scale(engine) -> float:
    """The dynamic fp16 loss scale (ZeRO optimisers call it cur_scale, FP16_Optimizer loss_scale)."""
    optimizer = engine.optimizer
    return float(optimizer.cur_scale if hasattr(optimizer, "cur_scale") else optimizer.loss_scale)


def sampling_rng(seed: int, first_global_index: int, device: torch.device) -> torch.Generator:
    """Generator on the model's device for the RTD samples of a micro-batch: a function of the
    data, not of the rank or the stage (CPU and CUDA generators draw different, equally valid
    samples from the same seed)."""
    return torch.Generator(device=device).manual_seed(int(hash64(seed, first_global_index)) & ((1 << 63) - 1))


@dataclass
class _LogClock:
    """When this invocation started (and at which step), and the last log step's time and data wait."""
    started: float
    first_step: int
    last_log: float
    data_wait_s: float = 0.0


class Trainer:
    def __init__(self, config: RunConfig, resume: str):
        from deberta_ds.training.engines import RTDEngines

        self.config = config
        self.rank = dist.get_rank()
        self.output = Path(config.output_dir)
        check_writable(self.output)
        self.checkpoints = checkpoint.checkpoints_folder(self.output)
        check_writable(self.checkpoints, "checkpoint folder")
        processor, tokenizer_meta = load_tokenizer(config.data.tokenizer)
        rtd_config = build_rtd_config(config, tokenizer_meta)  # from here on the one copy of the rtd settings
        self.train_samples, self.valid_samples = build_data(config, rtd_config.discriminator, processor,
                                                            tokenizer_meta)  # phased
        self.tokenizer_meta = asdict(tokenizer_meta)
        self.parallel = initialize_parallel(config.train.tp)   # TP ranks adjacent, DP over the rest
        self.dp_rank, self.dp_size = self.parallel.dp_rank, self.parallel.dp_size
        self.accumulation = config.check_batch_geometry(self.dp_size)
        latest = checkpoint.checkpoint_to_resume(resume, self.checkpoints)
        if latest:
            checkpoint.check_resumable(checkpoint.read_state(latest), latest, rtd_config, self.tokenizer_meta)
            self._repair_latest(latest)
        universal = self._needs_universal(checkpoint.read_state(latest) if latest else None)
        torch.manual_seed(config.seed)  # identical initial (full) weights on every rank, at any TP size
        self.model = ReplacedTokenDetection(rtd_config, self.parallel.tp)
        if config.init_from and not latest:
            self._load_initial_weights()
        set_activation_checkpointing(self.model, config.train.activation_checkpointing == "layers")
        self.engines = RTDEngines(self.model, config, self.dp_size, on_cpu=not torch.cuda.is_available(),
                                  mpu=MPU(self.parallel) if config.train.tp > 1 else None,
                                  load_universal=universal)
        self.device = self.engines.device
        if config.train.compiles(self.device):
            compile_training_step(self.model)
        seed_streams(config.seed, self.parallel)  # dropout: per DP replica, plus a per-TP-rank stream for attention
        self.step, self.consumed = 0, 0
        if latest:
            state = checkpoint.load(latest, self.engines.engines, self.rank, universal, self.parallel.tp.tracker)
            self.step, self.consumed = state["step"], state["consumed_samples"]
            phase_start, phase_samples = self.train_samples.phase_at(self.consumed)
            if isinstance(phase_samples, MixtureSamples) and "mixture_counts" in state:  # no replay of the rule
                phase_samples.restore(self.consumed - phase_start, state["mixture_counts"])
            self.log(f"resumed from {latest} at step {self.step} ({self.consumed} samples)")
        if self.rank == 0:  # entries past the checkpoint (or, starting afresh, all) were never kept
            for log in (self.output / "metrics.jsonl", self.output / "eval.jsonl"):
                truncate_log(log, self.step, warn=self.log)
        self.scalars = ScalarLog(self.output / "tensorboard", self.rank == 0)
        self.statistics = TrainingStatistics(self.device)
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0
        self.history: list[dict] = []
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)
        decoupled_es = config.train.mode == "decoupled" and rtd_config.embedding_sharing == "es"  # + a sampling pass
        self.flops_per_token = rtd_config.flops_per_token(config.data.max_length, config.data.masking.probability,
                                                          config.train.micro_batch_size, 1 + decoupled_es)

    def _load_initial_weights(self) -> None:
        """Full weights from init_from, split to this rank's TP shard (any TP size)."""
        from deberta_ds.convert import from_hf
        from deberta_ds.native_checkpoint import load_native
        from deberta_ds.parallel.state_dict_split import partition_plan, split_state

        source = Path(self.config.init_from)
        if (source / "config.json").is_file():  # a Hugging Face checkpoint (built at TP = 1)
            full = from_hf(source, self.config.init_generator_from, as_rtd=True,
                           embedding_sharing=self.model.config.embedding_sharing)
        else:
            full = load_native(source)
        ours = self.model.config.discriminator
        # A longer context than the checkpoint's is an extension (deberta_ds.model.context); any
        # other difference is another model.
        if not isinstance(full, ReplacedTokenDetection) or \
                full.config.discriminator.replace(max_position_embeddings=ours.max_position_embeddings) != ours:
            raise UserError(f"init_from: {source} does not hold an RTD pair with this run's model shape "
                            f"({self.config.model} + model_overrides, vocab {ours.vocab_size})")
        state = full.state_dict()
        if full.config.discriminator.max_position_embeddings != ours.max_position_embeddings:
            state = extend_absolute_positions(state, ours.max_position_embeddings)
            self.log(f"extended the generator's absolute positions from "
                     f"{full.config.discriminator.max_position_embeddings} to {ours.max_position_embeddings}")
        shard = split_state(state, partition_plan(self.model), ours.vocab_size, self.parallel.tp.size,
                            self.parallel.tp.rank)
        self.model.load_state_dict(shard)
        self.log(f"initialised from {source}")

    def _repair_latest(self, folder: Path) -> None:
        """A kill between a checkpoint's COMPLETE and moving `latest` leaves `latest` behind: point it
        at the checkpoint resumed from when that is this run's newest."""
        if self.rank == 0 and folder.parent.resolve() == self.checkpoints.resolve() and \
                checkpoint.repair_latest(self.checkpoints, folder):
            self.log(f"{self.checkpoints / checkpoint.LATEST} named an older checkpoint; it now names {folder.name}, "
                     "the newest complete one")

    def _needs_universal(self, state: dict | None) -> bool:
        """Resuming on another data-parallel size needs DeepSpeed's universal checkpoint."""
        if state is None or state.get("data_parallel_size", state["world_size"]) == self.dp_size:
            return False
        if state.get("tp", 1) != self.config.train.tp:
            raise TrainingError(f"the checkpoint was written with train.tp={state.get('tp', 1)}; resume with the same "
                                "TP size, or merge/split it with python -m deberta_ds.convert")
        if self.config.train.tp > 1:
            raise TrainingError("changing the data-parallel size of a TP > 1 run is not supported; resume on "
                                f"{state['data_parallel_size']} data-parallel replicas")
        return checkpoint.is_sharded(self.config.train.zero_stage, self.config.train.precision)

    def log(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def client_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed, "world_size": dist.get_world_size(),
                "data_parallel_size": self.dp_size, "tp": self.config.train.tp,
                "run_config": checkpoint.run_config_entry(self.config), "rtd_config": asdict(self.model.config),
                "tokenizer": self.tokenizer_meta, "engines": list(self.engines.engines)} | self._mixture_state()

    def _mixture_state(self) -> dict:
        """The current phase's per-source counts, when it trains on a mixture."""
        phase_start, samples = self.train_samples.phase_at(self.consumed)
        if not isinstance(samples, MixtureSamples):
            return {}
        return {"mixture_counts": samples.counts_at(self.consumed - phase_start)}

    def save(self) -> None:
        """This step's checkpoint (kept as it is when it already exists complete). A failed write
        (a full disk, say) stops the run with the last complete checkpoint still `latest`."""
        try:
            folder = checkpoint.save(self.checkpoints, self.engines.engines, self.step, self.client_state(),
                                     self.rank, self.config.train.keep_last,
                                     self.model if self.config.train.tp > 1 else None, self.dp_rank,
                                     self.parallel.tp.tracker)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
            latest = self.checkpoints / checkpoint.LATEST
            kept = f"{latest.read_text().strip()} is still the latest complete checkpoint" if latest.is_file() else \
                "no complete checkpoint exists yet"
            raise TrainingError(f"writing the checkpoint of step {self.step} under {self.checkpoints} failed: "
                                f"{error} (disk full?); {kept}") from None
        self.log(f"saved checkpoint {folder}")

    def train_step(self, micro_batches) -> bool:
        """One optimiser step over this rank's micro-batches [(global indices, host tensors)];
        returns whether some rank asked to stop (agreed with the step's other reductions)."""
        config = self.config.train
        multiplier = 1e30 if config.inject_loss_scale_at_step == self.step else 1.0
        results = []
        for micro, host_batch in micro_batches:
            batch = to_device(host_batch, self.device)
            if config.inject_nan_from_step is not None and self.step >= config.inject_nan_from_step:
                multiplier = float("nan")
            result = self.engines.micro_step(batch, sampling_rng(self.config.seed, int(micro[0]), self.device),
                                             multiplier, stop_requested=self.stop_requested)
            self.statistics.add(result, batch["attention_mask"])
            results.append(result)
        self.consumed += config.global_batch_size
        self.step += 1
        finite = all(result.finite for result in results)
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        self.nonfinite_total += not finite
        if self.nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise TrainingError(f"aborting at step {self.step}: {self.nonfinite_in_a_row} non-finite losses in a row "
                                f"(train.max_nonfinite_steps={config.max_nonfinite_steps}); lower optim.lr, check the "
                                "data, or use bf16 instead of fp16")
        return any(result.stop for result in results)

    def logged_metrics(self) -> dict:
        """The statistics since the last log step (reduced over ranks) and the engines' state."""
        metrics = self.statistics.reduce()
        metrics["train/skipped_nonfinite_steps"] = self.nonfinite_total
        for name, engine in self.engines.engines.items():
            metrics[f"{name}/lr"] = engine.get_lr()[0]
            metrics[f"{name}/grad_norm"] = self.engines.grad_norm(name)
            metrics[f"{name}/loss_scale"] = loss_scale(engine) if self.config.train.precision == "fp16" else None
            metrics[f"{name}/skipped_steps"] = engine.skipped_steps
        phase_start, samples = self.train_samples.phase_at(self.consumed)
        if isinstance(samples, MixtureSamples):  # per source of this phase: samples so far, passes over it
            for source, count in samples.counts_at(self.consumed - phase_start).items():
                metrics[f"data/consumed_samples/{source}"] = count
            for source, epochs in samples.epochs_at(self.consumed - phase_start).items():
                metrics[f"data/epochs/{source}"] = epochs
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """MLM loss/accuracy and RTD loss/accuracy/AUC on fixed held-out batches, gathered over ranks."""
        if self.valid_samples is None:
            return {}
        self.engines.train(False)
        config, sums, scores, labels = self.config.train, torch.zeros(5, device=self.device), [], []
        local = config.global_batch_size // self.dp_size
        for b in range(config.eval_batches):
            start = b * config.global_batch_size + self.dp_rank * local
            batch = to_device(to_tensors(self.valid_samples.batch(np.arange(start, start + local))), self.device)
            result = self.engines.micro_step(batch, sampling_rng(self.config.seed + 1, start, self.device), train=False)
            real = batch["attention_mask"].bool()
            sums += torch.stack([result.generator.loss, result.generator.accuracy, result.discriminator.loss,
                                 result.discriminator.accuracy, torch.ones((), device=self.device)]).float()
            scores.append(result.discriminator.logits.float()[real])
            labels.append(result.discriminator.replaced[real])
        self.engines.train(True)
        local_results = (sums.double().cpu().numpy(), torch.cat(scores).cpu().numpy(), torch.cat(labels).cpu().numpy())
        gathered = [None] * dist.get_world_size()  # TP ranks repeat their replica's values: means are unchanged
        dist.all_gather_object(gathered, local_results)
        total = sum(g[0] for g in gathered)
        return {"eval/mlm_loss": total[0] / total[4], "eval/mlm_accuracy": total[1] / total[4],
                "eval/rtd_loss": total[2] / total[4], "eval/rtd_accuracy": total[3] / total[4],
                "eval/rtd_auc": roc_auc(np.concatenate([g[1] for g in gathered]),
                                        np.concatenate([g[2] for g in gathered])),
                "eval/all_original_baseline": 1.0 - float(np.concatenate([g[2] for g in gathered]).mean())}

    def batch_prefetcher(self) -> BatchPrefetcher:
        """This rank's training batches from the current step on, built in the background."""
        config = self.config.train
        sampler = GlobalBatchSampler(config.global_batch_size, self.dp_rank, self.dp_size, self.consumed)
        return BatchPrefetcher(self.train_samples, sampler, self.accumulation, pin=self.device.type == "cuda")

    def run(self) -> None:
        config = self.config.train
        if self.step >= config.steps:  # a relaunch of a finished run: its checkpoint stays as it is
            if self._final_evaluation_missing():
                self.log(f"the final evaluation of step {self.step} is missing from {self.output / 'eval.jsonl'} (the "
                         "run stopped after its last checkpoint); evaluating now")
                self.report_eval()
                self.scalars.close()
                return
            self.log(f"{self.output} is already trained to step {self.step} (train.steps={config.steps}); nothing "
                     "to do. Raise train.steps to train on.")
            return
        bar = tqdm(total=config.steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        now = time.monotonic()
        clock = _LogClock(started=now, first_step=self.step, last_log=now)
        prefetcher = self.batch_prefetcher()
        try:
            while self.step < config.steps:
                stop = self.train_step(prefetcher.next_step())
                bar.update(1)
                if self.step == 1 or self.step % config.log_every == 0 or self.step == config.steps:
                    metrics = self.logged_metrics() | self._performance(clock, prefetcher.wait_s)
                    self.report(metrics)
                    bar.set_postfix(mlm=f"{metrics['generator/mlm_loss'] or float('nan'):.3f}",
                                    rtd=f"{metrics['discriminator/rtd_loss'] or float('nan'):.3f}")
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                    self.report_eval()  # the last step's evaluation follows the final save
                if stop:
                    self.log("SIGTERM: saving a checkpoint and stopping")
                    self.save()
                    return
                if config.exit_after_steps and self.step - clock.first_step >= config.exit_after_steps:
                    self.log(f"train.exit_after_steps={config.exit_after_steps}: saving a checkpoint and stopping")
                    self.save()
                    return
                if config.save_every and self.step % config.save_every == 0:
                    self.save()
        finally:
            prefetcher.close()
        bar.close()
        self.save()  # before the final evaluation, which must never cost the run its checkpoint
        self.report_eval()
        self.scalars.close()

    def _final_evaluation_missing(self) -> bool:
        """Whether eval.jsonl lacks the final step's row (rank 0 reads it; every rank gets the answer)."""
        if self.valid_samples is None:
            return False
        log, missing = self.output / "eval.jsonl", [None]
        if self.rank == 0:
            entries = [log_entry(line) for line in log.read_text().splitlines()] if log.is_file() else []
            missing = [self.step not in {entry["step"] for entry in entries if entry}]
        dist.broadcast_object_list(missing, src=0)
        return missing[0]

    def _performance(self, clock: _LogClock, data_wait_s: float) -> dict:
        """Throughput since this invocation started, the peak memory so far, and the share of the
        time since the last log step that the loop waited for data (data_wait_s: in all)."""
        now = time.monotonic()
        samples_per_s = (self.step - clock.first_step) * self.config.train.global_batch_size / (now - clock.started)
        tokens_per_s = samples_per_s * self.config.data.max_length
        wait_fraction = (data_wait_s - clock.data_wait_s) / (now - clock.last_log)
        clock.last_log, clock.data_wait_s = now, data_wait_s
        peak = peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        return {"perf/samples_per_s": samples_per_s, "perf/tokens_per_s": tokens_per_s,
                "perf/model_tflops": tokens_per_s * self.flops_per_token / 1e12,
                "perf/mfu": tokens_per_s * self.flops_per_token / 1e12 / peak if peak else None,
                "perf/peak_memory_gb": peak_memory_bytes(self.device) / 2 ** 30,
                "perf/data_wait_fraction": wait_fraction}

    def report(self, metrics: dict) -> None:
        """A log step: TensorBoard, metrics.jsonl and the console."""
        self.record(metrics)
        self.scalars.write(metrics, self.step)
        self.log(f"step {self.step}: " + "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items()
                                                   if k.startswith(("generator/mlm", "discriminator/rtd"))
                                                   and v is not None))

    def record(self, metrics: dict) -> None:
        """A log step's metrics (means since the previous log step), in memory and appended to
        OUTPUT/metrics.jsonl (rank 0); evaluations go to OUTPUT/eval.jsonl."""
        entry = {"step": self.step, "consumed_samples": self.consumed} | metrics
        self.history.append(entry)
        if self.rank == 0:
            append_log(self.output / "metrics.jsonl", entry)

    def report_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.scalars.write(metrics, self.step)
            if self.rank == 0:
                append_log(self.output / "eval.jsonl", {"step": self.step} | metrics)
            self.log(f"eval at step {self.step}: " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()))


def lost_contact(error: RuntimeError) -> bool:
    """Whether a collective failed because a peer or the network went away (a timeout or a closed
    connection in gloo or NCCL), as opposed to a bug, which must surface with its traceback."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(sign in text for sign in (
        "gloo/transport", "Timed out waiting", "Connection closed by peer", "Connection reset by peer",
        "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = args.overrides + ([f"train.tp={args.tp}"] if args.tp else [])
        config = load_run_config(args.config, overrides)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        from deberta_ds.parallel_env import single_process_environment
        os.environ.update(single_process_environment())
    if os.environ.get("DEBERTA_DS_CPU_FP16") == "1":  # testing aid: DeepSpeed refuses fp16 without mkldnn fp16
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True
    init_distributed(timeout_s=config.train.collective_timeout_s)
    try:
        Trainer(config, args.resume).run()  # no name keeps the engines alive past the run
    except UserError as error:  # a bad config or file; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        reason = str(error).strip().splitlines()[0]
        print(f"error: rank {dist.get_rank()} lost contact with the other ranks ({reason}); "
              f"a node or the network failed (train.collective_timeout_s={config.train.collective_timeout_s}). "
              "Relaunch the same command to resume from the last complete checkpoint", file=sys.stderr)
        return 1
    finally:
        collect_cycles_then_destroy_process_groups()
    return 0
