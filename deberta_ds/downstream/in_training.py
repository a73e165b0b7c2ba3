"""eval.downstream during pre-training: after each checkpoint whose step is a multiple of
`every`, rank 0 starts `python -m deberta_ds.evaluate` on that checkpoint (exported on the fly,
with the run's recorded tokenizer) in a process of its own, which writes
OUTPUT/downstream/step_N/ (its table), OUTPUT/downstream/step_N.log, and the medians to the
run's TensorBoard (downstream/TASK/METRIC at step N). Training never waits for it: one runs at a
time (a checkpoint due while one runs is skipped, said in the log), its end is logged at the
next checkpoint, a failure names its log, and nothing it does can stop the run. The child is a
single process: the launcher's rank variables are not passed on.

Sits in the training layer (the trainer calls it) and imports nothing of the tools it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK")


@dataclass
class Running:
    step: int
    process: subprocess.Popen
    log: Path
    out: Path


class DownstreamDuringTraining:
    def __init__(self, settings, output: Path, log, enabled: bool):
        self.settings, self.output, self.log = settings, output, log
        self.enabled = enabled and settings.every > 0
        self.running: Running | None = None

    def command(self, step: int, checkpoint: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "deberta_ds.evaluate", "--model", str(checkpoint), "--tasks",
                self.settings.tasks, "--data-dir", self.settings.data_dir, "--out", str(out), "--seeds", "1",
                "--no-progress", "--tensorboard-dir", str(self.output / "tensorboard"), "--tensorboard-step",
                str(step), *self.settings.arguments]

    def checkpoint_saved(self, step: int, checkpoint: Path) -> None:
        """Start the suite on `checkpoint` when its step is due and none runs; never raises."""
        if not self.enabled or step % self.settings.every:
            return
        try:
            self.poll()
            if self.running is not None:
                self.log(f"eval.downstream: step {step} skipped, the evaluation of step {self.running.step} is "
                         "still running")
                return
            folder = self.output / "downstream"
            folder.mkdir(parents=True, exist_ok=True)
            out, log = folder / f"step_{step:08d}", folder / f"step_{step:08d}.log"
            environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
            with open(log, "w") as handle:
                process = subprocess.Popen(self.command(step, checkpoint, out), stdout=handle, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
            self.running = Running(step, process, log, out)
            self.log(f"eval.downstream: evaluating step {step} in the background (pid {process.pid}, log {log})")
        except Exception as error:  # noqa: BLE001 -- an evaluation must never cost the training run
            self.log(f"eval.downstream: could not start the evaluation of step {step}: {error!r}")

    def poll(self) -> None:
        """Log the end of a finished evaluation."""
        if self.running is None or self.running.process.poll() is None:
            return
        code, running = self.running.process.returncode, self.running
        self.running = None
        if code == 0:
            self.log(f"eval.downstream: step {running.step} evaluated: {running.out / 'results.md'}")
        else:
            self.log(f"eval.downstream: the evaluation of step {running.step} failed (exit code {code}); see "
                     f"{running.log}")

    def close(self) -> None:
        """At the end of the run: log what finished; one still running finishes on its own."""
        if not self.enabled:
            return
        self.poll()
        if self.running is not None:
            self.log(f"eval.downstream: the evaluation of step {self.running.step} is still running (pid "
                     f"{self.running.process.pid}); it writes {self.running.out} and its log {self.running.log}")
