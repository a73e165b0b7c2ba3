"""`convert to-onnx`: onnxruntime gives PyTorch's hidden states and RTD logits within 1e-4 at
several batch sizes and lengths (one of them past 512 and none the exported example's), with
padding; and for a plain encoder checkpoint."""

import numpy as np
import pytest
import torch

from deberta_ds.config import RTDConfig, preset
from deberta_ds.convert import main as convert
from deberta_ds.model import Encoder, ReplacedTokenDetection
from deberta_ds.native_checkpoint import save_native
from tests.hf_helpers import padded_batch

TOLERANCE = 1e-4


@pytest.mark.parametrize("kind", ["rtd", "encoder"])
def test_onnx_discriminator_equals_pytorch_at_any_length(tmp_path, kind):
    import onnxruntime

    torch.manual_seed(0)
    config = preset("tiny", attention_impl="reference")
    model = (ReplacedTokenDetection(RTDConfig(discriminator=config, mask_token_id=5)) if kind == "rtd"
             else Encoder(config)).eval()
    with torch.no_grad():  # a trained-looking E_delta, so the merged embedding is checked too
        if kind == "rtd":
            model.discriminator.embedding_delta.normal_(std=0.02)
    save_native(model, tmp_path / "ckpt")
    assert convert(["to-onnx", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "d.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "d.onnx"))
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"] + (["replaced_logits"] if kind == "rtd"
                                                                                else [])
    for lengths in ([7], [64, 40, 9], [600, 300]):
        ids, mask = padded_batch(1024, lengths, seed=len(lengths))
        with torch.no_grad():
            if kind == "rtd":
                embedding = model.discriminator_embedding_weight()
                hidden = model.discriminator.encoder(ids, mask, word_embedding_weight=embedding)
                expected = [hidden, model.discriminator.head(hidden)]
            else:
                expected = [model(ids, mask)]
        actual = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        real = mask.bool().numpy()
        for got, want in zip(actual, expected):
            assert np.abs(got[real] - want.numpy()[real]).max() <= TOLERANCE, (kind, lengths)


def test_fine_tuned_classifier_onnx_equals_transformers(tmp_path, tokenizer_dir, capsys):
    """A saved DebertaV2ForSequenceClassification folder (three classes, a trained-looking head)
    exports with `python -m deberta_ds.onnx_export --classifier`; onnxruntime's logits equal
    transformers' within 1e-4 at several batch sizes and lengths, with padding. `--help` prints."""
    import onnxruntime
    from transformers import AutoModelForSequenceClassification

    from deberta_ds.onnx_export import main as onnx_export
    from tests.downstream_helpers import export_tiny_model

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(export_tiny_model(tmp_path / "hf", tokenizer_dir),
                                                               num_labels=3).eval()
    model.save_pretrained(tmp_path / "clf")
    assert onnx_export(["--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / "clf.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "clf.onnx"))
    for lengths in ([7], [64, 40, 9]):
        ids, mask = padded_batch(1024, lengths, seed=len(lengths))
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert logits.shape == (len(lengths), 3) and np.abs(logits - expected).max() <= TOLERANCE
    assert onnx_export(["--classifier", str(tmp_path / "hf"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no pooler.dense / classifier weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        onnx_export(["--help"])
    assert exit_code.value.code == 0 and "--classifier" in capsys.readouterr().out
