"""One input contract for both attention implementations (reference.check_inputs): what neither
supports is refused alike with an error naming the argument; masks mean the same in both; fp16
inputs keep the fused kernel's position tables in fp32 (CPU: TRITON_INTERPRET=1, small shapes)."""

import pytest
import torch

from deberta_ds.errors import UserError
from deberta_ds.kernels.fused import disentangled_attention_fused
from deberta_ds.kernels.reference import disentangled_attention_reference

IMPLEMENTATIONS = pytest.mark.parametrize("attention", [disentangled_attention_reference,
                                                        disentangled_attention_fused], ids=["reference", "fused"])
B, H, L, D, BUCKETS, MAX_REL = 2, 2, 40, 16, 8, 24


def tensors(std=(1.0, 1.0, 1.0, 1.0, 1.0), dtype=torch.float32, seed=0):
    """q, k, v [B, h, L, d], pos_key, pos_query [h, 2k, d] with the given standard deviations, rounded to
    fp16 once (so every dtype sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, L, D)] * 3 + [(H, 2 * BUCKETS, D)] * 2
    return [(torch.randn(shape, generator=gen) * s).half().to(dtype) for shape, s in zip(shapes, std)]


def padding_mask(dtype=torch.long, keep_value=1):
    mask = torch.full((B, L), keep_value, dtype=dtype)
    mask[1, 30:] = 0
    return mask


def call(attention, inputs, mask, **kwargs):
    kwargs = dict(position_buckets=BUCKETS, max_relative_positions=MAX_REL) | kwargs
    return attention(*inputs, mask, **kwargs)


@IMPLEMENTATIONS
@pytest.mark.parametrize("buckets", [-1, 0, 1, MAX_REL + 1])
def test_position_buckets_outside_the_contract_are_refused(attention, buckets):
    """-1 gave wrong results and 0 a ZeroDivisionError in the fused kernel; 1 (no half for log
    buckets) and more buckets than max_relative_positions break the bucket formula in both."""
    q, k, v, _, _ = tensors()
    rel = torch.zeros(H, 2 * max(buckets, 1), D)
    with pytest.raises(UserError, match=r"position_buckets: must be an integer in \[2, max_relative_positions"):
        call(attention, (q, k, v, rel, rel), None, position_buckets=buckets)


@IMPLEMENTATIONS
def test_float_masks_and_other_inputs_outside_the_contract_are_refused(attention):
    q, k, v, pos_key, pos_query = tensors()
    with pytest.raises(UserError, match="attention_mask: a torch.float32 tensor is not supported: pass a bool or "
                                        "integer one"):
        call(attention, (q, k, v, pos_key, pos_query), padding_mask(torch.float32, 0.5))
    with pytest.raises(UserError, match="document_ids: a torch.float32 tensor"):
        call(attention, (q, k, v, pos_key, pos_query), None, document_ids=torch.zeros(B, L))
    with pytest.raises(UserError, match=r"pos_key: must be \[h, 2 x position_buckets, d\] = \[2, 16, 16\]"):
        call(attention, (q, k, v, pos_key[:, :10], pos_query), None)
    with pytest.raises(UserError, match=r"attention_mask: must be \[B, L\] = \[2, 40\]"):
        call(attention, (q, k, v, pos_key, pos_query), padding_mask()[:, :20])
    with pytest.raises(UserError, match="q, k, v: must share one floating dtype"):
        call(attention, (q, k.half(), v, pos_key, pos_query), None)
    with pytest.raises(UserError, match=r"dropout_p: must be in \[0, 1\)"):
        call(attention, (q, k, v, pos_key, pos_query), None, dropout_p=1.0)


def test_float64_runs_on_the_reference_only():
    inputs = [t.double() for t in tensors()]
    assert call(disentangled_attention_reference, inputs, None).dtype == torch.float64
    with pytest.raises(UserError, match="torch.float64 is not supported .* use attention_impl='reference'"):
        call(disentangled_attention_fused, inputs, None)


def test_bool_and_integer_masks_mean_the_same_in_both():
    """Nonzero keeps a position: a bool mask, a 0/1 int64 mask and a 0/3 int32 mask give identical
    outputs in each implementation, and the two agree (fp32, 2e-5 relative to the largest output)."""
    inputs = tensors()
    masks = [padding_mask(torch.bool, True), padding_mask(), padding_mask(torch.int32, 3)]
    for attention in (disentangled_attention_reference, disentangled_attention_fused):
        outs = [call(attention, inputs, mask) for mask in masks]
        assert all(torch.equal(outs[0], out) for out in outs[1:]), attention.__name__
        assert torch.all(outs[0][1, :, 30:] == 0)
        if attention is disentangled_attention_reference:
            expected = outs[0]
    assert (outs[0] - expected).abs().max() <= 2e-5 * expected.abs().max()


def output_and_gradients(attention, inputs, dtype, grad_out):
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    out = call(attention, leaves, padding_mask())
    return [out, *torch.autograd.grad(out, leaves, grad_out.to(dtype))]


def errors_against_float64(inputs):
    """max |x - float64 reference| / max(1, max |reference|) of the output and the five gradients, for the
    reference and the fused kernel in fp16."""
    grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = output_and_gradients(disentangled_attention_reference, inputs, torch.float64, grad_out)
    errors = {}
    for name, attention in (("reference", disentangled_attention_reference), ("fused", disentangled_attention_fused)):
        got = output_and_gradients(attention, inputs, torch.float16, grad_out)
        assert all(bool(g.isfinite().all()) for g in got), name
        errors[name] = [((g.double() - e).abs().max() / e.abs().max().clamp(min=1)).item() for g, e in zip(got, exact)]
    return errors


def test_fp16_position_tables_stay_finite_and_precise_where_the_reference_does():
    """q and pos_key with std 200: position scores of ~1e5 overflowed the fp16 tables to inf/NaN (the
    reference's scores are fp32); now fp32 tables (tables.table_dtype) keep every output and gradient
    finite and close to float64. At std 30 the fp16 tables' rounding (2.9e-2 on the output) is gone: the
    output is within 2x of the reference's own fp16 error, the gradients within 10x or 5e-3 (the
    kernels' rowsum(dO * O) reads the fp16 output, as FlashAttention's does; the reference's softmax
    backward stays in fp32)."""
    errors = errors_against_float64(tensors(std=(200.0, 1.0, 1.0, 200.0, 1.0)))
    assert max(errors["fused"]) <= 1e-2, errors
    errors = errors_against_float64(tensors(std=(30.0, 1.0, 1.0, 30.0, 1.0)))
    assert errors["fused"][0] <= 2 * errors["reference"][0], errors
    for fused, reference in zip(errors["fused"][1:], errors["reference"][1:]):
        assert fused <= max(5e-3, 10 * reference), errors
