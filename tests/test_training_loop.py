"""The training loop's components in one process: the batch prefetcher, the device-side
training statistics, and activation checkpointing at the model level (dropout on)."""

import time

import numpy as np
import pytest
import torch

from deberta_ds.config import RTDConfig, preset
from deberta_ds.data.sampler import GlobalBatchSampler
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.encoder import set_activation_checkpointing
from deberta_ds.model.rtd import DiscriminatorOutput, GeneratorOutput
from deberta_ds.parallel.random import seed_streams
from deberta_ds.parallel.state import ParallelState
from deberta_ds.training.engines import StepResult
from deberta_ds.training.metrics import TrainingStatistics
from deberta_ds.training.prefetch import BatchPrefetcher
from tests.test_rtd_model import masked_batch


class _Samples:
    """batch(indices) like PretrainingSamples: rows that spell out their global index."""

    def __init__(self, fail_at=None):
        self.fail_at, self.calls = fail_at, 0

    def batch(self, indices):
        self.calls += 1
        if self.fail_at is not None and indices[0] >= self.fail_at:
            raise ValueError(f"sample {indices[0]}: broken shard")
        ids = np.repeat(np.asarray(indices)[:, None], 3, axis=1)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": -ids}


def test_prefetcher_yields_each_step_in_order_from_the_consumed_samples():
    sampler = GlobalBatchSampler(global_batch_size=8, rank=1, world_size=2, consumed_samples=16)
    prefetcher = BatchPrefetcher(_Samples(), sampler, accumulation=2, pin=False)
    try:
        for step in (2, 3, 4):  # global batch b holds [8b, 8b + 8); rank 1 takes its second half
            micro_batches = prefetcher.next_step()
            assert [list(micro) for micro, _ in micro_batches] == [[8 * step + 4, 8 * step + 5],
                                                                   [8 * step + 6, 8 * step + 7]]
            for micro, tensors in micro_batches:
                assert tensors["input_ids"].dtype == torch.int64
                assert torch.equal(tensors["input_ids"][:, 0], torch.from_numpy(micro))
    finally:
        prefetcher.close()
    assert not prefetcher.thread.is_alive()


class _SlowSamples(_Samples):
    def batch(self, indices):
        time.sleep(0.2)
        return super().batch(indices)


def test_prefetcher_builds_ahead_and_counts_waiting():
    samples = _Samples()
    prefetcher = BatchPrefetcher(samples, GlobalBatchSampler(4), accumulation=1, pin=False, depth=3)
    try:
        prefetcher.next_step()
        for _ in range(100):  # the builder fills the queue while nobody asks
            if prefetcher.ready.full():
                break
            time.sleep(0.05)
        assert prefetcher.ready.full() and samples.calls >= 4  # one taken, three ready
    finally:
        prefetcher.close()  # returns although the builder is blocked on a full queue
    slow = BatchPrefetcher(_SlowSamples(), GlobalBatchSampler(4), accumulation=1, pin=False)
    try:
        slow.next_step()
        assert slow.wait_s >= 0.15  # the loop waited for a step that was still being built
    finally:
        slow.close()


def test_prefetcher_raises_the_builders_error_at_the_step_that_failed():
    prefetcher = BatchPrefetcher(_Samples(fail_at=8), GlobalBatchSampler(4), accumulation=1, pin=False)
    try:
        prefetcher.next_step()
        prefetcher.next_step()
        with pytest.raises(ValueError, match="sample 8: broken shard"):
            prefetcher.next_step()
    finally:
        prefetcher.close()


def _result(mlm_loss, logits, replaced):
    generator = GeneratorOutput(torch.tensor(mlm_loss), torch.tensor(0.5), torch.zeros(0), torch.tensor(mlm_loss))
    discriminator = DiscriminatorOutput(torch.tensor(0.25), torch.tensor(0.75), torch.tensor(logits),
                                        torch.tensor(replaced))
    return StepResult(generator, discriminator, torch.zeros(0), torch.tensor(0.1), torch.tensor(0.0), True, False)


def test_training_statistics_pool_micro_batches_and_skip_non_finite_values():
    statistics = TrainingStatistics(torch.device("cpu"))
    mask = torch.tensor([[1, 1, 1, 0]])
    statistics.add(_result(2.0, [[1.0, 1.0, -1.0, 5.0]], [[True, False, True, True]]), mask)
    statistics.add(_result(float("nan"), [[1.0, -1.0, -1.0, 5.0]], [[True, False, False, False]]), mask)
    metrics = statistics.reduce()
    assert metrics["generator/mlm_loss"] == 2.0                  # the NaN micro-batch is left out
    assert metrics["discriminator/rtd_loss"] == 0.25 and metrics["discriminator/replaced_ratio"] == pytest.approx(0.1)
    # real tokens only: predicted replaced 3, actually replaced 3, both 2
    assert metrics["discriminator/replaced_precision"] == pytest.approx(2 / 3)
    assert metrics["discriminator/replaced_recall"] == pytest.approx(2 / 3)
    assert statistics.reduce()["generator/mlm_loss"] is None     # reset after each reduction


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_activation_checkpointing_gives_identical_losses_and_gradients_with_dropout(impl):
    """Recomputed layers must draw the dropout masks of the first pass: bitwise equal results."""
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=1024, hidden_dropout=0.1, attention_dropout=0.1, attention_impl=impl)
    model = ReplacedTokenDetection(RTDConfig(discriminator=config, mask_token_id=5))
    ids, mask, labels = masked_batch()
    runs = []
    for enabled in (False, True):
        set_activation_checkpointing(model, enabled)
        model.zero_grad()
        seed_streams(3, ParallelState())
        out = model(ids, mask, labels, rng=torch.Generator().manual_seed(1))
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (checkpointed_loss, checkpointed_grads) = runs
    assert torch.equal(plain_loss, checkpointed_loss)
    assert plain_grads.keys() == checkpointed_grads.keys() and len(plain_grads) > 30
    for name, grad in plain_grads.items():
        assert torch.equal(grad, checkpointed_grads[name]), name
    # A recomputation with other dropout masks would not be equal: the test can fail.
    set_activation_checkpointing(model, False)
    model.zero_grad()
    model(ids, mask, labels, rng=torch.Generator().manual_seed(1)).loss.backward()
    assert not torch.equal(model.discriminator.encoder.layers[0].ffn_in.weight.grad,
                           plain_grads["discriminator.encoder.layers.0.ffn_in.weight"])
