"""The training loop: the trainer builds the run from its components (data, model, engines,
checkpoints, run log, evaluation, initial weights) and steps, logs, evaluates and saves.
The command line is deberta_ds/train.py's (`python -m deberta_ds.train`)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from deberta_ds.checkpoint_reader import LATEST, checkpoints_folder, is_sharded
from deberta_ds.data.mixture import MixtureSamples
from deberta_ds.data.sampler import GlobalBatchSampler
from deberta_ds.downstream.in_training import DownstreamDuringTraining
from deberta_ds.errors import UserError
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.encoder import set_activation_checkpointing
from deberta_ds.model.rtd import compile_training_step
from deberta_ds.parallel.random import seed_streams
from deberta_ds.parallel.state import MPU
from deberta_ds.parallel.state import initialize as initialize_parallel
from deberta_ds.training import checkpoint
from deberta_ds.training.engines import RTDEngines, loss_scale, sampling_rng
from deberta_ds.training.evaluation import evaluate
from deberta_ds.training.initial_weights import load_initial_weights
from deberta_ds.training.metrics import TrainingStatistics, peak_memory_bytes, peak_tflops
from deberta_ds.training.prefetch import BatchPrefetcher, to_device
from deberta_ds.training.run_config import RunConfig
from deberta_ds.training.run_logs import RunLog
from deberta_ds.training.run_start import RunStart, finished_message, prepare


class TrainingError(UserError):
    """A condition that stops training with a message for the user (exit code 1)."""


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


@dataclass
class _LogClock:
    """When this invocation started (and at which step), and the last log step's time and data wait."""
    started: float
    first_step: int
    last_log: float
    data_wait_s: float = 0.0


class Trainer:
    """One run: built from the run config (resuming per `resume`), then `run()` trains to
    train.steps, logging, evaluating and saving on the way."""

    def __init__(self, config: RunConfig, resume: str, start: RunStart | None = None):
        """start: the run's checked inputs (run_start.prepare(config, resume)), prepared here when None."""
        start = start or prepare(config, resume)
        self.config = config
        self.rank = dist.get_rank()
        self.output = Path(config.output_dir)
        check_writable(self.output)
        self.run_log = RunLog(self.output, self.rank)
        self.log = self.run_log.console
        self.checkpoints = checkpoints_folder(self.output)
        check_writable(self.checkpoints, "checkpoint folder")
        rtd_config = start.rtd_config  # from here on the one copy of the rtd settings
        self.train_samples, self.valid_samples = start.train_samples, start.valid_samples  # phased
        self.tokenizer_meta = asdict(start.tokenizer_meta)
        self.parallel = initialize_parallel(config.train.tp)   # TP ranks adjacent, DP over the rest
        self.dp_rank, self.dp_size = self.parallel.dp_rank, self.parallel.dp_size
        self.accumulation = config.check_batch_geometry(self.dp_size)
        latest, universal = self._resume_point(start)
        torch.manual_seed(config.seed)  # identical initial (full) weights on every rank, at any TP size
        self.model = ReplacedTokenDetection(rtd_config, self.parallel.tp)
        if config.init_from and not latest:
            load_initial_weights(self.model, config, self.log)
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
            self._restore(latest, universal)
        self.run_log.start(self.step)
        self.downstream = DownstreamDuringTraining(config.eval.downstream, self.output, self.log, self.rank == 0)
        self.statistics = TrainingStatistics(self.device)
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0
        self.stop_signal = None  # the name of the signal that asked this rank to save and stop
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        decoupled_es = config.train.mode == "decoupled" and rtd_config.embedding_sharing == "es"  # + a sampling pass
        self.flops_per_token = rtd_config.flops_per_token(config.data.max_length, config.data.masking.probability,
                                                          config.train.micro_batch_size, 1 + decoupled_es)

    def _resume_point(self, start: RunStart) -> tuple[Path | None, bool]:
        """The checkpoint to resume from (checked by run_start.prepare; None: start afresh), with the
        settings that changed, and whether it loads through DeepSpeed's universal format."""
        if start.checkpoint:
            self._repair_latest(start.checkpoint)
            for change in start.changes:
                self.log(f"resume: {change}")
        return start.checkpoint, self._needs_universal(start.state)

    def _restore(self, folder: Path, universal: bool) -> None:
        """The engines, RNG states, step and data position of the checkpoint resumed from; the run
        config's learning rates from its step on."""
        state = checkpoint.load(folder, self.engines.engines, self.rank, universal, self.parallel.tp.tracker,
                                verified=True)
        self.engines.set_learning_rates()
        self.step, self.consumed = state["step"], state["consumed_samples"]
        phase_start, phase_samples = self.train_samples.phase_at(self.consumed)
        if isinstance(phase_samples, MixtureSamples) and "mixture_counts" in state:  # no replay of the rule
            phase_samples.restore(self.consumed - phase_start, state["mixture_counts"])
        self.log(f"resumed from {folder} at step {self.step} ({self.consumed} samples)")

    def _repair_latest(self, folder: Path) -> None:
        """A kill between a checkpoint's COMPLETE and moving `latest` leaves `latest` behind: point it
        at the checkpoint resumed from when that is this run's newest."""
        if self.rank == 0 and folder.parent.resolve() == self.checkpoints.resolve() and \
                checkpoint.repair_latest(self.checkpoints, folder):
            self.log(f"{self.checkpoints / LATEST} named an older checkpoint; it now names {folder.name}, "
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
        return is_sharded(self.config.train.zero_stage, self.config.train.precision)

    def _on_stop_signal(self, signum, frame) -> None:
        """SIGTERM or SIGINT (Ctrl-C): save at the end of this step and stop; a second Ctrl-C quits at
        once, without a checkpoint. os.write: printing inside a signal handler may re-enter print."""
        name = signal.Signals(signum).name
        if self.stop_signal and signum == signal.SIGINT:
            os.write(2, b"\nSIGINT again: quitting at once, without a checkpoint\n")
            os._exit(130)
        self.stop_signal = self.stop_signal or name
        os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping (Ctrl-C again quits at once, "
                    "without one)\n".encode())

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
        stops the run naming the file (checkpoint.CheckpointWriteError) with the last complete
        checkpoint still `latest`; a peer lost at a barrier reaches the lost-peer handler."""
        folder = checkpoint.save(self.checkpoints, self.engines.engines, self.step, self.client_state(),
                                 self.rank, self.config.train.keep_last,
                                 self.model if self.config.train.tp > 1 else None, self.dp_rank,
                                 self.parallel.tp.tracker)
        self.log(f"saved checkpoint {folder}")
        self.downstream.checkpoint_saved(self.step, folder)

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
                                             multiplier, stop_requested=self.stop_signal is not None)
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

    def batch_prefetcher(self) -> BatchPrefetcher:
        """This rank's training batches from the current step on, built in the background."""
        config = self.config.train
        sampler = GlobalBatchSampler(config.global_batch_size, self.dp_rank, self.dp_size, self.consumed)
        return BatchPrefetcher(self.train_samples, sampler, self.accumulation, pin=self.device.type == "cuda")

    def run(self) -> None:
        config = self.config.train
        if self.step >= config.steps:  # a relaunch of a finished run: its checkpoint stays as it is
            if self.valid_samples is not None and not self.run_log.has_evaluation(self.step):
                self.log(f"the final evaluation of step {self.step} is missing from {self.output / 'eval.jsonl'} (the "
                         "run stopped after its last checkpoint); evaluating now")
                self.report_eval()
                self.run_log.close()
                return
            self.log(finished_message(self.config, self.step))
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
                    self.run_log.training(self.step, self.consumed, metrics, eta=self._eta(clock))
                    bar.set_postfix(mlm=f"{metrics['generator/mlm_loss'] or float('nan'):.3f}",
                                    rtd=f"{metrics['discriminator/rtd_loss'] or float('nan'):.3f}")
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                    self.report_eval()  # the last step's evaluation follows the final save
                if stop:
                    self.log(f"{self.stop_signal or 'a signal to another rank'}: saving a checkpoint and stopping")
                    self.save()
                    return
                if config.exit_after_steps and self.step - clock.first_step >= config.exit_after_steps:
                    self.log(f"train.exit_after_steps={config.exit_after_steps}: saving a checkpoint and stopping")
                    self.save()
                    return
                if config.save_every and self.step % config.save_every == 0 and self.step < config.steps:
                    self.save()  # the last step's checkpoint is written after the loop's checks
        finally:
            prefetcher.close()
        bar.close()
        if self.nonfinite_in_a_row:
            raise TrainingError(f"the last {self.nonfinite_in_a_row} steps (to step {self.step}) had non-finite "
                                "losses: the run did not end well and writes no final checkpoint (the last complete "
                                "one stays); lower optim.lr, check the data, or use bf16 instead of fp16")
        self.save()  # before the final evaluation, which must never cost the run its checkpoint
        self.report_eval()
        self.downstream.close()
        self.run_log.close()

    def _eta(self, clock: _LogClock) -> str:
        """The time left to train.steps at this invocation's pace so far, as H:MM:SS."""
        done = self.step - clock.first_step
        left_s = (time.monotonic() - clock.started) / done * (self.config.train.steps - self.step)
        return time.strftime("%H:%M:%S", time.gmtime(left_s)) if left_s < 86400 else f"{left_s / 86400:.1f} days"

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

    def report_eval(self) -> None:
        if self.valid_samples is not None:
            self.run_log.evaluation(self.step, evaluate(self.engines, self.valid_samples, self.config, self.dp_rank,
                                                        self.dp_size))
