"""The fused kernel's dropout (one random byte per score, the rate in whole 1/256) in the training
configuration: padding mask, documents and dropout together, every tile class (CPU: the interpreter;
fp32, the tolerance of tests/test_fused_attention.py), and its keep rate."""

import torch

from deberta_ds.kernels.reference import attention_scores, default_scale
from deberta_ds.kernels.settings import dropout_threshold, quantised_dropout_rate
from tests.test_fused_attention import SMALL, TOLERANCE, inputs, kernel, kernel_dropout_mask, relative_error, run


def test_the_rate_is_quantised_to_whole_256ths_and_the_mask_keeps_that_share():
    assert [dropout_threshold(p) for p in (0.0, 0.1, 0.5, 0.999)] == [0, 26, 128, 255]
    assert quantised_dropout_rate(0.1) == 26 / 256
    # at 0.0025 the kernel drops 1/256 = 0.0039: 384 of 98,304 cells, against 246 unquantised (7 sigma apart)
    dropped = (~kernel_dropout_mask(2, 3, 128, 0.0025, seed=3)).sum().item()
    assert abs(dropped - 98_304 / 256) < 4 * (98_304 / 256) ** 0.5


def test_dropout_with_documents_and_padding_matches_the_reference_with_the_kernels_mask():
    """Both backward kernels replay the forward's mask with documents on (the dK/dV kernel then steps
    over every query block and skips those outside the documents) and padded keys folded into the
    document test."""
    shape, p = (2, 1, 70, 32, 8, 24), 0.3
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), True, seed=10)
    document_ids = torch.stack([torch.arange(70) // 33, (torch.arange(70) // 9) % 3])
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    keep = kernel_dropout_mask(*shape[:3], p, seed=0, width=32)

    def reference_with_mask(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets, max_relative_positions,
                            document_ids):
        scores = attention_scores(q, k, pos_key, pos_query, position_buckets=position_buckets,
                                  max_relative_positions=max_relative_positions,
                                  scale=default_scale(q.shape[-1], pos_key, pos_query))
        allowed = (attention_mask[:, None, :] != 0) & (document_ids[:, :, None] == document_ids[:, None, :])
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, -1) * keep / (1 - quantised_dropout_rate(p))
        return (probs @ v) * attention_mask[:, None, :, None]

    expected = run(reference_with_mask, tensors, mask, shape, torch.float64, grad_out, document_ids=document_ids)
    actual = run(kernel(SMALL), tensors, mask, shape, torch.float32, grad_out, dropout_p=p,
                 document_ids=document_ids)
    assert relative_error(actual[0], expected[0]) <= TOLERANCE[torch.float32]
    for name, got, want in zip(["dq", "dk", "dv", "dKr", "dQr"], actual[1], expected[1]):
        assert relative_error(got, want) <= TOLERANCE[torch.float32], name
