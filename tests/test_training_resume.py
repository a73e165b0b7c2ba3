"""Checkpoints, resume, world-size change, simulated multi-node, fp16/NaN handling, bad input.

Real processes through the `deepspeed` launcher (and plain `python -m deberta_ds.train` for a
world of one). Resumed runs must reproduce the uninterrupted losses within 1e-6 (fp32).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deberta_ds.parallel_env import free_port
from tests.proc_helpers import run_bounded, signal_a_training_run, train_cli, write_run
from tests.run_helpers import copy_of, snapshot
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


def launcher(config: Path, gpus: int = 2, *extra: str) -> list[str]:
    return ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(free_port()), "--module", "deberta_ds.train",
            "--config", str(config), *extra]


def run_ok(command, **kwargs) -> subprocess.CompletedProcess:
    result = run_bounded(command, cwd=REPO, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def last_entry_per_step(output_dir: Path) -> dict:
    entries = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entries[entry["step"]] = entry
    return entries


@pytest.mark.slow
def test_sigkill_then_resume_auto_reproduces_the_uninterrupted_run(train_shards, tmp_path):
    train = {"steps": 12, "save_every": 6}
    full = write_run(tmp_path / "full.json", tiny_run(train_shards, tmp_path / "full", train=train))
    run_ok(launcher(full))
    killed_dir = tmp_path / "killed"
    killed = write_run(tmp_path / "killed.json", tiny_run(train_shards, killed_dir, train=train))
    process = subprocess.Popen(launcher(killed), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    complete = killed_dir / "checkpoints" / "step_00000006" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not complete.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert complete.exists() and not (killed_dir / "checkpoints" / "step_00000012").exists(), \
        "the kill did not land between the two checkpoints; the test proves nothing"
    run_ok(launcher(killed, 2, "--resume", "auto"))
    expected, actual = last_entry_per_step(tmp_path / "full"), last_entry_per_step(killed_dir)
    assert sorted(actual) == sorted(expected) == list(range(1, 13))
    logged = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13))  # steps logged after step 6 by the killed run were dropped on resume
    for step in range(1, 13):
        assert actual[step]["consumed_samples"] == expected[step]["consumed_samples"]  # same data order
        for key in ("generator/mlm_loss", "discriminator/rtd_loss"):
            assert abs(actual[step][key] - expected[step][key]) <= 1e-6, (step, key)


@pytest.mark.slow
def test_resume_on_a_different_world_size_continues_the_global_batches(train_shards, tmp_path):
    """2 processes x ZeRO-2 for 6 steps (checkpoints at 2, 4, 6); a copy cut back to its step-4
    checkpoint continues on 1 process (universal checkpoint) for steps 5-6: the same global batches
    and, dropout off, the losses of the uninterrupted 2-process run."""
    no_dropout = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    run = tiny_run(train_shards, tmp_path / "two", model_overrides=no_dropout,
                   train={"zero_stage": 2, "steps": 6, "save_every": 2})
    run_ok(launcher(write_run(tmp_path / "two.json", run)))
    resized = tmp_path / "resized"
    shutil.copytree(tmp_path / "two", resized)
    shutil.rmtree(resized / "checkpoints" / "step_00000006")
    (resized / "checkpoints" / "latest").write_text("step_00000004")  # as a 2-process job stopped at step 4
    resumed = run_ok([sys.executable, "-m", "deberta_ds.train", "--config",
                      str(write_run(tmp_path / "resized.json", run | {"output_dir": str(resized)}))])
    assert f"resumed from {resized / 'checkpoints' / 'step_00000004'}" in resumed.stdout + resumed.stderr
    state = json.loads((resized / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 1
    expected, actual = last_entry_per_step(tmp_path / "two"), last_entry_per_step(resized)
    for step in (5, 6):  # one process with 2 micro-batches sees the same global batches as two
        assert actual[step]["consumed_samples"] == expected[step]["consumed_samples"]
        for key in ("generator/mlm_loss", "discriminator/rtd_loss"):
            assert abs(actual[step][key] - expected[step][key]) <= 1e-5, (step, key)


@pytest.mark.slow
def test_simulated_two_node_launch_trains_and_checkpoints(train_shards, tmp_path):
    """Two launcher invocations on this host, one per 'node' of a 2-line hostfile, with --no_ssh."""
    config = write_run(tmp_path / "c.json", tiny_run(train_shards, tmp_path / "out", train={"steps": 2}))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    with ThreadPoolExecutor(2) as pool:  # both "nodes" at once, each bounded in time
        nodes = list(pool.map(lambda rank: run_bounded(
            ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr",
             "127.0.0.1", "--master_port", port, "--module", "deberta_ds.train", "--config", str(config)],
            timeout_s=300, cwd=REPO), (0, 1)))
    assert all(node.returncode == 0 for node in nodes), "".join(node.stdout[-2000:] + node.stderr[-2000:]
                                                                 for node in nodes)
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2


def test_kill_during_checkpoint_writing_keeps_previous_latest(tmp_path):
    """A real process dies (os._exit) in the middle of writing step 2's checkpoint."""
    script = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from deberta_ds.training import checkpoint

class Engine:
    def __init__(self, die): self.die = die
    def save_checkpoint(self, folder, tag, save_latest):
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        open(os.path.join(folder, tag, "model_states.pt"), "w").write("partial")
        if self.die: os._exit(9)

root = Path({str(tmp_path)!r})
checkpoint.save(root, {{"joint": Engine(False)}}, 1, {{"step": 1}}, 0, keep_last=3)
checkpoint.save(root, {{"joint": Engine(True)}}, 2, {{"step": 2}}, 0, keep_last=3)
"""
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 9
    from deberta_ds.training import checkpoint
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "step_00000001"
    assert not (tmp_path / "step_00000002" / "COMPLETE").exists()

    class Engine:  # the relaunch saves step 2 again: the half-written folder must be finished, not kept
        def save_checkpoint(self, folder, tag, save_latest):
            os.makedirs(os.path.join(folder, tag), exist_ok=True)
            Path(folder, tag, "model_states.pt").write_text("whole")

    checkpoint.save(tmp_path, {"joint": Engine()}, 2, {"step": 2}, 0, keep_last=3)
    step2 = tmp_path / "step_00000002"
    assert (step2 / "COMPLETE").is_file() and (tmp_path / "latest").read_text() == "step_00000002"
    assert (step2 / "joint" / "model_states.pt").read_text() == "whole"
    checkpoint.verify(step2)  # the hashes COMPLETE records are the rewritten files'
    (tmp_path / "latest").write_text("step_00000001")  # killed between COMPLETE and moving latest
    checkpoint.save(tmp_path, {"joint": Engine()}, 2, {"step": 2}, 0, keep_last=3)
    assert (tmp_path / "latest").read_text() == "step_00000002"


@pytest.mark.slow
def test_fp16_overflow_is_skipped_and_loss_scale_halves(train_shards, tmp_path):
    fp16 = {"fp16": {"hysteresis": 1, "initial_scale_power": 8}}
    run = tiny_run(train_shards, tmp_path / "fp16", train={"precision": "fp16", "steps": 4, "ds_overrides": fp16,
                                                           "inject_loss_scale_at_step": 2})
    env = os.environ | {"DEBERTA_DS_CPU_FP16": "1"}
    run_ok([sys.executable, "-m", "deberta_ds.train", "--config", str(write_run(tmp_path / "c.json", run))],
           env=env)
    entries = last_entry_per_step(tmp_path / "fp16")
    for engine in ("generator", "discriminator"):
        assert entries[2][f"{engine}/skipped_steps"] == 0 and entries[3][f"{engine}/skipped_steps"] == 1
        assert entries[3][f"{engine}/loss_scale"] == entries[2][f"{engine}/loss_scale"] / 2 == 2 ** 7


@pytest.mark.slow
def test_nan_losses_abort_after_the_configured_count(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "nan", train={"steps": 10, "inject_nan_from_step": 2,
                                                          "max_nonfinite_steps": 3})
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config",
                          str(write_run(tmp_path / "c.json", run))], cwd=REPO)
    assert result.returncode == 1
    assert "aborting at step 5: 3 non-finite losses in a row" in result.stderr
    entries = last_entry_per_step(tmp_path / "nan")
    assert entries[4]["train/skipped_nonfinite_steps"] == 2


def test_bad_input_is_reported_before_training(train_shards, tmp_path, small_corpus):
    from data_prep.tokenizer import train_tokenizer
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    with pytest.raises(FileNotFoundError, match="nowhere"):
        trainer_data(run_config_from_dict(tiny_run(train_shards, tmp_path,
                                                   data={"train": [str(tmp_path / "nowhere")]})))
    small = tmp_path / "small_tok"
    train_tokenizer(iter(small_corpus.read_text().splitlines()[:300]), small, 100, sample_sentences=1000,
                    byte_fallback=False)  # 100 pieces: no room for the 256 byte pieces
    with pytest.raises(ValueError) as error:  # the shards' manifest names the tokenizer they were made with
        trainer_data(run_config_from_dict(tiny_run(train_shards, tmp_path, data={"tokenizer": str(small)})))
    assert re.search(r"split_train.manifest.json: these shards were tokenised with tokenizer sha256 \w+, not with "
                     r"the given one", str(error.value)), str(error.value)
    with pytest.raises(ValueError, match="global_batch_size: 10 is not divisible"):
        run_config_from_dict(tiny_run(train_shards, tmp_path, train={"global_batch_size": 10})).check_batch_geometry(2)
    with pytest.raises(ValueError, match="unknown ZeRO stage 4"):
        run_config_from_dict(tiny_run(train_shards, tmp_path, train={"zero_stage": 4}))


def test_cli_reports_bad_config_without_traceback(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "o", train={"global_batch_size": 10, "micro_batch_size": 4})
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config",
                          str(write_run(tmp_path / "c.json", run))], cwd=REPO)
    assert result.returncode == 1
    assert "error: train.global_batch_size: 10 is not divisible" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o" / "metrics.jsonl").exists()
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("")  # found at start-up, not at the first save
    blocked = tiny_run(train_shards, tmp_path / "blocked")
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config",
                          str(write_run(tmp_path / "blocked.json", blocked))], cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"checkpoint folder {tmp_path / 'blocked' / 'checkpoints'}: cannot write there" in result.stderr
    assert not (tmp_path / "blocked" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "term", train={"steps": 100000, "log_every": 1})
    returncode, stderr = signal_a_training_run(write_run(tmp_path / "c.json", run), tmp_path / "term" / "metrics.jsonl",
                                               signal.SIGTERM, timeout_s=120)
    assert returncode == 0, stderr[-2000:]
    latest = (tmp_path / "term" / "checkpoints" / "latest").read_text()
    saved_step = int(latest.split("_")[1])
    assert 2 <= saved_step < 100000
    assert json.loads((tmp_path / "term" / "checkpoints" / latest / "trainer_state.json").read_text())["step"] == \
        saved_step


@pytest.mark.slow
def test_bf16_zero2_trains(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "bf16", train={"precision": "bf16", "zero_stage": 2, "steps": 3})
    run_ok([sys.executable, "-m", "deberta_ds.train", "--config", str(write_run(tmp_path / "c.json", run))])
    entries = last_entry_per_step(tmp_path / "bf16")
    assert all(0 < entries[s]["generator/mlm_loss"] < 20 for s in (1, 2, 3))


@pytest.mark.slow
def test_relaunching_a_finished_run_or_mistyping_resume_touches_nothing(finished_run, tmp_path):
    out, config = copy_of(finished_run, tmp_path, "done")
    before = snapshot(out)
    again = train_cli(config)
    assert "already trained to step 4 (train.steps=4); nothing to do" in again.stdout + again.stderr
    typo = train_cli(config, "--resume", "autp", expect=1)
    assert "--resume 'autp': choose auto, none, or the path of a complete checkpoint folder" in typo.stderr
    assert snapshot(out) == before  # checkpoint, latest, metrics and logs: not a byte or a timestamp changed


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_continues_that_run(finished_run, tmp_path):
    """Steps 3-4 resumed from the finished run's step-2 checkpoint equal the uninterrupted run's;
    resuming that run itself from step 2 is refused because its step-4 checkpoint would be replaced."""
    full, config = copy_of(finished_run, tmp_path, "full")
    step2 = full / "checkpoints" / "step_00000002"
    refused = train_cli(config, "--resume", str(step2), expect=1)
    assert "holds newer checkpoints (step_00000004)" in refused.stderr
    branch = write_run(tmp_path / "branch.json", finished_run | {"output_dir": str(tmp_path / "branch")})
    resumed = train_cli(branch, "--resume", str(step2))
    assert f"resumed from {step2} at step 2" in resumed.stdout + resumed.stderr
    expected, actual = last_entry_per_step(full), last_entry_per_step(tmp_path / "branch")
    assert sorted(actual) == [3, 4]
    for step in (3, 4):
        for key in ("generator/mlm_loss", "discriminator/rtd_loss"):
            assert abs(actual[step][key] - expected[step][key]) <= 1e-6, (step, key)


@pytest.mark.slow
def test_damaged_checkpoint_files_and_failed_writes_are_reported_not_tracebacks(finished_run, tmp_path):
    """A truncated model, optimizer or RNG file in the latest checkpoint is named, with the previous
    complete checkpoint to resume from; a write that fails (here: a file-size limit, as a full
    disk) stops the run with `latest` kept; an unwritable output_dir fails at start-up."""
    import resource

    for damaged in ("generator/mp_rank_00_model_states.pt", "discriminator/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "rng_rank0.safetensors"):
        copy, bigger = copy_of(finished_run, tmp_path, f"copy_{Path(damaged).stem}", steps=5)
        target = copy / "checkpoints" / "step_00000004" / damaged
        target.write_bytes(target.read_bytes()[:200])
        result = train_cli(bigger, expect=1)
        assert f"{Path(damaged).name}: the file is truncated or damaged (200 bytes" in result.stderr, damaged
        assert f"--resume {copy / 'checkpoints' / 'step_00000002'}" in result.stderr
    out, limited = copy_of(finished_run, tmp_path, "limited", steps=5)
    result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(limited)], cwd=REPO,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"writing the checkpoint of step 5 under {out / 'checkpoints'} failed: the generator " \
           "engine's DeepSpeed files" in result.stderr  # the first file over the limit
    assert "(torch.save reports any failed write so: a full disk, a quota or a file-size limit); step_00000004 " \
           "is still the latest complete checkpoint" in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    (tmp_path / "a_file").write_text("")
    unwritable = write_run(tmp_path / "unwritable.json",
                           finished_run | {"output_dir": str(tmp_path / "a_file" / "out")})
    result = train_cli(unwritable, expect=1)
    assert f"output_dir {tmp_path / 'a_file' / 'out'}: cannot write there" in result.stderr


@pytest.mark.slow
def test_a_peer_lost_at_the_checkpoint_barrier_is_reported_as_lost_not_as_a_write_error(train_shards, tmp_path):
    """Two ranks under the launcher; rank 1 ends (exit 0, so that the launcher lets rank 0 go on)
    as it enters the first save: rank 0 meets the gone peer at the save's barrier and says it lost
    contact (the lost-peer handler's message), not that a write failed."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':  # this rank goes away when it would save\n"
        "    from deberta_ds.training import checkpoint\n"
        "    checkpoint.save = lambda *args, **kwargs: os._exit(0)\n")
    run = tiny_run(train_shards, tmp_path / "run", train={"steps": 2, "save_every": 1, "collective_timeout_s": 60})
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", str(REPO))])}
    result = run_bounded(launcher(write_run(tmp_path / "run.json", run)), cwd=REPO, env=env, timeout_s=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "error: rank 0 lost contact with the other ranks" in output, output[-3000:]
    assert "writing the checkpoint" not in output and "Traceback" not in output
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_full_disk_while_logging_stops_clearly_and_a_cut_line_never_blocks_a_relaunch(train_shards, tmp_path):
    """metrics.jsonl, then eval.jsonl, on a full device (/dev/full): exit 1 naming the file, no
    traceback. A line cut short (what a full disk or a kill leaves) is dropped on relaunch, named,
    and the relaunch finishes the run and its final evaluation."""
    out = tmp_path / "run"
    out.mkdir()
    run = tiny_run(train_shards, out, data={"valid": [train_shards["valid"]]}, train={"steps": 2})
    config = write_run(tmp_path / "run.json", run)
    for log in ("metrics.jsonl", "eval.jsonl"):
        (out / log).symlink_to("/dev/full")
        result = train_cli(config, expect=1)
        assert f"error: appending to {out / log} failed: [Errno 28] No space left on device (disk full?)" \
            in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
        (out / log).unlink()
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"  # saved before the final evaluation
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "generator/ml')
    (out / "eval.jsonl").write_text('{"step": 2, "eval/mlm_lo')
    relaunched = train_cli(config)
    text = relaunched.stdout + relaunched.stderr
    assert f"{out / 'metrics.jsonl'}: dropped line 3: not a whole JSON entry" in text
    assert f"{out / 'eval.jsonl'}: dropped line 1: not a whole JSON entry" in text
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [2]
    more = write_run(tmp_path / "more.json", run | {"train": run["train"] | {"steps": 3}})
    train_cli(more)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
