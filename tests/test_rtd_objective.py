"""Decoupled mode steps the same objective as joint mode: mlm + rtd_lambda x rtd.

From the same weights and batch (fp32, ZeRO-0, no clipping, dropout off, one step, real
DeepSpeed engines in one gloo process), the gradients each engine steps on are recorded:
the discriminator's gradients in decoupled mode equal the RTD part of the joint gradient, and
the generator's (E_G included: under ES it carries lambda x the RTD gradient) equal the
joint engine's. Tolerance: 1e-5 relative, 1e-8 absolute (fp32, different summation orders).
"""

import pytest
import torch

from deberta_ds.training.engines import RTDEngines
from deberta_ds.training.run_config import run_config_from_dict
from tests.dist_helpers import run_distributed
from tests.test_rtd_model import make_rtd, masked_batch

RTD_LAMBDA = 50.0


def _stepped_gradients(sharing: str, mode: str) -> dict:
    """{parameter name: the gradient its engine stepped on} for one micro-batch."""
    model = make_rtd(sharing, vocab_size=1024)
    config = run_config_from_dict({
        "model": "tiny", "rtd": {"embedding_sharing": sharing, "rtd_lambda": RTD_LAMBDA},
        "optim": {"clip_grad": 0.0, "warmup_steps": 0},
        "train": {"mode": mode, "precision": "fp32", "zero_stage": 0, "global_batch_size": 2,
                  "micro_batch_size": 2, "steps": 1}})
    engines = RTDEngines(model, config, dp_size=1, on_cpu=True)
    names = {id(param): name for name, param in model.named_parameters()}
    stepped = {}
    step = engines._step

    def record_then_step(engine_name):
        for param in engines.engines[engine_name].module.parameters():
            if param.grad is not None:
                stepped[names[id(param)]] = param.grad.detach().clone()
        step(engine_name)

    engines._step = record_then_step
    ids, mask, labels = masked_batch()
    result = engines.micro_step({"input_ids": ids, "attention_mask": mask, "labels": labels},
                                torch.Generator().manual_seed(3))
    assert result.finite and result.replaced_ratio > 0
    return stepped


def _both_modes(sharing: str) -> tuple[dict, dict]:
    return _stepped_gradients(sharing, "joint"), _stepped_gradients(sharing, "decoupled")


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_decoupled_engines_step_on_the_gradients_of_the_joint_objective(sharing, tmp_path):
    joint, decoupled = run_distributed(_both_modes, 1, sharing, tmp_dir=tmp_path)
    assert joint.keys() == decoupled.keys() and len(joint) > 40
    for name, gradient in joint.items():
        torch.testing.assert_close(decoupled[name], gradient, rtol=1e-5, atol=1e-8, msg=name)
    # The comparison bites: gradients are not zero, and under ES the shared table's gradient
    # is not the MLM gradient alone (the RTD term reaches E_G in both modes).
    assert joint["discriminator.head.dense.weight"].abs().max() > 0
    if sharing == "es":
        mlm_only = make_rtd(sharing, vocab_size=1024)
        ids, mask, labels = masked_batch()
        mlm_only.generator(ids, mask, labels).loss.backward()
        table = "generator.encoder.embeddings.word_embeddings.weight"
        assert not torch.allclose(mlm_only.generator.word_embeddings.weight.grad, joint[table], rtol=1e-3)
