"""Optimiser groups, the learning-rate schedule and checkpoint pruning (single process)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deberta_ds.config import RTDConfig, preset
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.training import checkpoint
from deberta_ds.training.engines import _global_grad_norm, lr_lambda, parameter_groups
from deberta_ds.training.run_config import run_config_from_dict


def test_weight_decay_skips_biases_and_layer_norms_and_decays_the_gdes_delta_unless_asked():
    model = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny"), mask_token_id=5))
    names = {id(p): n for n, p in model.named_parameters()}
    published = parameter_groups(model, 0.01)  # the published code decays E_delta
    assert "discriminator.embedding_delta" in {names[id(p)] for p in published[0]["params"]}
    decay, no_decay = parameter_groups(model, 0.01, decay_embedding_delta=False)
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "discriminator.embedding_delta" in no_decay_names
    assert all(n.endswith("bias") or "norm" in n or n.endswith("rel_embeddings") or "delta" in n
               for n in no_decay_names)
    assert "generator.encoder.layers.0.attention.query.weight" in decay_names
    assert not any("norm" in n for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_warmup_then_linear_or_cosine_decay():
    config = run_config_from_dict({"optim": {"warmup_steps": 10, "schedule": "linear", "min_lr_ratio": 0.1},
                                   "train": {"steps": 110}})
    factor = lr_lambda(config)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert math.isclose(factor(60), 0.1 + 0.9 * 0.5) and math.isclose(factor(110), 0.1)
    cosine = lr_lambda(run_config_from_dict({"optim": {"warmup_steps": 0, "schedule": "cosine"},
                                             "train": {"steps": 100}}))
    assert math.isclose(cosine(50), 0.5) and math.isclose(cosine(100), 0.0, abs_tol=1e-12)


class _Engine:
    def save_checkpoint(self, folder, tag, save_latest):
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, {"joint": _Engine()}, step, {"step": step}, 0, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000005"]
    assert checkpoint.newest_complete(tmp_path).name == "step_00000005"
    assert checkpoint.rng_file(tmp_path / "step_00000005", 0).is_file()


def test_a_failed_checkpoint_write_names_its_file_and_the_system_error(tmp_path):
    """A write that fails (here: a file-size limit, as a full disk) raises CheckpointWriteError
    naming the file it was writing, with errno and text, and `latest` stays on the last complete
    checkpoint. In a child process: the limit holds for the whole process."""
    script = f"""
import resource
from pathlib import Path
from deberta_ds.training import checkpoint

class Engine:
    def save_checkpoint(self, folder, tag, save_latest):
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)

root = Path({str(tmp_path)!r})
checkpoint.save(root, {{"joint": Engine()}}, 1, {{"step": 1}}, 0, keep_last=2)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    checkpoint.save(root, {{"joint": Engine()}}, 2, {{"step": 2, "padding": "x" * (1 << 18)}}, 0, keep_last=2)
except checkpoint.CheckpointWriteError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"writing the checkpoint of step 2 under {tmp_path} failed: {tmp_path / 'step_00000002'}/trainer_state" \
           f".json: [Errno 27] File too large; step_00000001 is still the latest complete checkpoint" in result.stdout
    assert (tmp_path / checkpoint.LATEST).read_text() == "step_00000001"
    assert not (tmp_path / "step_00000002" / checkpoint.COMPLETE).exists()


class _EngineThatMustNotWrite:
    def save_checkpoint(self, folder, tag, save_latest):
        raise AssertionError(f"{folder}/{tag} rewritten")


def test_a_complete_checkpoint_is_never_rewritten(tmp_path):
    folder = checkpoint.save(tmp_path, {"joint": _Engine()}, 3, {"step": 3}, 0, keep_last=2)
    files = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert checkpoint.save(tmp_path, {"joint": _EngineThatMustNotWrite()}, 3, {"step": 3}, 0, keep_last=2) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == files


def test_resume_takes_auto_none_or_a_complete_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        checkpoint.save(root, {"joint": _Engine()}, step, {"step": step, "consumed_samples": 8 * step}, 0, keep_last=3)
    assert checkpoint.checkpoint_to_resume("auto", root) == root / "step_00000004"
    assert checkpoint.checkpoint_to_resume("auto", tmp_path / "fresh") is None
    assert checkpoint.checkpoint_to_resume("none", tmp_path / "fresh") is None
    with pytest.raises(ValueError, match="--resume none: .* already holds checkpoints"):
        checkpoint.checkpoint_to_resume("none", root)
    for typo in ("Auto", "latest", str(root), str(root / "step_00000009")):
        with pytest.raises(ValueError, match="choose auto, none, or the path of a complete checkpoint folder"):
            checkpoint.checkpoint_to_resume(typo, root)
    assert checkpoint.checkpoint_to_resume(str(root / "step_00000004"), root) == root / "step_00000004"
    # an older checkpoint of this run would overwrite the newer ones: refused; into a fresh run: fine
    with pytest.raises(ValueError, match=r"holds newer checkpoints \(step_00000004\)"):
        checkpoint.checkpoint_to_resume(str(root / "step_00000002"), root)
    assert checkpoint.checkpoint_to_resume(str(root / "step_00000002"), tmp_path / "other") == root / "step_00000002"
    # killed after step 4's COMPLETE marker, before `latest` moved to it: auto still takes step 4
    checkpoint.write_atomic(root / checkpoint.LATEST, "step_00000002")
    assert checkpoint.checkpoint_to_resume("auto", root) == root / "step_00000004"
    (root / checkpoint.LATEST).unlink()
    assert checkpoint.checkpoint_to_resume("auto", root) == root / "step_00000004"
    with pytest.raises(ValueError, match="--resume none: .* already holds checkpoints"):
        checkpoint.checkpoint_to_resume("none", root)
    (root / "step_00000004" / checkpoint.COMPLETE).unlink()  # half-written: not a checkpoint to resume
    assert checkpoint.checkpoint_to_resume("auto", root) == root / "step_00000002"
    with pytest.raises(ValueError, match="choose auto, none"):
        checkpoint.checkpoint_to_resume(str(root / "step_00000004"), tmp_path / "other")


def test_rng_states_round_trip_through_the_checkpoint_file(tmp_path):
    """CPU generator, numpy, Python and the TP stream of the tracker passed in come back exactly
    (no pickle involved); a TP > 1 tracker given a file without its stream is left unseeded, so
    its next fork fails instead of drawing from a stream nobody seeded."""
    import random

    import numpy as np

    from deberta_ds.parallel.random import RNGStatesTracker, fork_tp_rng, seed_streams
    from deberta_ds.parallel.state import ParallelState, TensorParallel

    parallel = ParallelState(TensorParallel(2, 1, None, RNGStatesTracker()))
    seed_streams(5, parallel)
    checkpoint._save_rng_states(tmp_path / "rng.safetensors", parallel.tp.tracker)

    def draws():
        with fork_tp_rng(parallel.tp):
            tp_stream = torch.rand(4)
        return torch.rand(4), np.random.rand(3), random.random(), tp_stream

    expected = draws()
    draws()
    seed_streams(6, parallel)
    checkpoint._load_rng_states(tmp_path / "rng.safetensors", parallel.tp.tracker)
    actual = draws()
    assert torch.equal(expected[0], actual[0]) and np.array_equal(expected[1], actual[1]) and expected[2] == actual[2]
    assert torch.equal(expected[3], actual[3]) and not torch.equal(expected[0], expected[3])

    checkpoint._save_rng_states(tmp_path / "tp1.safetensors", None)  # TP = 1: no tracker, no TP stream saved
    checkpoint._load_rng_states(tmp_path / "tp1.safetensors", parallel.tp.tracker)
    with pytest.raises(RuntimeError, match="not seeded: call .*seed_streams"):
        fork_tp_rng(parallel.tp)


def test_convert_refuses_an_incomplete_checkpoint_and_an_output_that_is_a_file(tmp_path, capsys):
    from deberta_ds.convert import main as convert

    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / checkpoint.STATE).write_text("{}")  # written, but COMPLETE never was
    (step.parent / checkpoint.LATEST).write_text(step.name)
    assert convert(["to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "checkpoints: holds no complete training checkpoint" in capsys.readouterr().err
    assert convert(["to-hf", "--checkpoint", str(step), "--out", str(tmp_path / "hf")]) == 2
    assert "step_00000004: not a complete training checkpoint" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert convert(["to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_own_gradient_norm_equals_the_float64_norm():
    """The ZeRO-0 norm (one foreach norm per group, no per-parameter loop) is the global L2 norm
    of the gradients, computed in fp32 (float64's within fp32 rounding)."""
    from deberta_ds.parallel.state import TensorParallel

    model = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny"), mask_token_id=5))
    torch.manual_seed(0)
    for index, param in enumerate(model.parameters()):
        if index % 3:
            param.grad = torch.randn_like(param)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = _global_grad_norm(model, torch.device("cpu"), TensorParallel())
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert torch.allclose(norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]).double()).float(),
                          rtol=1e-5)
