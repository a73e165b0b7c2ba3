"""Checkpoints and their tools, in this process (a stand-in engine writes the DeepSpeed folder):
COMPLETE vouches for every file or the load fails (and `convert vouch` accepts an old one on
purpose), the advice for a damaged checkpoint works as printed, damaged trainer states and
`convert` inputs are named, one run per output_dir, the second Ctrl-C."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deberta_ds import checkpoint_reader as reader
from deberta_ds.convert import main as convert
from deberta_ds.errors import CheckpointError, UserError
from deberta_ds.training import checkpoint
from tests.proc_helpers import HOLD_LOCK, REPO, run_bounded


class Engine:
    """Writes a DeepSpeed-like engine folder with one file."""

    def save_checkpoint(self, folder, tag, save_latest):
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(256))

    def load_checkpoint(self, folder, tag):
        return folder, {}


def saved(root: Path, step: int) -> Path:
    return checkpoint.save(root, {"joint": Engine()}, step, {"step": step, "consumed_samples": 8 * step}, 0,
                           keep_last=5)


def test_complete_must_vouch_for_every_file_and_vouch_accepts_an_old_checkpoint_on_purpose(tmp_path, capsys):
    folder = saved(tmp_path, 1)
    checkpoint.load(folder, {"joint": Engine()}, 0, universal=False)  # as written: every file recorded
    weights = folder / "joint" / "mp_rank_00_model_states.pt"
    records = json.loads((folder / "COMPLETE").read_text())["files"]
    partial = {name: record for name, record in records.items() if name != "joint/mp_rank_00_model_states.pt"}
    for marker in ("", "\n", '{"files": []}', '{"files": {}}', json.dumps({"files": partial})):
        (folder / "COMPLETE").write_text(marker)
        weights.write_bytes(b"flipped" + weights.read_bytes()[7:])  # a damaged file the marker does not cover
        with pytest.raises(reader.UnvouchedCheckpointError) as error:
            checkpoint.load(folder, {"joint": Engine()}, 0, universal=False)
        assert f"python -m deberta_ds.convert vouch --checkpoint {folder}" in str(error.value), marker
        assert "empty" in str(error.value) if not marker.strip() else "joint/mp_rank_00_model_states.pt" in str(
            error.value)
    (folder / "extra.bin").write_bytes(b"unrecorded")
    (folder / "COMPLETE").write_text(json.dumps({"files": records}))  # all recorded ones, plus one unknown file
    with pytest.raises(reader.UnvouchedCheckpointError, match="does not record extra.bin"):
        reader.verify(folder)
    assert convert(["vouch", "--checkpoint", str(folder)]) == 0
    assert "recorded 4 files" in capsys.readouterr().out
    reader.verify(folder)  # accepted as the files are now
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt: the file is damaged"):
        reader.verify(folder)  # and from here on checked
    assert convert(["vouch", "--checkpoint", str(tmp_path)]) == 2
    assert "not a training checkpoint step folder" in capsys.readouterr().err


def test_the_advice_for_a_damaged_newest_checkpoint_works_as_printed(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    step2, step4 = saved(root, 2), saved(root, 4)
    (step4 / "rng_rank0.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError) as error:
        checkpoint.checked(step4)
    message = str(error.value)
    assert f"--resume {step2}" in message
    move = message[message.index("(mv ") + 1:message.index(")", message.index("(mv "))]
    with pytest.raises(UserError, match="holds newer checkpoints"):  # named before the move: refused
        checkpoint.checkpoint_to_resume(str(step2), root)
    subprocess.run(shlex.split(move), check=True)  # the printed command, as the user runs it
    assert checkpoint.checkpoint_to_resume("auto", root) == step2  # "relaunch the same command"
    assert checkpoint.checkpoint_to_resume(str(step2), root) == step2  # "or name it"
    assert not (root / step4.name).exists() and (tmp_path / "out" / f"damaged_{step4.name}").is_dir()
    only = saved(tmp_path / "single" / "checkpoints", 2)
    (only / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="relaunch the same command: it resumes afresh"):
        checkpoint.checked(only)


@pytest.mark.parametrize("state", [{"step": -1, "consumed_samples": 0}, {"step": 3, "consumed_samples": -8}])
def test_a_trainer_state_with_a_negative_step_is_damaged(tmp_path, state):
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="damaged, not a trainer state .*integers >= 0"):
        reader.read_state(tmp_path)


def test_convert_names_a_trainer_state_without_its_run_config(tmp_path, capsys):
    folder = checkpoint.save(tmp_path / "checkpoints", {"joint": Engine()}, 1,
                             {"step": 1, "consumed_samples": 8, "engines": ["joint"]}, 0, keep_last=2)
    assert convert(["to-hf", "--checkpoint", str(folder), "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert f"{folder / 'trainer_state.json'}: damaged" in error and "run_config" in error and "Traceback" not in error


def tiny_pair(tmp_path: Path) -> Path:
    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.model import ReplacedTokenDetection
    from deberta_ds.native_checkpoint import save_native

    torch.manual_seed(0)
    pair = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny", vocab_size=256), mask_token_id=200))
    save_native(pair, tmp_path / "native")
    return tmp_path / "native"


def test_split_tp_refuses_sizes_that_do_not_split_and_writes_nothing(tmp_path, capsys):
    native = tiny_pair(tmp_path)  # 4 heads, FFN 128
    for tp, message in (("0", "--tp: 0: split-tp writes 2 or more"), ("-2", "--tp: -2: split-tp writes 2 or more"),
                        ("1", "--tp: 1: split-tp writes 2 or more"),
                        ("3", "--tp 3: num_heads: 4 is not divisible by the tensor-parallel size 3")):
        assert convert(["split-tp", "--checkpoint", str(native), "--tp", tp, "--out", str(tmp_path / "tp")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "tp").exists()
    assert convert(["split-tp", "--checkpoint", str(native), "--tp", "2", "--out", str(tmp_path / "tp")]) == 0
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == ["deberta_ds.json", "weights_tp0.safetensors",
                                                                   "weights_tp1.safetensors"]


def test_onnx_out_a_folder_and_from_hf_on_damaged_files_are_named(tmp_path, capsys):
    native = tiny_pair(tmp_path)
    (tmp_path / "folder").mkdir()
    assert convert(["to-onnx", "--checkpoint", str(native), "--out", str(tmp_path / "folder")]) == 2
    assert "--out" in capsys.readouterr().err and not any((tmp_path / "folder").iterdir())
    from deberta_ds.convert import to_hf

    hf = to_hf(native, tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert convert(["from-hf", "--hf", str(hf), "--out", str(tmp_path / "back")]) == 2
    assert f"{weights}: cannot be read, the file is truncated or damaged" in capsys.readouterr().err
    for garbage in ("{not json", "[1, 2]"):
        (hf / "config.json").write_text(garbage)
        assert convert(["from-hf", "--hf", str(hf), "--out", str(tmp_path / "back")]) == 2
        assert str(hf / "config.json") in capsys.readouterr().err


def test_a_universal_conversion_refusal_is_named_and_leaves_nothing(tmp_path):
    folder = saved(tmp_path / "checkpoints", 2)  # the stand-in engine folder is no ZeRO checkpoint
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="universal-checkpoint conversion .* failed: .*resume on the "
                                              "data-parallel size the checkpoint was written with"):
        checkpoint.load(folder, {"joint": Engine()}, 0, universal=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # the step folder untouched too


def test_an_invalid_byte_in_eval_jsonl_does_not_block_a_relaunch(tmp_path):
    from deberta_ds.training.run_logs import evaluation_logged

    log = tmp_path / "eval.jsonl"
    log.write_bytes(b'{"step": 2, "eval/loss": 1.0}\n{"step": 3, "eval/\xff": 1}\n{"step": 4, "eval/loss": 0.5}\n')
    assert evaluation_logged(log, 4) and evaluation_logged(log, 2) and not evaluation_logged(log, 5)


def test_one_run_per_output_dir_and_a_stale_lock_is_recognised(tmp_path):
    import socket

    from deberta_ds.training.run_lock import OutputBusyError, RunLock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "None"  # a fresh folder: nothing to take over
        with pytest.raises(OutputBusyError, match=f"another run is training into it \\(pid {holder.pid} on host "
                                                  f"{socket.gethostname()} since"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    assert f"a run that ended without releasing it (pid {holder.pid} on host" in lock.acquire()  # the kill
    lock.release()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # a clean end leaves no holder
    again.release()


def test_a_second_ctrl_c_quits_at_once(tmp_path):
    """The trainer's handler: the first SIGINT asks for a checkpoint and a stop, the second exits
    130 at once (checked in a child process: it ends the process)."""
    script = ("import os, signal, time, types\nfrom deberta_ds.training.trainer import Trainer\n"
              "trainer = types.SimpleNamespace(stop_signal=None)\n"
              "Trainer._on_stop_signal(trainer, signal.SIGINT, None)\nprint('stop', trainer.stop_signal, flush=True)\n"
              "Trainer._on_stop_signal(trainer, signal.SIGINT, None)\nprint('still running', flush=True)\n")
    result = run_bounded([sys.executable, "-c", script], timeout_s=300, cwd=REPO)
    assert result.returncode == 130, result.stdout + result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "stop SIGINT" and "SIGINT again: quitting at once" in result.stderr
