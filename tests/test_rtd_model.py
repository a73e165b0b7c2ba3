"""Generator head, embedding sharing, RTD labels and low-precision behaviour."""

import torch

from deberta_ds.config import RTDConfig, preset
from deberta_ds.model import Encoder, ReplacedTokenDetection
from deberta_ds.model.rtd import IGNORE_INDEX
from tests.hf_helpers import padded_batch

MASK_ID = 5


def make_rtd(sharing="gdes", **overrides) -> ReplacedTokenDetection:
    config = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, attention_impl="reference", **overrides)
    torch.manual_seed(0)
    return ReplacedTokenDetection(RTDConfig(discriminator=config, embedding_sharing=sharing, mask_token_id=MASK_ID))


def masked_batch(vocab=1024, lengths=(24, 17), every=4):
    ids, mask = padded_batch(vocab, list(lengths))
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[:, 1::every] = True
    positions &= mask.bool()
    labels[positions] = ids[positions]
    return ids.masked_fill(positions, MASK_ID), mask, labels


def test_generator_has_half_the_layers_and_tied_lm_head():
    model = make_rtd()
    assert len(model.generator.encoder.layers) == 2 and len(model.discriminator.encoder.layers) == 4
    vocab_shaped = [n for n, p in model.generator.lm_head.named_parameters() if p.shape[0] == 1024 and p.dim() == 2]
    assert vocab_shaped == []  # no output matrix of its own: tied to the word embedding
    ids, mask, labels = masked_batch()
    out = model.generator(ids, mask, labels)
    out.loss.backward()
    # The output projection is the word embedding itself: it receives gradient at the target rows.
    targets = labels[labels != IGNORE_INDEX].unique()
    assert model.generator.word_embeddings.weight.grad[targets].abs().sum() > 0


def test_emd_uses_last_layer_twice_over_second_to_last_output():
    model = make_rtd()
    gen = model.generator
    ids, mask, labels = masked_batch()
    encoder = gen.encoder
    with torch.no_grad():
        rel = encoder.relative_table()
        hidden = encoder.embeddings(ids, mask)
        hidden_kv = encoder.layers[0](hidden, mask, rel)                  # second-to-last layer output
        query = hidden_kv + gen.emd.position_embeddings.weight[: ids.shape[1]]
        for _ in range(2):
            query = encoder.layers[1](hidden_kv, mask, rel, query_states=query)
        expected = gen.lm_head(query[labels != IGNORE_INDEX], gen.word_embeddings.weight)
        actual = gen(ids, mask, labels).logits
    assert torch.allclose(actual, expected, atol=1e-6)
    # Changing the last layer's weights changes the EMD output, and no extra layer exists.
    with torch.no_grad():
        encoder.layers[1].ffn_out.bias.add_(1.0)
        assert not torch.allclose(gen(ids, mask, labels).logits, expected)


def grad_sum(param) -> float:
    return 0.0 if param.grad is None else param.grad.abs().sum().item()


def _grads_after(model, loss_name):
    ids, mask, labels = masked_batch()
    out = model(ids, mask, labels, rng=torch.Generator().manual_seed(0))
    loss = out.generator.loss if loss_name == "mlm" else out.discriminator.loss
    loss.backward()
    return model


def test_gdes_rtd_loss_reaches_only_delta_and_mlm_only_generator():
    model = _grads_after(make_rtd("gdes"), "rtd")
    assert grad_sum(model.generator.word_embeddings.weight) == 0
    assert grad_sum(model.discriminator.embedding_delta) > 0
    model = _grads_after(make_rtd("gdes"), "mlm")
    assert grad_sum(model.generator.word_embeddings.weight) > 0
    assert grad_sum(model.discriminator.embedding_delta) == 0


def test_es_sends_both_losses_to_the_generator_embedding():
    for loss in ("rtd", "mlm"):
        model = _grads_after(make_rtd("es"), loss)
        assert grad_sum(model.generator.word_embeddings.weight) > 0
        assert model.discriminator.encoder.embeddings.word_embeddings is None


def test_nes_keeps_embeddings_apart():
    model = _grads_after(make_rtd("nes"), "rtd")
    disc_embedding = model.discriminator.encoder.embeddings.word_embeddings.weight
    assert grad_sum(disc_embedding) > 0
    assert grad_sum(model.generator.word_embeddings.weight) == 0
    model = _grads_after(make_rtd("nes"), "mlm")
    assert grad_sum(model.discriminator.encoder.embeddings.word_embeddings.weight) == 0


def test_lucky_sample_equal_to_original_is_labelled_original():
    model = make_rtd()
    ids, mask, labels = masked_batch()
    masked = labels != IGNORE_INDEX
    logits = torch.full((int(masked.sum()), 1024), -1e4)
    originals = labels[masked]
    logits[torch.arange(len(originals)), originals] = 1e4               # generator certain of the original
    logits[0, originals[0]] = -1e4
    logits[0, 7] = 1e4                                                   # ... except the first position
    corrupted, replaced = model.corrupt(ids, labels, logits)
    assert torch.equal(corrupted[masked][1:], originals[1:])
    assert corrupted[masked][0] == 7
    assert replaced.sum() == 1 and replaced[masked][0]
    assert torch.equal(corrupted[~masked], ids[~masked])


def test_sampling_follows_generator_distribution():
    model = make_rtd()
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, 3).contiguous()
    ids = torch.zeros(1, 20000, dtype=torch.long)
    labels = torch.ones(1, 20000, dtype=torch.long)
    corrupted, _ = model.corrupt(ids, labels, logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(corrupted[0], minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)


def test_rtd_outputs_and_joint_loss():
    model = make_rtd()
    ids, mask, labels = masked_batch()
    out = model(ids, mask, labels, rng=torch.Generator().manual_seed(1))
    assert torch.isclose(out.loss, out.generator.loss + model.config.rtd_lambda * out.discriminator.loss)
    masked = labels != IGNORE_INDEX
    assert torch.isclose(out.replaced_ratio, out.discriminator.replaced[masked].float().mean())
    assert not out.discriminator.replaced[~masked].any()
    assert 0 <= out.generator.accuracy <= 1 and 0 <= out.discriminator.accuracy <= 1


def test_bf16_with_huge_activations_stays_finite_and_close_to_fp32():
    config = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, attention_impl="reference")
    torch.manual_seed(0)
    encoder = Encoder(config).eval()
    with torch.no_grad():  # 100x larger projections: attention scores far beyond fp16's range
        for layer in encoder.layers:
            layer.attention.query.weight.mul_(100)
            layer.attention.key.weight.mul_(100)
    ids, mask = padded_batch(1024, [64, 40])
    with torch.no_grad():
        reference = encoder(ids, mask)
        low = encoder.to(torch.bfloat16)(ids, mask).float()
    assert torch.isfinite(low).all()
    real = mask.bool()
    # bf16 has 8 mantissa bits; after 4 post-LN layers hidden states (unit scale) agree to ~0.1.
    assert (low[real] - reference[real]).abs().mean() < 0.05
    assert (low[real] - reference[real]).abs().max() < 0.5
