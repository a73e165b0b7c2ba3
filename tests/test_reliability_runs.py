"""Runs as the user meets them through `python -m deberta_ds.train`: resuming with changed
settings (one policy: applies from the resume step, said in the log, or refused naming the way),
a relaunch of a finished run on another process count, one run per output_dir, Ctrl-C, and a
run whose last steps were non-finite. The session's finished 4-step run (conftest.finished_run) is
copied; the policy's refusals and the finished-run relaunch are checked in this process (they happen
before DeepSpeed starts)."""

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deberta_ds import train
from deberta_ds.errors import UserError
from deberta_ds.training.run_config import run_config_from_dict
from deberta_ds.training.run_start import prepare
from tests.proc_helpers import HOLD_LOCK, REPO, signal_a_training_run, train_cli, write_run
from tests.run_helpers import copy_of, snapshot
from tests.train_helpers import tiny_run


def copy_run(finished_run: dict, tmp_path: Path) -> tuple[dict, Path]:
    """A copy of the shared finished run (conftest.finished_run): its run config and config file."""
    _, config = copy_of(finished_run, tmp_path, "run")
    return json.loads(config.read_text()), config


REFUSED = [  # (changed section, the message's start)
    ({"train": {"zero_stage": 0}}, "train.zero_stage: 2 in the checkpoint"),
    ({"train": {"precision": "bf16"}}, "train.precision: 'fp32' in the checkpoint"),
    ({"train": {"global_batch_size": 16}}, "train.global_batch_size: 8 in the checkpoint"),
    ({"seed": 8}, "seed: 7 in the checkpoint"),
    ({"optim": {"weight_decay": 0.1}}, "optim.weight_decay: 0.01 in the checkpoint"),
    ({"data": {"max_length": 32}}, "data.max_length: 64 in the checkpoint"),
]


@pytest.mark.slow
def test_resume_with_changed_settings_follows_one_policy(finished_run, tmp_path, monkeypatch):
    """Refused settings name themselves and the way (init_from, or a phase from the resume step);
    a changed optim.lr applies from the resume step (said in the log, seen in the logged rate);
    TensorBoard, like metrics.jsonl, shows each step once after the resume."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run, _ = copy_run(finished_run, tmp_path)
    step2 = Path(run["output_dir"]) / "checkpoints" / "step_00000002"
    shutil.rmtree(step2.parent / "step_00000004")  # as if killed after logging step 4, before its checkpoint
    for change, message in REFUSED:
        sections = {k: (run[k] | v if isinstance(v, dict) else v) for k, v in change.items()}
        with pytest.raises(UserError) as error:
            prepare(run_config_from_dict(run | sections), "auto")
        assert str(error.value).startswith(message), str(error.value)
        assert f"init_from: {step2}" in str(error.value)
    assert "phases: [{until_step: 2}, {until_step: 4, data.max_length: 32}]" in str(error.value)
    phased = run | {"phases": [{"until_step": 2}, {"until_step": 4, "data.max_length": 32}]}
    assert any("data settings differ from the checkpoint's for the steps after 2" in line
               for line in prepare(run_config_from_dict(phased), "auto").changes)

    resumed = train_cli(write_run(tmp_path / "lr.json", run | {"optim": run["optim"] | {"lr": 1e-3}}))
    assert "resume: optim.lr: 0.002 in the checkpoint, 0.001 now; applies from step 2" in resumed.stderr + \
        resumed.stdout
    entries = [json.loads(line) for line in (Path(run["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries] == [1, 2, 3, 4]
    assert entries[1]["discriminator/lr"] == pytest.approx(2e-3)        # before the resume: the old rate
    assert entries[2]["discriminator/lr"] == pytest.approx(1e-3 * 0.5)  # step 3: the new rate, linear decay
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run["output_dir"]) / "tensorboard"))
    events.Reload()
    shown = [(event.step, event.value) for event in events.Scalars("discriminator/lr")]
    assert [step for step, _ in shown] == [1, 2, 3, 4]  # each step once, the resumed run's values
    assert shown[2][1] == pytest.approx(5e-4)


@pytest.mark.slow
def test_relaunching_a_finished_run_on_another_process_count_starts_and_writes_nothing(finished_run, tmp_path,
                                                                                        monkeypatch, capsys):
    """Checked before DeepSpeed starts: no universal conversion, no lock, no file (a read-only
    file system would do), and no checkpoint file hashed (a resubmitted job on every rank)."""
    from deberta_ds.training import checkpoint

    run, config = copy_run(finished_run, tmp_path)
    before = snapshot(Path(run["output_dir"]))

    def started(**_):
        raise AssertionError("DeepSpeed was started for a finished run")

    def hashed(folder):
        raise AssertionError(f"{folder} was hashed for a finished run")
    monkeypatch.setattr(train, "setup_process", started)
    monkeypatch.setattr(checkpoint, "checked", hashed)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(["--config", str(config)]) == 0
    assert "already trained to step 4 (train.steps=4); nothing to do" in capsys.readouterr().err
    assert snapshot(Path(run["output_dir"])) == before


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(train_shards, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "None"
        refused = train_cli(write_run(tmp_path / "c.json", tiny_run(train_shards, out, train={"steps": 1})), expect=1)
        assert f"error: output_dir {out}: another run is training into it (pid {holder.pid} on host " \
               f"{socket.gethostname()}" in refused.stderr
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_like_sigterm(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "int", train={"steps": 100000, "log_every": 1})
    returncode, stderr = signal_a_training_run(write_run(tmp_path / "c.json", run), tmp_path / "int" / "metrics.jsonl",
                                               signal.SIGINT)
    assert returncode == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    assert "SIGINT: saving a checkpoint" in stderr
    latest = (tmp_path / "int" / "checkpoints" / "latest").read_text()
    assert int(latest.split("_")[1]) >= 2 and (tmp_path / "int" / "checkpoints" / latest / "COMPLETE").is_file()


@pytest.mark.slow
def test_a_run_whose_last_steps_were_non_finite_does_not_exit_0(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "nan", train={"steps": 4, "save_every": 2, "inject_nan_from_step": 2})
    result = train_cli(write_run(tmp_path / "c.json", run), expect=1)
    assert "error: the last 2 steps (to step 4) had non-finite losses" in result.stderr
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002"]  # no final checkpoint
