"""Parity with transformers.DebertaV2Model, both conversion directions, and the round trip.

Tolerance: max |ours - HF| <= 1e-5 on last hidden states and on gradients w.r.t. the input
embeddings (float32); the gradients are ~100 in size (LayerNorm of 0.02-scale embeddings),
so theirs are compared relative to their largest entry (<= 1e-5 of it). HF does not zero padded
query rows (ours does, by design), so outputs are compared at real tokens only; real tokens never
attend to padding in either model.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import DebertaV2ForMaskedLM, DebertaV2Model

from deberta_ds.config import RTDConfig, preset
from deberta_ds.convert import to_hf
from deberta_ds.errors import CheckpointError
from deberta_ds.hf_format import encoder_from_hf, from_hf
from deberta_ds.hf_oracle import random_hf_model
from deberta_ds.model import Encoder, ReplacedTokenDetection
from tests.hf_helpers import padded_batch

TOLERANCE = 1e-5


def _max_diff_at_real_tokens(ours, theirs, mask):
    real = mask.bool()
    return (ours[real] - theirs[real]).abs().max().item()


@pytest.fixture(scope="module", params=["tiny", "xsmall"])
def hf_and_ours(request, tmp_path_factory):
    config = preset(request.param, vocab_size=1000, hidden_dropout=0.0, attention_dropout=0.0,
                    attention_impl="reference")
    hf = random_hf_model(config)
    hf_dir = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(hf_dir)
    ours = encoder_from_hf(hf_dir).eval()
    return hf, ours, hf_dir


@pytest.mark.parametrize("lengths", [[1], [7, 3], [128, 100], [513, 400], [700, 513]])
def test_last_hidden_state_matches_hf(hf_and_ours, lengths):
    hf, ours, _ = hf_and_ours
    ids, mask = padded_batch(1000, lengths)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, mask)
    assert _max_diff_at_real_tokens(actual, expected, mask) <= TOLERANCE


@pytest.mark.parametrize("lengths", [[7, 5], [130, 64]])
def test_input_embedding_gradients_match_hf(hf_and_ours, lengths):
    hf, ours, _ = hf_and_ours
    ids, mask = padded_batch(1000, lengths, seed=1)
    embeds = hf.embeddings.word_embeddings(ids).detach()
    weights = torch.randn(*ids.shape, hf.config.hidden_size, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in (lambda x: hf(inputs_embeds=x, attention_mask=mask).last_hidden_state,
                lambda x: ours(inputs_embeds=x, attention_mask=mask)):
        x = embeds.clone().requires_grad_(True)
        (run(x) * weights * mask[..., None]).sum().backward()
        grads.append(x.grad)
    assert (grads[0] - grads[1]).abs().max().item() <= TOLERANCE * grads[0].abs().max().item()


def test_hf_to_ours_to_hf_round_trip_is_exact(hf_and_ours, tmp_path):
    _, ours, hf_dir = hf_and_ours
    to_hf(ours, tmp_path / "back")
    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


def test_ours_to_hf_loads_without_missing_keys_and_matches(tmp_path):
    config = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, attention_impl="reference")
    torch.manual_seed(3)
    ours = Encoder(config).eval()
    to_hf(ours, tmp_path)
    hf, info = DebertaV2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch(config.vocab_size, [50, 20])
    with torch.no_grad():
        diff = _max_diff_at_real_tokens(ours(ids, mask), hf.eval()(input_ids=ids, attention_mask=mask)[0], mask)
    assert diff <= TOLERANCE


def _trained_looking_rtd(sharing: str) -> ReplacedTokenDetection:
    config = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, attention_impl="reference")
    torch.manual_seed(4)
    model = ReplacedTokenDetection(RTDConfig(discriminator=config, embedding_sharing=sharing, mask_token_id=5))
    if sharing == "gdes":
        with torch.no_grad():
            model.discriminator.embedding_delta.normal_(std=0.02)
    return model.eval()


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_rtd_discriminator_export_merges_embeddings(sharing, tmp_path):
    model = _trained_looking_rtd(sharing)
    to_hf(model, tmp_path, part="discriminator")
    hf, info = DebertaV2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch(1024, [40, 33])
    with torch.no_grad():
        ours = model.discriminator.encoder(ids, mask, word_embedding_weight=model.discriminator_embedding_weight())
        theirs = hf.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _max_diff_at_real_tokens(ours, theirs, mask) <= TOLERANCE


def test_rtd_generator_export_loads_as_masked_lm(tmp_path):
    model = _trained_looking_rtd("gdes")
    to_hf(model, tmp_path, part="generator")
    hf, info = DebertaV2ForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch(1024, [30, 30])
    generator = model.generator
    with torch.no_grad():
        ours = generator.lm_head(generator.encoder(ids, mask), generator.word_embeddings.weight)
        theirs = hf.eval()(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_generator_export_runs_the_fill_mask_pipeline_with_its_own_tokenizer(tmp_path, tokenizer_dir):
    from transformers import AutoModelForMaskedLM, pipeline

    from deberta_ds.convert import main
    from deberta_ds.native_checkpoint import save_native

    save_native(_trained_looking_rtd("gdes"), tmp_path / "ours")
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "gen"), "--part",
                 "generator", "--tokenizer", str(tokenizer_dir)]) == 0
    assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path / "gen"), DebertaV2ForMaskedLM)
    fill = pipeline("fill-mask", model=str(tmp_path / "gen"), device="cpu")
    predictions = fill("The assert [MASK] checks a condition.", top_k=3)
    assert len(predictions) == 3 and all(p["token"] < 1000 and "[MASK]" not in p["sequence"] for p in predictions)


def test_hf_pair_imports_as_rtd_for_continued_pretraining(tmp_path):
    model = _trained_looking_rtd("gdes")
    to_hf(model, tmp_path / "disc", part="discriminator")
    to_hf(model, tmp_path / "gen", part="generator")
    reloaded = from_hf(tmp_path / "disc", tmp_path / "gen")
    ids, mask = padded_batch(1024, [25, 18])
    with torch.no_grad():
        before = model.discriminator.encoder(ids, mask, word_embedding_weight=model.discriminator_embedding_weight())
        after = reloaded.eval().discriminator.encoder(ids, mask,
                                                      word_embedding_weight=reloaded.discriminator_embedding_weight())
    assert (before - after).abs().max().item() <= 1e-6
    assert torch.equal(reloaded.generator.word_embeddings.weight, model.generator.word_embeddings.weight)
    assert torch.equal(reloaded.generator.lm_head.bias, model.generator.lm_head.bias)


def _write_hf(tmp_path, **config_changes):
    hf = random_hf_model(preset("tiny"))
    hf.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    import json
    data = json.loads(config_path.read_text()) | config_changes
    config_path.write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"relative_attention": False}, "relative_attention"),
    ({"pos_att_type": ["p2c", "c2p", "p2p"]}, "pos_att_type"),
    ({"model_type": "bert"}, "model_type"),
    ({"num_hidden_layers": 3}, "missing"),
])
def test_not_deberta_shaped_checkpoint_is_rejected_clearly(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        encoder_from_hf(_write_hf(tmp_path, **changes))


def test_cli_round_trip(tmp_path, tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    from deberta_ds.convert import main
    hf_dir = _write_hf(tmp_path / "hf")
    assert main(["from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "ours")]) == 0
    # a converted checkpoint records no tokenizer: exporting it without one is an error, not a silent success
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 2
    assert "--tokenizer: " in capsys.readouterr().err and not (tmp_path / "back").exists()
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back"), "--tokenizer",
                 str(tokenizer_dir)]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "back").mask_token_id == 1000
    assert main(["to-hf", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
