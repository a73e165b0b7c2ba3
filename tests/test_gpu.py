"""The GPU checks (`pytest -m cuda`, run by launch_scripts/gpu_check.sh on a CUDA machine).

On a GPU: the fused kernel against the float64 reference at deberta-v3-base attention shapes
(B = 4, h = 12, d = 64, L = 512 and 2048, 2k = 512; fp32, bf16, fp16; padding and dropout;
forward and all five gradients), one training step of every engine layout on the device, and
kill-and-resume exactness on the device. Without a GPU they are skipped, except under
`GPU_CHECK_SMOKE=1` (gpu_check.sh --cpu-smoke), which runs them on the CPU at tiny shapes so
the harness cannot rot while no GPU runs it. Tolerances: those of test_fused_attention.py.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from deberta_ds.kernels.fused import disentangled_attention_fused
from deberta_ds.kernels.reference import attention_scores
from deberta_ds.kernels.settings import quantised_dropout_rate
from tests.dist_helpers import run_distributed
from tests.proc_helpers import run_bounded
from tests.test_fused_attention import TOLERANCE, inputs, kernel_dropout_mask, relative_error
from tests.test_fused_attention import run as run_kernel
from tests.train_helpers import ZERO3_PARTITION_EVERYTHING, tiny_run

REPO = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (ON_GPU or SMOKE), reason=(
    "needs a CUDA GPU: run by launch_scripts/gpu_check.sh (GPU_CHECK_SMOKE=1 runs it on the CPU at tiny shapes)"))]
DEVICE = "cuda" if ON_GPU else "cpu"
# (B, h, L, d, buckets, max_relative): deberta-v3-base heads on a GPU, a tiny stand-in on the CPU
# (and the other supported head dims at an L that is not a multiple of the 32-row tiles)
KERNEL_SHAPES = [(4, 12, 512, 64, 256, 512), (4, 12, 2048, 64, 256, 512), (2, 12, 1000, 32, 256, 512),
                 (2, 12, 1000, 128, 256, 512)] if ON_GPU else [(1, 2, 40, 32, 8, 24)]
# Triton's CPU interpreter corrupts bf16 loads (test_fused_attention.py): bf16 only on a GPU
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: f"L{s[2]}d{s[3]}")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_fused_kernel_matches_float64_reference_at_model_shapes(shape, dtype, dropout_p):
    tensors, mask = inputs(shape, dtype, ("c2p", "p2c"), True)
    tensors, mask = [t.to(DEVICE) for t in tensors], mask.to(DEVICE)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, device=DEVICE)
    keep = kernel_dropout_mask(*shape[:3], dropout_p, seed=11, device=DEVICE) if dropout_p else None

    def reference(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets, max_relative_positions):
        from deberta_ds.kernels.reference import disentangled_attention_reference

        if keep is None:
            return disentangled_attention_reference(q, k, v, pos_key, pos_query, attention_mask,
                                                    position_buckets=position_buckets,
                                                    max_relative_positions=max_relative_positions)
        scores = attention_scores(q, k, pos_key, pos_query, position_buckets=position_buckets,
                                  max_relative_positions=max_relative_positions, scale=(3 * q.shape[-1]) ** -0.5)
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        probabilities = torch.softmax(scores, -1) * keep / (1 - quantised_dropout_rate(dropout_p))
        return (probabilities @ v) * attention_mask[:, None, :, None]

    expected, expected_grads = run_kernel(reference, tensors, mask, shape, torch.float64, grad_out)
    actual, actual_grads = run_kernel(disentangled_attention_fused, tensors, mask, shape, dtype, grad_out,
                                     dropout_p=dropout_p, seed=11)
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= TOLERANCE[dtype]
    assert len(actual_grads) == 5
    for name, got, want in zip(("q", "k", "v", "pos_key", "pos_query"), actual_grads, expected_grads):
        assert relative_error(got, want) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_fused_document_attention_matches_float64_reference_at_model_shapes(dtype):
    """Packed samples: random document boundaries (about one per 400 tokens) with padding, at
    L = 2048 on a GPU; forward and all five gradients against the float64 reference."""
    from deberta_ds.kernels.reference import disentangled_attention_reference

    shape = KERNEL_SHAPES[1] if ON_GPU else KERNEL_SHAPES[0]
    tensors, mask = inputs(shape, dtype, ("c2p", "p2c"), True)
    tensors, mask = [t.to(DEVICE) for t in tensors], mask.to(DEVICE)
    boundaries = torch.rand(shape[0], shape[2], generator=torch.Generator().manual_seed(3)) < 1 / 400
    document_ids = boundaries.long().cumsum(-1).to(DEVICE)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, device=DEVICE)
    expected, expected_grads = run_kernel(disentangled_attention_reference, tensors, mask, shape, torch.float64,
                                          grad_out, document_ids=document_ids)
    actual, actual_grads = run_kernel(disentangled_attention_fused, tensors, mask, shape, dtype, grad_out,
                                      document_ids=document_ids)
    assert relative_error(actual, expected) <= TOLERANCE[dtype]
    for name, got, want in zip(("q", "k", "v", "pos_key", "pos_query"), actual_grads, expected_grads):
        assert relative_error(got, want) <= TOLERANCE[dtype], name


def device_training_steps(runs: list[dict]) -> list[dict]:
    """train_runs, plus where the engines put the model and what the loop logged."""
    from deberta_ds.training.run_config import run_config_from_dict
    from deberta_ds.training.trainer import Trainer

    results = []
    for run in runs:
        trainer = Trainer(run_config_from_dict(run), resume="none")
        trainer.run()
        devices = {p.device.type for p in trainer.model.parameters()}
        results.append({"device": str(trainer.device), "parameter_devices": devices,
                        "history": trainer.run_log.history})
    return results


def engine_layouts():
    """(mode, ZeRO stage, attention impl, precision) to train: every combination in bf16 on a
    GPU; on the CPU smoke run every layout with the reference and the fused kernel once, in fp32
    (the Triton interpreter is slow and mishandles bf16)."""
    layouts = [(mode, stage, impl, "bf16") for mode in ("joint", "decoupled") for stage in (0, 2, 3)
               for impl in ("reference", "fused")]
    if ON_GPU:
        return layouts
    return [layout for layout in layouts if layout[2] == "reference"] + [("decoupled", 2, "fused", "fp32")]


def test_training_steps_on_the_device_for_every_engine_layout(train_shards, tmp_path):
    """joint and decoupled, ZeRO 0/2/3, both attention impls, activation checkpointing, bf16:
    two steps each in one process; finite losses, the model on the device, data never late."""
    runs = []
    for mode, stage, impl, precision in engine_layouts():
        train = {"mode": mode, "zero_stage": stage, "precision": precision, "steps": 2,
                 "activation_checkpointing": "layers", "global_batch_size": 4, "micro_batch_size": 2}
        if stage == 3:
            train["ds_overrides"] = ZERO3_PARTITION_EVERYTHING
        runs.append(tiny_run(train_shards, tmp_path / f"{mode}{stage}{impl}", train=train,
                             model_overrides={"attention_impl": impl}))
    for run, result in zip(runs, run_distributed(device_training_steps, 1, runs, tmp_dir=tmp_path)):
        label = run["output_dir"]
        assert result["device"].startswith(DEVICE) and result["parameter_devices"] == {DEVICE}, label
        assert len(result["history"]) == 2, label
        for entry in result["history"]:
            assert 0 < entry["generator/mlm_loss"] < 20 and 0 < entry["discriminator/rtd_loss"] < 20, label
            assert 0 <= entry["perf/data_wait_fraction"] <= 1, label


def test_resumed_run_continues_the_uninterrupted_one_on_the_device(train_shards, tmp_path):
    """fp32 with dropout on: a run stopped after 2 of 4 steps and resumed in a new process logs
    the uninterrupted run's losses (the checkpoint carries the CPU, CUDA and TP RNG states)."""
    def train(name, **extra):
        run = tiny_run(train_shards, tmp_path / name, train={"steps": 4, **extra})
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps(run))
        result = run_bounded([sys.executable, "-m", "deberta_ds.train", "--config", str(config)], cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    uninterrupted = train("full")
    train("resumed", exit_after_steps=2)
    resumed = train("resumed")
    assert [e["step"] for e in resumed] == [e["step"] for e in uninterrupted] == [1, 2, 3, 4]
    for expected, actual in zip(uninterrupted, resumed):
        for key in ("generator/mlm_loss", "discriminator/rtd_loss"):
            assert abs(expected[key] - actual[key]) <= 1e-6, (expected["step"], key)
