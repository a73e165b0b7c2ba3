"""Context extension: a checkpoint trained at a short length continued at a longer one.

The generator's absolute position table grows by copies (row p = row p mod old) when init_from
loads a shorter checkpoint; a shrink is refused naming the field; the extended run trains at
the new length; the extension recipes validate; and the extended discriminator's HF export
matches transformers at L = 2048 (fp32, 1e-5 at real tokens).
"""

import re

import pytest
import torch
import yaml

from deberta_ds.config import RTDConfig, preset
from deberta_ds.convert import to_hf
from deberta_ds.errors import UserError
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.context import EMD_POSITIONS, extend_absolute_positions
from deberta_ds.native_checkpoint import save_native
from deberta_ds.resources import config_path, recipe_names
from tests.dist_helpers import run_distributed
from tests.hf_helpers import padded_batch
from tests.train_helpers import tiny_run, train_runs

EXTEND_RECIPES = [config_path(name) for name in recipe_names() if name.startswith("extend/")]
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}


def _pair(**model) -> ReplacedTokenDetection:
    torch.manual_seed(5)
    return ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny", **NO_DROPOUT, **model), mask_token_id=1000))


def test_the_position_table_grows_by_copies_and_never_shrinks():
    state = _pair(max_position_embeddings=64).state_dict()
    extended = extend_absolute_positions(state, 200)
    table, grown = state[EMD_POSITIONS], extended[EMD_POSITIONS]
    assert grown.shape == (200, table.shape[1])
    assert torch.equal(grown[:64], table) and torch.equal(grown[64:128], table) and torch.equal(grown[192:], table[:8])
    assert all(torch.equal(extended[name], tensor) for name, tensor in state.items() if name != EMD_POSITIONS)
    with pytest.raises(UserError, match="model_overrides.max_position_embeddings: 32 is shorter"):
        extend_absolute_positions(state, 32)


def _extended_start(run: dict) -> dict:
    """The trainer's weights right after init_from, before any step."""
    from deberta_ds.training.run_config import run_config_from_dict
    from deberta_ds.training.trainer import Trainer

    trainer = Trainer(run_config_from_dict(run), resume="none")
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.slow
def test_a_short_checkpoint_continues_at_a_longer_length(train_shards, tmp_path):
    short = _pair(max_position_embeddings=64)
    save_native(short, tmp_path / "short")
    extended = {"max_position_embeddings": 256, **NO_DROPOUT}
    run = tiny_run(train_shards, tmp_path / "long", model_overrides=extended, init_from=str(tmp_path / "short"),
                   data={"max_length": 256, "document_attention": True},
                   train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2})
    start = run_distributed(_extended_start, 1, run, tmp_dir=tmp_path)
    table = short.state_dict()[EMD_POSITIONS]
    assert torch.equal(start[EMD_POSITIONS], table[torch.arange(256) % 64])
    for name, tensor in short.state_dict().items():
        if name != EMD_POSITIONS:
            assert torch.equal(start[name], tensor), name
    result = run_distributed(train_runs, 1, [run], tmp_dir=tmp_path)[0]
    assert len(result["losses"]) == 2 and all(0 < loss < 20 for step in result["losses"] for loss in step)
    shrink = tiny_run(train_shards, tmp_path / "shrink", model_overrides={"max_position_embeddings": 32, **NO_DROPOUT},
                      init_from=str(tmp_path / "short"), data={"max_length": 32}, train={"steps": 1})
    with pytest.raises(Exception, match="model_overrides.max_position_embeddings: 32 is shorter"):
        run_distributed(_extended_start, 1, shrink, tmp_dir=tmp_path)


def test_extended_discriminator_export_matches_transformers_at_2048(tmp_path):
    from transformers import DebertaV2Model

    model = _pair(max_position_embeddings=2048).eval()
    to_hf(model, tmp_path, part="discriminator")
    hf = DebertaV2Model.from_pretrained(tmp_path).eval()
    assert hf.config.max_position_embeddings == 2048 and hf.config.max_relative_positions == 128
    ids, mask = padded_batch(1000, [2048, 1500], seed=4)
    with torch.no_grad():
        ours = model.discriminator.encoder(ids, mask, word_embedding_weight=model.discriminator_embedding_weight())
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("recipe", EXTEND_RECIPES, ids=lambda path: path.stem)
def test_each_extension_recipe_validates_and_gives_its_reasons(recipe):
    from deberta_ds.training.ds_config import build_ds_config
    from deberta_ds.training.run_config import load_run_config

    config = load_run_config(recipe)
    model = preset(config.model, **config.model_overrides)
    length = int(recipe.stem.split("_")[-1])
    assert model.max_position_embeddings == config.data.max_length == length
    assert (model.position_buckets, model.max_relative_positions) == (256, 512)   # the 512 run's geometry
    assert config.data.document_attention and config.train.activation_checkpointing == "layers"
    assert config.train.global_batch_size * length == 8192 * 512                 # the pre-training tokens per batch
    build_ds_config(config, data_parallel_size=64, lr=config.optim.lr, on_cpu=False)
    for line in recipe.read_text().splitlines():
        if re.match(r"\s*(lr|betas|eps|weight_decay|warmup_steps|steps|global_batch_size):", line):
            assert re.search(r"#.*\[(paper|script|code|choice)\]", line), (recipe.name, line)
    assert yaml.safe_load(recipe.read_text()).get("init_from") is None           # given on the command line
