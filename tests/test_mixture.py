"""Weighted data mixtures: proportions, world-size and restart independence, per-source epochs,
validation, the trainer's per-source counts, and `data_prep mixture`.

Tolerances: realised counts within one sample of w_i n at every prefix n (Megatron's rule);
resumed losses within 1e-6 of the uninterrupted run (fp32, dropout off)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from data_prep.cli import main as data_prep
from deberta_ds.data.mixture import MixtureSamples, temperature_weights
from tests.dist_helpers import run_distributed
from tests.train_helpers import tiny_run, train_runs


class _Source:
    """A stand-in for PretrainingSamples: row i of source `tag` spells (tag, i)."""

    max_length = 2

    def __init__(self, size: int, tag: int):
        self.size, self.tag = size, tag

    def __len__(self):
        return self.size

    def batch(self, indices):
        indices = np.asarray(indices)
        return {"input_ids": np.stack([np.full(len(indices), self.tag), indices], axis=1)}


def _mixture(weights, sizes=None):
    sizes = sizes or [100 + 10 * i for i in range(len(weights))]
    return MixtureSamples([f"s{i}" for i in range(len(weights))], [_Source(n, i) for i, n in enumerate(sizes)],
                          weights)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.01, 0.09, 0.4, 0.5], [1, 1, 1],
                                     np.random.default_rng(0).random(6).tolist()])
def test_every_prefix_is_within_one_sample_of_the_weights(weights):
    mixture = _mixture(weights)
    sources, _ = mixture.assign(np.arange(10_000))
    counts = np.cumsum(np.eye(len(weights))[sources], axis=0)                      # [n, S] after sample n
    expected = np.outer(np.arange(1, 10_001), np.asarray(weights) / np.sum(weights))
    assert np.abs(counts - expected).max() <= 1.0


# The first 60 sources the earliest-deadline rule assigns (module docstring of deberta_ds.data.mixture).
# Checked by hand for [0.5, 0.3, 0.2]: n=0 all eligible, due 2, 3.3, 5 -> 0; n=1 source 0 has its
# share (1 >= 0.5 * 2), due 3.3, 5 -> 1; n=2 due 4, 5 (source 1 at its share) -> 0; n=3 -> 2.
# Another rule that also stays within one sample of the weights changes most of these.
GOLDEN = [([0.7, 0.3], "001001000100100100010010010001001001000100100100010010010001"),
          ([0.5, 0.3, 0.2], "010201010201020101020102010102010201010201020101020102010102"),
          ([0.01, 0.09, 0.4, 0.5], "323232323132323232313232323231323232323132323232313232323231"),
          ([1, 1, 1], "012012012012012012012012012012012012012012012012012012012012"),
          ([0.25, 0.125, 0.625], "220220122202201222022012220220122202201222022012220220122202")]


@pytest.mark.parametrize("weights, golden", GOLDEN)
def test_the_assignment_rule_is_pinned(weights, golden):
    sources, within = _mixture(weights).assign(np.arange(len(golden)))
    assert "".join(map(str, sources.tolist())) == golden
    for source in range(len(weights)):  # each source's samples in order: 0, 1, 2, ...
        assert within[sources == source].tolist() == list(range((sources == source).sum()))


def test_global_batches_do_not_depend_on_world_size_or_restarts():
    batch = 64
    whole = _mixture([0.6, 0.4]).batch(np.arange(10 * batch))["input_ids"]
    # DP = 2: each rank asks only for its half of every global batch, in its own process (object).
    ranks = [_mixture([0.6, 0.4]), _mixture([0.6, 0.4])]
    halves = [[ranks[r].batch(np.arange(b * batch + r * batch // 2, b * batch + (r + 1) * batch // 2))["input_ids"]
               for r in range(2)] for b in range(10)]
    assert np.array_equal(np.concatenate([np.concatenate(pair) for pair in halves]), whole)
    # A restart at global batch 6 with the checkpointed counts continues exactly.
    first = _mixture([0.6, 0.4])
    counts = first.counts_at(6 * batch)
    resumed = _mixture([0.6, 0.4])
    resumed.restore(6 * batch, counts)
    assert np.array_equal(resumed.batch(np.arange(6 * batch, 10 * batch))["input_ids"], whole[6 * batch:])


def test_restored_counts_are_continued_not_replayed():
    """The counts a checkpoint holds are where the rule continues from; a replay from sample 0
    would give 320 / 320 at position 640 and draw the next samples alternately."""
    resumed = _mixture([0.5, 0.5])
    resumed.restore(640, {"s0": 400, "s1": 240})          # e.g. an earlier phase weighted 5 / 3
    sources, within = resumed.assign(np.arange(640, 800))
    assert sources.tolist() == [1] * 160 and within.tolist() == list(range(240, 400))
    assert resumed.counts_at(800) == {"s0": 400, "s1": 400}


def test_a_small_source_repeats_and_its_epochs_are_counted():
    mixture = _mixture([0.5, 0.5], sizes=[20, 1000])
    sources, within = mixture.assign(np.arange(100))
    assert within[sources == 0].tolist() == list(range(50))                 # indices past 20: epochs 1 and 2
    assert mixture.epochs_at(100) == {"s0": 2.5, "s1": 0.05}


def test_temperature_weights():
    assert temperature_weights([100, 100], 0.3) == [0.5, 0.5]
    weights = temperature_weights([1_000_000, 10_000], 0.3)
    assert weights[1] == pytest.approx(10_000 ** 0.3 / (1_000_000 ** 0.3 + 10_000 ** 0.3))
    assert temperature_weights([1_000_000, 10_000], 1.0)[1] == pytest.approx(10_000 / 1_010_000)


@pytest.mark.parametrize("train, message", [
    ([{"name": "a", "path": "x", "weight": -0.5}, {"name": "b", "path": "y", "weight": 1}],
     "data.train[0].weight: must be a finite number >= 0"),
    ([{"name": "a", "path": "x", "weight": 0}, {"name": "b", "path": "y", "weight": 0}],
     "data.train: the mixture weights sum to 0"),
    ([{"name": "a", "path": "x", "weight": 1}, "y"], "give every entry a weight"),
    ([{"name": "a", "path": "x", "weight": 1}, {"name": "a", "path": "y", "weight": 1}], "source names repeat"),
    ([{"name": "a", "weight": 1}], "data.train[0]: missing fields ['path']"),
])
def test_a_bad_mixture_is_refused_naming_the_field(train, message):
    from deberta_ds.training.run_config import run_config_from_dict

    with pytest.raises(ValueError) as error:
        run_config_from_dict({"data": {"train": train}})
    assert message in str(error.value)


def test_an_unknown_source_path_is_refused_before_training(train_shards, tmp_path):
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    mixture = [{"name": "wiki", "path": train_shards["train"], "weight": 0.7},
               {"name": "code", "path": str(tmp_path / "nowhere"), "weight": 0.3}]
    config = run_config_from_dict(tiny_run(train_shards, tmp_path / "run", data={"train": mixture}))
    with pytest.raises(ValueError, match=r"data.train\[1\] \(code\): .*nowhere"):
        trainer_data(config)


@pytest.mark.slow
def test_training_on_a_mixture_logs_counts_and_resumes_exactly(train_shards, tmp_path):
    no_dropout = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    mixture = [{"name": "big", "path": train_shards["train"], "weight": 0.75},
               {"name": "small", "path": train_shards["valid"], "weight": 0.25}]

    def run(name, **train):
        return tiny_run(train_shards, tmp_path / name, model_overrides=no_dropout, data={"train": mixture},
                        train={"steps": 6, "save_every": 2} | train)

    whole, first = run_distributed(train_runs, 1, [run("whole"), run("split", exit_after_steps=4)], tmp_dir=tmp_path)
    rest = run_distributed(train_runs, 1, [run("split")], "auto", tmp_dir=tmp_path)[0]
    entries = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    last = entries[-1]
    assert last["data/consumed_samples/big"] + last["data/consumed_samples/small"] == 6 * 8
    assert abs(last["data/consumed_samples/small"] - 0.25 * 48) <= 1
    assert last["data/epochs/small"] > 0
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["mixture_counts"] == {"big": 24, "small": 8}
    resumed = first["losses"][:4] + rest["losses"]
    assert len(resumed) == 6
    for expected, actual in zip(whole["losses"], resumed):
        assert abs(expected[0] - actual[0]) <= 1e-6 and abs(expected[1] - actual[1]) <= 1e-6


def test_data_prep_mixture_prints_a_config_block(train_shards, capsys):
    assert data_prep(["mixture", "--alpha", "0.5", train_shards["train"], train_shards["valid"]]) == 0
    block = capsys.readouterr().out
    import yaml

    entries = yaml.safe_load(block)["data"]["train"]
    assert [entry["name"] for entry in entries] == ["split_train", "split_valid"]
    assert sum(entry["weight"] for entry in entries) == pytest.approx(1.0, abs=1e-5)
    assert entries[0]["weight"] > entries[1]["weight"] > 0.0
    # it is a valid run-config section
    completed = subprocess.run([sys.executable, "-c", "import sys, yaml; from deberta_ds.training.run_config import "
                                "run_config_from_dict; run_config_from_dict(yaml.safe_load(sys.stdin.read()))"],
                               input=block, text=True, capture_output=True)
    assert completed.returncode == 0, completed.stderr


def _phased_run(train_shards, tmp_path, name, **train):
    mixture = [{"name": "big", "path": train_shards["train"], "weight": 0.5},
               {"name": "small", "path": train_shards["valid"], "weight": 0.5}]
    phases = [{"until_step": 3, "data.max_length": 32},
              {"until_step": 6, "data.train": mixture, "data.max_length": 64, "data.masking.probability": 0.3}]
    return tiny_run(train_shards, tmp_path / name, model_overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0},
                    phases=phases, train={"steps": 6, "save_every": 1} | train)


def test_phases_change_length_data_and_masking_at_their_step(train_shards, tmp_path):
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    train, _, _ = trainer_data(run_config_from_dict(_phased_run(train_shards, tmp_path, "plan")))
    first, second = train.batch(np.arange(16, 24)), train.batch(np.arange(24, 32))   # steps 3 and 4 (batch 8)
    assert first["input_ids"].shape == (8, 32) and second["input_ids"].shape == (8, 64)
    masked = [(batch["labels"] != -100).sum() / (batch["attention_mask"].sum() - 16) for batch in (first, second)]
    assert abs(masked[0] - 0.15) < 0.06 and abs(masked[1] - 0.3) < 0.06
    assert train.phase_at(24)[0] == 24 and list(train.phase_at(24)[1].counts_at(8).values()) == [4, 4]


@pytest.mark.parametrize("phases, message", [
    ([{"until_step": 4}, {"until_step": 2}], "phases[1].until_step: 2 must be greater than the previous"),
    ([{"until_step": 3}], "phases[0].until_step: 3 ends before train.steps=6"),
    ([{"until_step": 6, "optim.lr": 0.1}], "phases[0].optim.lr: phases change data.* fields only"),
    ([{"until_step": 6, "data.max_length": 2}], "phases[0]: data.max_length: must be at least 3"),
    ([{"until_step": 6, "data.max_lenght": 64}], "phases[0]: phases[0].data: unknown fields ['max_lenght']"),
    ([{"data.max_length": 64}], "phases[0]: needs until_step"),
])
def test_bad_phases_are_refused_before_training(phases, message):
    from deberta_ds.training.run_config import run_config_from_dict

    with pytest.raises(ValueError) as error:
        run_config_from_dict({"train": {"steps": 6}, "phases": phases})
    assert message in str(error.value)


def test_a_phase_longer_than_the_generator_positions_is_refused(train_shards, tmp_path):
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    run = tiny_run(train_shards, tmp_path, train={"steps": 6}, phases=[{"until_step": 6, "data.max_length": 600}])
    with pytest.raises(ValueError, match=r"phases\[0\].data.max_length: 600 exceeds the model's "
                                         r"max_position_embeddings \(512"):
        trainer_data(run_config_from_dict(run))


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [2, 4])   # resume before the boundary (step 3) and inside phase 2
def test_resume_across_a_phase_boundary_equals_the_uninterrupted_run(train_shards, tmp_path, stop_after):
    whole, first = run_distributed(train_runs, 1, [_phased_run(train_shards, tmp_path, "whole"),
                                                   _phased_run(train_shards, tmp_path, "split",
                                                               exit_after_steps=stop_after)], tmp_dir=tmp_path)
    rest = run_distributed(train_runs, 1, [_phased_run(train_shards, tmp_path, "split")], "auto", tmp_dir=tmp_path)[0]
    resumed = first["losses"][:stop_after] + rest["losses"]
    assert len(resumed) == len(whole["losses"]) == 6
    for step, (expected, actual) in enumerate(zip(whole["losses"], resumed)):
        assert abs(expected[0] - actual[0]) <= 1e-6 and abs(expected[1] - actual[1]) <= 1e-6, step
