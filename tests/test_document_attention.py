"""Document-aware attention for packed samples (`data.document_attention`).

Model: a packed sample's hidden states for each document equal that document run alone, and the
parameter gradients of the packed sample equal the sum over the documents run alone (fp32,
1e-5 relative, dropout off), with the reference and the fused kernel (Triton's interpreter on
CPU), for the encoder and for the generator's enhanced mask decoder (whose absolute positions
restart per document). Data: document ids follow the shards' document boundaries. Trainer: a
run with document attention passes the ids to both models. TP: tests/test_tensor_parallel.py.
"""

import numpy as np
import pytest
import torch

from deberta_ds.config import preset
from deberta_ds.data.dataset import PackedSamples, TokenCorpus
from deberta_ds.errors import UserError
from deberta_ds.model.encoder import Encoder
from deberta_ds.model.heads import EnhancedMaskDecoder, positions_in_documents
from deberta_ds.training.run_config import run_config_from_dict
from tests.dist_helpers import run_distributed
from tests.test_dataset import make_samples
from tests.train_helpers import tiny_run

LENGTHS = [30, 21, 45]  # 96 positions: 32-row tiles holding one and two documents
TOLERANCE = 1e-5


def _model(impl: str):
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0, attention_impl=impl,
                    max_position_embeddings=128)
    return Encoder(config), EnhancedMaskDecoder(config)


def _outputs(encoder, emd, ids, document_ids=None):
    """Encoder states and the EMD's decoded states [1, L, H], and the gradients of a fixed
    projection of both w.r.t. every parameter."""
    encoder.zero_grad(set_to_none=True)
    emd.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    hidden = encoder(ids, mask, document_ids=document_ids)
    decoded = emd(encoder, hidden, mask, encoder.relative_table(), document_ids)
    weights = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(1))
    ((hidden + decoded) @ weights).sum().backward()
    params = [*encoder.named_parameters(), *emd.named_parameters()]
    return hidden.detach(), decoded.detach(), {name: p.grad.clone() for name, p in params if p.grad is not None}


def _relative(actual, expected):
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_each_packed_document_equals_the_document_run_alone(impl):
    encoder, emd = _model(impl)
    ids = torch.randint(5, 300, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(2))
    document_ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))[None]
    hidden, decoded, grads = _outputs(encoder, emd, ids, document_ids)
    summed = {name: torch.zeros_like(g) for name, g in grads.items()}
    start = 0
    for length in LENGTHS:
        rows = slice(start, start + length)
        alone_hidden, alone_decoded, alone_grads = _outputs(encoder, emd, ids[:, rows])
        assert _relative(hidden[:, rows], alone_hidden) <= TOLERANCE
        assert _relative(decoded[:, rows], alone_decoded) <= TOLERANCE
        for name, grad in alone_grads.items():
            summed[name] += grad
        start += length
    for name, grad in grads.items():
        assert _relative(grad, summed[name]) <= TOLERANCE, name
    packed_plain, _, _ = _outputs(encoder, emd, ids)  # without the ids the documents do see each other
    assert _relative(packed_plain[:, LENGTHS[0]:], hidden[:, LENGTHS[0]:]) > 1e-3


def test_positions_restart_at_every_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_in_documents(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_document_ids_follow_the_shards_document_boundaries(train_shards):
    corpus = TokenCorpus([train_shards["train"]])
    packed = PackedSamples(corpus, 62, cross_documents=True)
    labels = np.repeat(np.arange(len(corpus)), corpus.doc_lengths)        # document of every stream token
    starts = packed.document_starts(np.arange(packed.num_samples))
    for sample in range(packed.num_samples):
        span = labels[sample * 62:(sample + 1) * 62]
        assert np.array_equal(starts[sample], np.flatnonzero(span[1:] != span[:-1]) + 1), sample
    assert sum(len(offsets) for offsets in starts) >= 10                  # samples do span documents


def test_batches_frame_document_ids_and_validation_names_the_field(train_shards):
    samples = make_samples(train_shards["train"], train_shards["tokenizer"], length=64)
    samples.document_attention = True
    batch = samples.batch(np.arange(16))
    for row in range(16):
        real = int(batch["attention_mask"][row].sum())
        documents = batch["document_ids"][row]
        assert documents[0] == documents[1] == 0                            # [CLS] joins the first document
        assert (documents[real - 1:] == documents[real - 2]).all()          # [SEP] and padding the last
        assert (np.diff(documents) >= 0).all()
    run = tiny_run(train_shards, "unused", data={"document_attention": True, "cross_documents": False})
    with pytest.raises(UserError, match="data.document_attention"):
        run_config_from_dict(run)


def _train_and_capture(run: dict) -> dict:
    """One step; what the engines saw (the model call's document_ids) and the loss."""
    from deberta_ds.model.rtd import Discriminator, Generator
    from deberta_ds.training.trainer import Trainer

    seen = {"Generator": [], "Discriminator": []}
    for cls in (Generator, Discriminator):
        original = cls.forward

        def forward(self, *args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name].append(kwargs.get("document_ids", args[4] if len(args) > 4 else None))
            return _original(self, *args, **kwargs)
        cls.forward = forward
    trainer = Trainer(run_config_from_dict(run), resume="none")
    trainer.run()
    return {name: [None if ids is None else ids.cpu() for ids in calls] for name, calls in seen.items()} | {
        "loss": trainer.run_log.history[-1]["discriminator/rtd_loss"]}


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_training_with_document_attention_hands_the_ids_to_both_models(train_shards, tmp_path, mode):
    run = tiny_run(train_shards, tmp_path / mode, data={"document_attention": True},
                   train={"steps": 2, "mode": mode, "eval_every": 0})
    seen = run_distributed(_train_and_capture, 1, run, tmp_dir=tmp_path)
    for name in ("Generator", "Discriminator"):
        assert seen[name] and all(ids is not None and ids.shape == (4, 64) for ids in seen[name]), name
        assert max(ids.max() for ids in seen[name]) >= 1, name              # packed samples span documents
    assert 0 < seen["loss"] < 20
