import json
import re

import pytest

from deberta_ds.config import (
    PRESETS,
    ModelConfig,
    RTDConfig,
    model_config_from_dict,
    preset,
    rtd_config_from_dict,
    to_dict,
)
from deberta_ds.model import Encoder

PUBLISHED = {"xsmall": (12, 384, 6, 1536, 22e6), "small": (6, 768, 12, 3072, 44e6),
             "base": (12, 768, 12, 3072, 86e6), "large": (24, 1024, 16, 4096, 304e6)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_published_shapes(name):
    layers, hidden, heads, ffn, backbone = PUBLISHED[name]
    config = preset(name)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.intermediate_size) == \
        (layers, hidden, heads, ffn)
    assert config.vocab_size == 128100 and config.position_buckets == 256 and config.max_relative_positions == 512
    # Backbone parameter count (without embeddings) as published, within 5%.
    body = (4 * hidden * hidden + 2 * hidden * ffn) * layers
    assert abs(body - backbone) / backbone < 0.05


def test_tiny_preset_and_generator_derivation():
    rtd = RTDConfig(discriminator=preset("tiny"), mask_token_id=4)
    assert rtd.generator.num_layers == 2 and rtd.generator.hidden_size == 64
    assert RTDConfig(discriminator=preset("tiny"), generator_layers=3, mask_token_id=4).generator.num_layers == 3
    assert set(PRESETS) == {"tiny", "xsmall", "small", "base", "large"}


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": 100, "num_heads": 3}, "hidden_size"),
    ({"position_buckets": 1024}, "position_buckets"),
    ({"pos_att_type": ("c2p", "p2p")}, "pos_att_type"),
    ({"attention_impl": "flash"}, "attention_impl"),
    ({"hidden_dropout": 1.5}, "hidden_dropout"),
    ({"num_layers": 0}, "num_layers"),
])
def test_model_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**changes)


@pytest.mark.parametrize("changes, field", [
    ({"embedding_sharing": "shared"}, "embedding_sharing"),
    ({"mask_token_id": 10 ** 6}, "mask_token_id"),
    ({"rtd_lambda": 0}, "rtd_lambda"),
    ({"generator_layers": 0}, "generator_layers"),
])
def test_rtd_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        RTDConfig(**changes)


def test_json_round_trip(tmp_path):
    rtd = RTDConfig(discriminator=preset("xsmall", share_att_key=False), embedding_sharing="es", rtd_lambda=10)
    (tmp_path / "c.json").write_text(json.dumps(to_dict(rtd)))
    assert rtd_config_from_dict(json.loads((tmp_path / "c.json").read_text())) == rtd
    assert model_config_from_dict(to_dict(preset("base"))) == preset("base")
    with pytest.raises(ValueError, match="unknown fields"):
        model_config_from_dict({"hiden_size": 3})


def test_unshared_attention_keys_build_separate_projections():
    encoder = Encoder(preset("tiny", share_att_key=False, pos_att_type=("c2p",)))
    names = {n for n, _ in encoder.named_parameters()}
    assert "layers.0.attention.pos_key.weight" in names and "layers.0.attention.pos_query.weight" not in names


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "steps", "ten", "train.steps: 'ten' is not of type int"),
    ("train", "steps", True, "train.steps: True is not of type int"),
    ("train", "steps", 0, "train.steps: must be positive"),
    ("train", "global_batch_size", -8, "train.global_batch_size: must be positive, got -8"),
    ("train", "save_every", 1.5, "train.save_every: 1.5 is not of type int"),
    ("train", "save_every", -1, "train.save_every: must be >= 0"),
    ("train", "log_every", 0, "train.log_every: must be >= 1"),
    ("train", "eval_batches", 0, "train.eval_batches: must be positive"),
    ("data", "max_length", 512.0, "data.max_length: 512.0 is not of type int"),
    ("data", "max_length", 2, "data.max_length: must be at least 3"),
    ("data", "train", "shards/", "data.train: 'shards/' is not of type list"),
    ("data", "cross_documents", "yes", "data.cross_documents: 'yes' is not of type bool"),
    ("optim", "lr", "1e-3", "optim.lr: '1e-3' is not of type float (YAML 1.1 reads 1e-3 as text: write 1.0e-3)"),
])
def test_run_config_names_the_field_of_a_bad_value(section, field, value, message):
    from deberta_ds.training.run_config import run_config_from_dict

    with pytest.raises(ValueError, match=re.escape(message)):
        run_config_from_dict({section: {field: value}})


def test_bad_config_files_and_tokenizer_descriptions_are_named(tmp_path):
    from deberta_ds.data.tokenizer import load_tokenizer
    from deberta_ds.training.run_config import load_run_config
    from tests.data_helpers import corpus_file, trained_tokenizer

    (tmp_path / "bad.yaml").write_text("train: {steps: 3\n")
    with pytest.raises(ValueError, match=r"--config .*bad\.yaml: not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
    tokenizer = trained_tokenizer(tmp_path / "tok", corpus_file(tmp_path, max_bytes=200_000), vocab_size=600)
    description = tokenizer / "tokenizer.json"
    description.write_text(json.dumps(json.loads(description.read_text()) | {"surprise": 1}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a deberta_ds tokenizer description .*surprise"):
        load_tokenizer(tokenizer)


@pytest.mark.parametrize("text, message", [
    ("model: tiny\noptim: {betas: [0.9, 0.99, 0.9]}\n", "optim.betas: [0.9, 0.99, 0.9] must be two numbers in [0, 1)"),
    ("model: tiny\noptim: {betas: [0.9, 1.5]}\n", "optim.betas: [0.9, 1.5] must be two numbers in [0, 1)"),
    ("model: tiny\nmodel_overrides: {hiden_size: 32}\n", "model_overrides: unknown fields ['hiden_size']"),
    ("model: tiny\nmodel_overrides: {hidden_size: wide}\n", "model_overrides.hidden_size: 'wide' is not of type int"),
    ("- model: tiny\n", "the top level must be a mapping of sections (model:, data:, train:, ...), got a list"),
    ("model: tiny\ntrain: {steps: 4}\nmodel: base\n", "the key 'model' is given twice"),
    ("model: tiny\ntrain: {steps: 4, steps: 8}\n", "the key 'steps' is given twice"),
    ("model: tiny\ntrain: {steps: 4}\nphases: [{until_step: true}]\n",
     "phases[0]: needs until_step (an integer, not true/false)"),
    ("model: tiny\ndata: {train: [{path: a, weight: .inf}, {path: b, weight: 1}]}\n",
     "data.train[0].weight: must be a finite number >= 0, got inf"),
])
def test_bad_run_configs_are_refused_by_the_train_command(tmp_path, capsys, text, message):
    """What `python -m deberta_ds.train --config run.yaml` prints (its main(), in this process: the
    config is read before anything is launched): exit 1, the field named, no traceback."""
    from deberta_ds.train import main

    (tmp_path / "run.yaml").write_text(text)
    assert main(["--config", str(tmp_path / "run.yaml")]) == 1
    assert message in capsys.readouterr().err


def test_a_key_given_twice_in_a_json_config_is_refused(tmp_path, capsys):
    from deberta_ds.train import main

    (tmp_path / "run.json").write_text('{"model": "tiny", "seed": 1, "seed": 2}')
    assert main(["--config", str(tmp_path / "run.json")]) == 1
    assert "the key(s) ['seed'] are given twice in one object" in capsys.readouterr().err
