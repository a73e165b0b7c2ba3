"""ZeRO stages 1-3 against ZeRO-0: 2 real processes (gloo), tiny pair, 6 fp32 steps, GDES.

Tolerance: per-step MLM and RTD losses and every final weight within 1e-5 of ZeRO-0.
ZeRO-3 runs partition every parameter (stage3_param_persistence_threshold 0).
"""

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.train_helpers import ZERO3_PARTITION_EVERYTHING, tiny_run, train_runs

TOLERANCE = 1e-5


def _compare(reference, other, label):
    for step, (expected, actual) in enumerate(zip(reference["losses"], other["losses"])):
        assert abs(expected[0] - actual[0]) <= TOLERANCE and abs(expected[1] - actual[1]) <= TOLERANCE, \
            (label, step, expected, actual)
    assert len(reference["losses"]) == len(other["losses"]) == 6
    for name, tensor in reference["weights"].items():
        diff = (tensor - other["weights"][name]).abs().max().item()
        assert diff <= TOLERANCE, (label, name, diff)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decoupled", "joint"])
def test_zero_stages_match_zero0(train_shards, tmp_path, mode):
    runs = []
    for stage in (0, 1, 2, 3):
        train = {"zero_stage": stage, "mode": mode}
        if stage == 3:
            train["ds_overrides"] = ZERO3_PARTITION_EVERYTHING
        runs.append(tiny_run(train_shards, tmp_path / f"zero{stage}", train=train))
    results = run_distributed(train_runs, 2, runs, tmp_dir=tmp_path)
    first = results[0]["losses"]
    assert first[-1][0] < first[0][0], "the generator did not learn; the comparison would be vacuous"
    for stage, result in zip((1, 2, 3), results[1:]):
        _compare(results[0], result, f"{mode} zero{stage}")
    _check_export(tmp_path / "zero3", results[3]["weights"], tmp_path / "hf")
    _check_tensorboard(tmp_path / "zero0" / "tensorboard", mode)


def _check_export(run_dir, trained_weights, hf_dir):
    """The sharded ZeRO-3 checkpoint consolidates to the trained weights and exports to transformers."""
    from transformers import DebertaV2Model

    from deberta_ds.checkpoint_reader import load_training_checkpoint
    from deberta_ds.convert import to_hf
    from tests.hf_helpers import padded_batch

    model = load_training_checkpoint(run_dir).eval()
    for name, param in model.named_parameters():
        assert (param.detach() - trained_weights[name]).abs().max().item() <= 1e-7, name
    to_hf(model, hf_dir, part="discriminator")
    hf = DebertaV2Model.from_pretrained(hf_dir).eval()
    ids, mask = padded_batch(model.config.discriminator.vocab_size, [40, 25])
    with torch.no_grad():
        ours = model.discriminator.encoder(ids, mask, word_embedding_weight=model.discriminator_embedding_weight())
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


def _check_tensorboard(log_dir, mode):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    engines = ["joint"] if mode == "joint" else ["generator", "discriminator"]
    expected = {"generator/mlm_loss", "generator/mlm_accuracy", "discriminator/rtd_loss", "discriminator/rtd_accuracy",
                "discriminator/replaced_precision", "discriminator/replaced_recall", "discriminator/replaced_ratio",
                "train/skipped_nonfinite_steps", "perf/tokens_per_s", "perf/samples_per_s", "perf/model_tflops",
                "perf/peak_memory_gb"} | {f"{e}/{m}" for e in engines for m in ("lr", "grad_norm", "skipped_steps")}
    assert expected <= tags, expected - tags
    assert len(events.Scalars("generator/mlm_loss")) == 6


@pytest.mark.slow
def test_es_and_nes_under_zero3_match_zero0_in_both_modes(train_shards, tmp_path):
    runs = []
    for sharing in ("es", "nes"):
        for mode in ("decoupled", "joint"):
            for stage in (0, 3):
                train = {"zero_stage": stage, "mode": mode}
                if stage == 3:
                    train["ds_overrides"] = ZERO3_PARTITION_EVERYTHING
                runs.append(tiny_run(train_shards, tmp_path / f"{sharing}{mode}{stage}", train=train,
                                     rtd={"embedding_sharing": sharing}))
    results = run_distributed(train_runs, 2, runs, tmp_dir=tmp_path)
    for index in range(0, len(results), 2):
        _compare(results[index], results[index + 1], runs[index + 1]["output_dir"])


def gdes_isolation_under_zero3(run: dict) -> dict:
    """One discriminator-only and one generator-only step with two ZeRO-3 engines."""
    import deepspeed

    from deberta_ds.training.prefetch import to_tensors
    from deberta_ds.training.run_config import run_config_from_dict
    from deberta_ds.training.trainer import Trainer

    trainer = Trainer(run_config_from_dict(run), resume="none")
    model, engines = trainer.model, trainer.engines
    generator, discriminator = engines.engines["generator"], engines.engines["discriminator"]
    e_g, delta = model.generator.word_embeddings.weight, model.discriminator.embedding_delta

    def snapshot(param):
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()

    batch = to_tensors(trainer.train_samples.batch(torch.arange(4).numpy() + 4 * trainer.rank))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    before = {"e_g": snapshot(e_g), "delta": snapshot(delta)}
    with torch.no_grad():
        logits = generator(ids, mask, labels).logits
    corrupted, replaced = model.corrupt(ids, labels, logits, torch.Generator().manual_seed(0))
    out = discriminator(corrupted, mask, replaced, engines._gathered_generator_embedding())
    discriminator.backward(out.loss)
    discriminator.step()
    after_disc = {"e_g": snapshot(e_g), "delta": snapshot(delta)}
    out = generator(ids, mask, labels)
    generator.backward(out.loss)
    generator.step()
    after_gen = {"e_g": snapshot(e_g), "delta": snapshot(delta)}
    return {"before": before, "after_disc": after_disc, "after_gen": after_gen}


@pytest.mark.slow
def test_gdes_steps_are_isolated_under_zero3(train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "gdes", train={"zero_stage": 3, "mode": "decoupled",
                                                           "ds_overrides": ZERO3_PARTITION_EVERYTHING})
    state = run_distributed(gdes_isolation_under_zero3, 2, run, tmp_dir=tmp_path)
    assert state["before"]["e_g"].numel() > 0
    assert torch.equal(state["after_disc"]["e_g"], state["before"]["e_g"])          # bitwise
    assert not torch.equal(state["after_disc"]["delta"], state["before"]["delta"])  # the step did something
    assert torch.equal(state["after_gen"]["delta"], state["after_disc"]["delta"])   # bitwise
    assert not torch.equal(state["after_gen"]["e_g"], state["after_disc"]["e_g"])


@pytest.mark.slow
def test_activation_checkpointing_matches_under_zero0_zero3_and_tp2(train_shards, tmp_path):
    """The same 3 steps with and without `train.activation_checkpointing: layers`, dropout on:
    identical losses and weights (bitwise: the recomputation replays the same operations on the
    same RNG states) at ZeRO-0 and ZeRO-3 over 2 data-parallel ranks, and at TP = 2."""
    def run(name, checkpointing, **train):
        train = {"steps": 3, "activation_checkpointing": checkpointing, **train}
        return tiny_run(train_shards, tmp_path / f"{name}_{checkpointing}", train=train)

    data_parallel = [run("zero0", c) for c in ("none", "layers")] + \
        [run("zero3", c, zero_stage=3, ds_overrides=ZERO3_PARTITION_EVERYTHING) for c in ("none", "layers")]
    tensor_parallel = [run("tp2", c, tp=2, global_batch_size=4, micro_batch_size=4) for c in ("none", "layers")]
    results = run_distributed(train_runs, 2, data_parallel + tensor_parallel, tmp_dir=tmp_path)
    for plain, checkpointed, label in zip(results[::2], results[1::2], ("zero0", "zero3", "tp2")):
        assert plain["losses"] == checkpointed["losses"], label
        for name, tensor in plain["weights"].items():
            assert torch.equal(tensor, checkpointed["weights"][name]), (label, name)
