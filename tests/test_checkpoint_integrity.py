"""Checkpoints as the user meets them through `python -m deberta_ds.train` and `convert`: the newest
complete checkpoint is used by every reader even when `latest` was left behind, a relaunch
repairs `latest` and runs a lost final evaluation, silent corruption (bit flips) is detected,
and damaged or mismatched checkpoints are named, never tracebacks."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.proc_helpers import run_bounded, train_cli, write_run
from tests.run_helpers import copy_of

REPO = Path(__file__).resolve().parents[1]


def convert_cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_bounded([sys.executable, "-m", "deberta_ds.convert", *args], cwd=REPO)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_latest_left_behind_readers_use_the_newest_and_a_relaunch_repairs_it(finished_run, tmp_path):
    """The state a kill between COMPLETE and moving `latest` on the final save leaves: `latest`
    names step 2, step 4 is complete, and the final evaluation row was never written."""
    out, config = copy_of(finished_run, tmp_path, "behind")
    checkpoints, eval_log = out / "checkpoints", out / "eval.jsonl"
    final_row = json.loads(eval_log.read_text().splitlines()[-1])
    assert final_row["step"] == 4
    (checkpoints / "latest").write_text("step_00000002")
    eval_log.write_text("".join(line + "\n" for line in eval_log.read_text().splitlines()[:-1]))

    from deberta_ds.checkpoint_reader import checkpoint_vocab_size, complete_step_folder, load_native

    step4 = checkpoints / "step_00000004"
    assert complete_step_folder(out) == complete_step_folder(checkpoints) == step4
    exported, reference = load_native(out).state_dict(), load_native(step4).state_dict()  # checkpoint loading
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    step2 = load_native(checkpoints / "step_00000002").state_dict()
    assert not all(torch.equal(step2[k], reference[k]) for k in reference)  # the two steps differ: a real check
    assert checkpoint_vocab_size(out) == json.loads((step4 / "trainer_state.json").read_text())[
        "rtd_config"]["discriminator"]["vocab_size"]
    convert_cli("to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf_out"))
    convert_cli("to-hf", "--checkpoint", str(step4), "--out", str(tmp_path / "hf_step4"))
    assert (tmp_path / "hf_out" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf_step4" / "model.safetensors").read_bytes()
    init_run = json.loads(config.read_text()) | {"output_dir": str(tmp_path / "init"), "init_from": str(out)}
    init_run["train"] = init_run["train"] | {"steps": 1, "save_every": 0}
    initialised = train_cli(write_run(tmp_path / "init.json", init_run))
    assert f"initialised from {out}" in initialised.stdout + initialised.stderr

    relaunched = train_cli(config)
    text = relaunched.stdout + relaunched.stderr
    assert "it now names step_00000004" in text and "the final evaluation of step 4 is missing" in text
    assert (checkpoints / "latest").read_text() == "step_00000004"
    rows = [json.loads(line) for line in eval_log.read_text().splitlines()]
    assert [row["step"] for row in rows] == [4]
    for key, value in final_row.items():  # the lost row, evaluated again from the step-4 checkpoint
        assert rows[0][key] == pytest.approx(value, abs=1e-6), key
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = train_cli(config)
    assert "nothing to do" in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_bit_flips_in_checkpoint_tensors_are_detected_on_resume_and_export(finished_run, tmp_path):
    """One flipped bit in the middle of a weight tensor, an optimiser state or the RNG file's
    metadata: resume and `convert to-hf` name the file; torch.load alone would read it silently."""
    for relative in ("generator/mp_rank_00_model_states.pt", "discriminator/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "rng_rank0.safetensors"):
        out, config = copy_of(finished_run, tmp_path, Path(relative).stem, steps=5)
        target = out / "checkpoints" / "step_00000004" / relative
        flip_bit(target, 20 if relative.endswith("safetensors") else target.stat().st_size // 2)
        if relative.endswith(".pt"):
            torch.load(target, map_location="cpu", weights_only=False)  # still loads: the flip is silent there
        resumed = train_cli(config, expect=1)
        assert f"{target}: the file is damaged: its content hash differs" in resumed.stderr, resumed.stderr[-2000:]
        assert f"--resume {out / 'checkpoints' / 'step_00000002'}" in resumed.stderr
        exported = convert_cli("to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf"), expect=2)
        assert f"{target}: the file is damaged" in exported.stderr


@pytest.mark.slow
def test_damaged_or_mismatched_checkpoints_are_named(finished_run, train_shards, tmp_path, small_corpus,
                                                     other_tokenizer):
    """trainer_state.json garbage, empty or with a text step; COMPLETE without generator/ (an old
    marker without hashes, so DeepSpeed would be reached); another model shape; another tokenizer
    of the same vocabulary size."""
    for name, text in (("garbage", "\x00\x13garbage{"), ("empty", ""), ("twelve", '{"step": "twelve"}')):
        out, config = copy_of(finished_run, tmp_path, name, steps=5)
        (out / "checkpoints" / "step_00000004" / "trainer_state.json").write_text(text)
        result = train_cli(config, expect=1)
        assert "step_00000004/trainer_state.json: damaged, not a trainer state" in result.stderr, name

    out, config = copy_of(finished_run, tmp_path, "no_generator", steps=5)
    step4 = out / "checkpoints" / "step_00000004"
    shutil.rmtree(step4 / "generator")
    from deberta_ds.checkpoint_reader import vouch
    vouch(step4)  # its files accepted as they are now, so that DeepSpeed is reached
    result = train_cli(config, expect=1)
    assert f"{step4 / 'generator'}: missing" in result.stderr

    out, config = copy_of(finished_run, tmp_path, "shape", steps=5)
    wider = json.loads(config.read_text()) | {"model_overrides": {"intermediate_size": 256}}
    result = train_cli(write_run(config, wider), expect=1)
    assert "a checkpoint of another model shape (model.intermediate_size 128 vs 256" in result.stderr

    other = other_tokenizer
    out, config = copy_of(finished_run, tmp_path, "tokenizer", steps=5)
    swapped = json.loads(config.read_text())
    from data_prep.cli import main as data_prep  # shards of the other tokenizer: their manifest vouches for them

    data_prep(["tokenize", "--input", str(small_corpus), "--output-prefix", str(tmp_path / "other_shards" / "s"),
               "--tokenizer", str(other), "--no-progress"])
    shards = [str(tmp_path / "other_shards" / "s")]
    swapped["data"] = swapped["data"] | {"tokenizer": str(other), "train": shards, "valid": shards}
    result = train_cli(write_run(config, swapped), expect=1)
    assert "trained with tokenizer sha256" in result.stderr and "resume with the tokenizer it was trained with" \
        in result.stderr


def test_rng_file_with_damaged_metadata_is_named(tmp_path):
    """A bit flip in the RNG file's JSON metadata (a checkpoint written before hashes: nothing
    else catches it) is an error naming the file, not a JSONDecodeError."""
    from deberta_ds.errors import UserError
    from deberta_ds.training import checkpoint

    class Engine:
        def save_checkpoint(self, folder, tag, save_latest):
            (Path(folder) / tag).mkdir(parents=True, exist_ok=True)

        def load_checkpoint(self, folder, tag):
            return folder, {}

    folder = checkpoint.save(tmp_path, {"joint": Engine()}, 1, {"step": 1, "consumed_samples": 8}, 0, keep_last=2)
    rng = checkpoint.rng_file(folder, 0)
    data = rng.read_bytes()
    rng.write_bytes(data.replace(b'"numpy":"[', b'"numpy":"{', 1))
    from deberta_ds.checkpoint_reader import vouch
    vouch(folder)
    with pytest.raises(UserError, match=f"{rng}: cannot be read, the file is truncated or damaged"):
        checkpoint.load(folder, {"joint": Engine()}, 0, universal=False)


def test_the_first_save_killed_before_latest_is_still_found(tmp_path):
    """No `latest` at all (killed right after the first COMPLETE): the checkpoint is found, and
    `latest` pointing at an incomplete or older folder does not hide the newest complete one."""
    from deberta_ds import checkpoint_reader as reader
    from deberta_ds.training import checkpoint

    for step in (3, 12):
        (tmp_path / "checkpoints" / reader.tag_for(step)).mkdir(parents=True)
        (tmp_path / "checkpoints" / reader.tag_for(step) / "COMPLETE").write_text("")
        (tmp_path / "checkpoints" / reader.tag_for(step) / "trainer_state.json").write_text(
            json.dumps({"step": step, "consumed_samples": 8 * step}))
    (tmp_path / "checkpoints" / reader.tag_for(15)).mkdir()  # half-written
    assert reader.is_training_checkpoint(tmp_path)
    assert reader.complete_step_folder(tmp_path).name == "step_00000012"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003")
    assert reader.complete_step_folder(tmp_path).name == "step_00000012"
    assert checkpoint.checkpoint_to_resume("auto", tmp_path / "checkpoints").name == "step_00000012"


class _CreatesAFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.slow
def test_init_from_an_hf_folder_whose_weights_are_a_pickle_is_refused(finished_run, tmp_path):
    hf = tmp_path / "hf"
    convert_cli("to-hf", "--checkpoint", finished_run["output_dir"], "--out", str(hf))
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({"deberta.embeddings.word_embeddings.weight": torch.zeros(1), "x": _CreatesAFile(marker)},
               hf / "pytorch_model.bin")
    run = finished_run | {"output_dir": str(tmp_path / "init"), "init_from": str(hf)}
    result = train_cli(write_run(tmp_path / "init.json", run), expect=1)
    assert f"{hf / 'pytorch_model.bin'}: refused to load, it holds objects a checkpoint must not hold" \
        in result.stderr and not marker.exists()


def test_a_damaged_complete_marker_is_named(tmp_path):
    from deberta_ds.errors import UserError
    from deberta_ds.training import checkpoint

    class Engine:
        def save_checkpoint(self, folder, tag, save_latest):
            (Path(folder) / tag).mkdir(parents=True, exist_ok=True)

    folder = checkpoint.save(tmp_path, {"joint": Engine()}, 1, {"step": 1, "consumed_samples": 8}, 0, keep_last=2)
    assert set(json.loads((folder / "COMPLETE").read_text())["files"]) == {"rng_rank0.safetensors",
                                                                           "trainer_state.json"}
    for text in (b'{"files": [1, 2]}', b"\xff\xfe not json"):
        (folder / "COMPLETE").write_bytes(text)
        with pytest.raises(UserError, match=f"{folder / 'COMPLETE'}: damaged"):
            checkpoint.load(folder, {"joint": Engine()}, 0, universal=False)


@pytest.mark.slow
def test_the_rtd_settings_are_recorded_once_and_the_run_config_reads_back_whole(finished_run):
    """trainer_state.json keeps one copy of the rtd section (the model's RTDConfig); the run
    config read back from it equals the one the run was given, rtd settings included."""
    from deberta_ds.checkpoint_reader import checkpoints_folder, newest_complete, read_state
    from deberta_ds.training.checkpoint import run_config_of
    from deberta_ds.training.run_config import run_config_from_dict

    state = read_state(newest_complete(checkpoints_folder(finished_run["output_dir"])))
    assert "rtd" not in state["run_config"] and state["rtd_config"]["embedding_sharing"] == "gdes"
    given = run_config_from_dict(finished_run)
    assert given.rtd.generator_layers is None                     # the model's copy holds the resolved count
    resolved = replace(given, rtd=replace(given.rtd, generator_layers=state["rtd_config"]["generator_layers"]))
    assert run_config_of(state) == resolved and resolved.rtd.generator_layers == 2  # half the tiny model's 4
    state["rtd_config"] |= {"embedding_sharing": "es", "rtd_lambda": 10.0}  # read from the model's copy
    assert (run_config_of(state).rtd.embedding_sharing, run_config_of(state).rtd.rtd_lambda) == ("es", 10.0)
