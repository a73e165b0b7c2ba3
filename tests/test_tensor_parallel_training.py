"""TP inside DeepSpeed training: TP x DP against TP = 1 on real processes (gloo), RNG streams,
TP checkpoints merged and exported, start-up errors. Losses within 1e-5 (fp32, dropout off)."""

import pytest
import torch
import torch.distributed as dist

from tests.dist_helpers import run_distributed
from tests.hf_helpers import padded_batch
from tests.train_helpers import tiny_run, train_runs

NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}


def _compare_losses(expected, actual, steps):
    assert len(expected["losses"]) == len(actual["losses"]) == steps
    for step, (a, b) in enumerate(zip(expected["losses"], actual["losses"])):
        assert abs(a[0] - b[0]) <= 1e-5 and abs(a[1] - b[1]) <= 1e-5, (step, a, b)


@pytest.mark.slow
def test_three_steps_tp2_equal_tp1_in_both_modes(train_shards, tmp_path):
    """Both modes' runs share one process set-up per TP size (train_runs trains them in turn)."""
    modes = ("decoupled", "joint")
    runs = {tp: [tiny_run(train_shards, tmp_path / f"{mode}_tp{tp}", model_overrides=NO_DROPOUT,
                          train={"steps": 3, "tp": tp, "mode": mode, "global_batch_size": 4, "micro_batch_size": 4})
                 for mode in modes] for tp in (1, 2)}
    one = run_distributed(train_runs, 1, runs[1], tmp_dir=tmp_path)
    two = run_distributed(train_runs, 2, runs[2], tmp_dir=tmp_path)
    for expected, actual in zip(one, two, strict=True):
        _compare_losses(expected, actual, 3)


@pytest.mark.slow
def test_tp2_dp2_zero2_equals_tp1_dp2_and_merges_to_hf(train_shards, tmp_path):
    runs = [tiny_run(train_shards, tmp_path / f"tp{tp}", model_overrides=NO_DROPOUT,
                     train={"steps": 3, "tp": tp, "zero_stage": 2}) for tp in (1, 2)]
    ids, mask = padded_batch(1000, [30, 17])  # ids below the tokenizer's 1000 pieces: in every vocabulary
    one = run_distributed(train_runs, 2, runs[:1], tmp_dir=tmp_path)[0]
    trained, tp2_hidden = run_distributed(train_then_discriminator_hidden, 4, runs[1:], ids, mask, tmp_dir=tmp_path)
    _compare_losses(one, trained[0], 3)
    # The TP = 2 checkpoint merges to TP = 1 and transformers reproduces the TP = 2 model.
    from transformers import DebertaV2Model

    from deberta_ds.checkpoint_reader import load_training_checkpoint
    from deberta_ds.convert import to_hf

    merged = load_training_checkpoint(tmp_path / "tp2").eval()
    reference = load_training_checkpoint(tmp_path / "tp1")
    for name, param in reference.named_parameters():
        assert (param - dict(merged.named_parameters())[name]).abs().max().item() <= 1e-5, name
    to_hf(merged, tmp_path / "hf")
    hf = DebertaV2Model.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (tp2_hidden[real] - theirs[real]).abs().max().item() <= 1e-5


def train_then_discriminator_hidden(runs: list[dict], ids, mask):
    """train_runs(runs), then discriminator_hidden_at_tp of the first run: one process set-up for both."""
    return train_runs(runs), discriminator_hidden_at_tp(runs[0], ids, mask)


def discriminator_hidden_at_tp(run: dict, ids, mask):
    """The discriminator of the saved TP = 2 checkpoint, loaded shard by shard at TP = 2."""
    from safetensors.torch import load_file

    from deberta_ds.checkpoint_reader import newest_complete, read_state, tp_weights_file
    from deberta_ds.config import rtd_config_from_dict
    from deberta_ds.model import ReplacedTokenDetection
    from deberta_ds.parallel.random import seed_streams
    from deberta_ds.parallel.state import initialize

    parallel = initialize(2)
    seed_streams(0, parallel)  # attention forks the TP stream even in eval, where it draws nothing
    tp = parallel.tp
    folder = newest_complete(__import__("pathlib").Path(run["output_dir"]) / "checkpoints")
    model = ReplacedTokenDetection(rtd_config_from_dict(read_state(folder)["rtd_config"]), tp).eval()
    model.load_state_dict(load_file(str(tp_weights_file(folder, tp.rank))))
    with torch.no_grad():
        return model.discriminator.encoder(ids, mask, word_embedding_weight=model.discriminator_embedding_weight())


def dropout_streams(seed: int):
    """Attention-dropout masks on every rank of TP = 2 x DP = 2 for identical inputs, and the
    mask drawn again after restoring the checkpointed RNG states."""
    from deberta_ds.kernels.reference import disentangled_attention_reference
    from deberta_ds.parallel.random import fork_tp_rng, get_rng_states, seed_streams, set_rng_states
    from deberta_ds.parallel.state import initialize

    parallel = initialize(2)
    seed_streams(seed, parallel)
    zeros, identity = torch.zeros(1, 1, 32, 32), torch.eye(32)[None, None]

    def attention_mask():
        """With q = k = 0 and v = I the output is the dropped-out probability matrix itself."""
        with fork_tp_rng(parallel.tp):
            out = disentangled_attention_reference(zeros, zeros, identity, None, None, None, position_buckets=4,
                                                   max_relative_positions=8, dropout_p=0.5)
        return out[0, 0] != 0                                                # [32, 32] kept probabilities

    replicated = torch.nn.functional.dropout(torch.ones(64), 0.5) != 0       # default stream
    saved = get_rng_states(parallel.tp.tracker)
    first = attention_mask()
    set_rng_states(saved, parallel.tp.tracker)
    again = attention_mask()
    masks = [torch.empty(2, 1024, dtype=torch.bool) for _ in range(4)]
    dist.all_gather(masks, torch.stack([first.flatten(), torch.nn.functional.pad(replicated, (0, 960))]))
    return {"masks": masks, "reproduced": torch.equal(first, again)}


@pytest.mark.slow
def test_dropout_streams_across_tp_and_dp(tmp_path):
    result = run_distributed(dropout_streams, 4, 3, tmp_dir=tmp_path)
    masks = result["masks"]  # ranks: (tp 0, dp 0), (tp 1, dp 0), (tp 0, dp 1), (tp 1, dp 1)
    attention = [m[0] for m in masks]
    replicated = [m[1][:64] for m in masks]
    assert not torch.equal(attention[0], attention[1])       # inside the TP region: differs across TP ranks
    assert torch.equal(attention[0], attention[2]) and torch.equal(attention[1], attention[3])  # same across DP
    assert torch.equal(replicated[0], replicated[1])        # replicated activations: same on TP ranks
    assert not torch.equal(replicated[0], replicated[2])    # ... and independent across DP replicas
    assert result["reproduced"]


def test_start_up_errors_for_tp(train_shards, tmp_path):
    from deberta_ds.config import preset

    with pytest.raises(ValueError, match="num_heads: 4 is not divisible by the tensor-parallel size 3"):
        preset("tiny").check_tensor_parallel(3)
    with pytest.raises(ValueError, match="intermediate_size: 130"):
        preset("tiny", intermediate_size=130).check_tensor_parallel(4)


def world_not_divisible():
    from deberta_ds.parallel.state import initialize
    try:
        initialize(3)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.slow
def test_world_size_not_divisible_by_tp(tmp_path):
    assert "world size 2 is not divisible by the tensor-parallel size 3" in \
        run_distributed(world_not_divisible, 2, tmp_dir=tmp_path)


def test_split_tp_round_trip(tmp_path):
    from deberta_ds.checkpoint_reader import load_native
    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.model import ReplacedTokenDetection
    from deberta_ds.native_checkpoint import split_tp

    torch.manual_seed(0)
    model = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny", vocab_size=1000), mask_token_id=5))
    split_tp(model, tmp_path / "shards", 2)
    shard = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "shards" / "weights_tp1.safetensors"))
    assert shard["generator.encoder.embeddings.word_embeddings.weight"].shape[0] == 512  # 1000 padded to 1024
    merged = load_native(tmp_path / "shards")
    for name, tensor in model.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name


@pytest.mark.slow
def test_continued_training_from_hf_at_tp2_equals_tp1(train_shards, tmp_path):
    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.convert import to_hf
    from deberta_ds.model import ReplacedTokenDetection

    torch.manual_seed(5)
    pair = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny", **NO_DROPOUT), mask_token_id=1000))
    to_hf(pair, tmp_path / "hf_disc", part="discriminator")
    to_hf(pair, tmp_path / "hf_gen", part="generator")
    runs = [tiny_run(train_shards, tmp_path / f"tp{tp}", model_overrides=NO_DROPOUT,
                     init_from=str(tmp_path / "hf_disc"), init_generator_from=str(tmp_path / "hf_gen"),
                     train={"steps": 2, "tp": tp, "global_batch_size": 4, "micro_batch_size": 4}) for tp in (1, 2)]
    fresh = tiny_run(train_shards, tmp_path / "fresh", model_overrides=NO_DROPOUT,
                     train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 4})
    one, fresh = run_distributed(train_runs, 1, [runs[0], fresh], tmp_dir=tmp_path)  # one process set-up for both
    two = run_distributed(train_runs, 2, runs[1:], tmp_dir=tmp_path)[0]
    _compare_losses(one, two, 2)
    assert abs(fresh["losses"][0][0] - one["losses"][0][0]) > 1e-3  # the initial weights really came from HF


@pytest.mark.slow
def test_init_from_a_published_vocabulary_needs_no_override(train_shards, tmp_path):
    """Published checkpoints have 128,000 pieces + 100 rows (not a multiple of 128): the run adopts
    the checkpoint's rows (here 1,000 pieces -> 1,100) when the tokenizer's ids fit in them."""
    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.convert import to_hf
    from deberta_ds.model import ReplacedTokenDetection
    from deberta_ds.training.run_config import run_config_from_dict
    from tests.train_helpers import trainer_data

    torch.manual_seed(5)
    pair = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny", vocab_size=1100), mask_token_id=1000))
    to_hf(pair, tmp_path / "hf_disc", part="discriminator")
    to_hf(pair, tmp_path / "hf_gen", part="generator")
    run = tiny_run(train_shards, tmp_path / "run", init_from=str(tmp_path / "hf_disc"),
                   init_generator_from=str(tmp_path / "hf_gen"),
                   train={"steps": 1, "global_batch_size": 4, "micro_batch_size": 4})
    result = run_distributed(train_runs, 1, [run], tmp_dir=tmp_path)[0]
    embedding = result["weights"]["generator.encoder.embeddings.word_embeddings.weight"]
    assert embedding.shape[0] == 1100 and len(result["losses"]) == 1
    # The initial weights came from the checkpoint: rows no batch touched are unchanged... up to one Adam step
    assert (embedding[1001:] - pair.generator.word_embeddings.weight.detach()[1001:]).abs().max() < 2 * 2e-3
    # A checkpoint too small for the tokenizer is refused, naming init_from.
    small = ReplacedTokenDetection(RTDConfig(discriminator=preset("tiny", vocab_size=900), mask_token_id=800))
    to_hf(small, tmp_path / "hf_small", part="discriminator")
    config = run_config_from_dict(run | {"init_from": str(tmp_path / "hf_small")})
    with pytest.raises(ValueError, match=r"init_from: .*hf_small has 900 vocabulary rows but the tokenizer .* "
                                         r"needs 1001"):
        trainer_data(config)
