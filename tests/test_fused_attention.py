"""The fused Triton kernel against the float64 reference (CPU: TRITON_INTERPRET=1, small shapes).

Tolerances, max |fused - float64 reference| relative to max |reference| (1 for outputs):
fp32 2e-5, fp16 5e-3, bf16 4e-2 (forward and all five gradients). Shapes cover L below the
32-row block, L not a multiple of it, and L far past 2 x position_buckets (saturated tiles).
bf16 is checked on CUDA only: Triton's interpreter does not handle bf16 tensors correctly.
"""

import math

import pytest
import torch

from deberta_ds.kernels.fused import disentangled_attention_fused
from deberta_ds.kernels.reference import attention_scores, disentangled_attention_reference
from tests.kernel_helpers import tile_kinds

TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
SHAPES = [  # (B, h, L, d, buckets, max_relative)
    (1, 2, 7, 32, 4, 8),        # L < block size
    (2, 1, 45, 32, 8, 24),      # L not a block multiple, saturated tiles
    (1, 2, 70, 64, 16, 32),     # several tiles per row, log buckets and saturation
    (1, 1, 33, 128, 8, 16),     # head dim 128
    (1, 1, 70, 32, 64, 128),    # diagonal tiles inside the linear band (slot = i - j + k)
]


def test_shapes_cover_every_tile_kind():
    """Linear-band, saturated and mixed 32 x 32 tiles all occur in SHAPES (the kernel branches on them)."""
    kinds = set()
    for _, _, L, _, k, max_rel in SHAPES:
        kinds |= set(tile_kinds(L, k, max_rel))
    assert kinds == {"linear", "saturated", "mixed"}


@pytest.mark.parametrize("L,k,max_rel", [(70, 8, 24), (700, 256, 512), (2000, 128, 256), (5, 4, 8)])
def test_slot_runs_the_backward_relies_on(L, k, max_rel):
    """The backward sums each slot's gradients over a contiguous run of a tile row: slots must never
    decrease with i - j, and slot_starts must give each slot's first distance."""
    from deberta_ds.kernels.triton_attention import slot_starts, slot_table

    slots = slot_table(L, k, max_rel, "cpu")
    assert torch.all(slots[1:] >= slots[:-1])
    distances = torch.arange(-(L - 1), L)
    starts = slot_starts(slots, 2 * k)
    for v in range(2 * k + 1):
        reaching = distances[slots >= v]
        assert starts[v] == (reaching.min() if reaching.numel() else 4 * L), v


def inputs(shape, dtype, terms, padding, seed=0):
    B, h, L, d, k, _ = shape
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, key, v = make(B, h, L, d), make(B, h, L, d), make(B, h, L, d)
    pos_key = make(h, 2 * k, d) if "c2p" in terms else None
    pos_query = make(h, 2 * k, d) if "p2c" in terms else None
    mask = None
    if padding:
        mask = torch.ones(B, L, dtype=torch.long)
        mask[-1, max(1, (2 * L) // 3):] = 0
    return [q, key, v, pos_key, pos_query], mask


def run(fn, tensors, mask, shape, dtype, grad_out, **kwargs):
    leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves, mask, position_buckets=shape[4], max_relative_positions=shape[5], **kwargs)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype))
    return out, grads


def relative_error(actual, expected):
    return (actual.double() - expected).abs().max().item() / max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",), ()])
@pytest.mark.parametrize("padding", [False, True])
def test_fp32_forward_and_gradients_match_float64_reference(shape, terms, padding):
    tensors, mask = inputs(shape, torch.float32, terms, padding)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = run(disentangled_attention_reference, tensors, mask, shape, torch.float64, grad_out)
    actual, actual_grads = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out)
    assert relative_error(actual, expected) <= TOLERANCE[torch.float32]
    if mask is not None:
        assert torch.all(actual[-1, :, mask[-1] == 0] == 0)
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("max_programs", [1, 3])
def test_backward_with_several_blocks_per_program_matches_float64_reference(monkeypatch, max_programs):
    """Long sequences give each backward program several consecutive blocks (one table-gradient
    partial per program); force that here: 1 -> every block of a head in one program, 3 -> uneven."""
    from deberta_ds.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "MAX_BACKWARD_PROGRAMS", max_programs)
    shape = (2, 1, 70, 32, 8, 24)  # 3 blocks per head, 2 heads in all
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), True)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, expected = run(disentangled_attention_reference, tensors, mask, shape, torch.float64, grad_out)
    _, actual = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


BF16_ON_CPU = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="Triton 3.9's interpreter corrupts bf16 loads; bf16 runs in the CUDA tests")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_ON_CPU)])
def test_low_precision_matches_float64_reference(dtype):
    shape = SHAPES[1]
    tensors, mask = inputs(shape, dtype, ("c2p", "p2c"), True, seed=2)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected, expected_grads = run(disentangled_attention_reference, tensors, mask, shape, torch.float64, grad_out)
    actual, actual_grads = run(disentangled_attention_fused, tensors, mask, shape, dtype, grad_out)
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= TOLERANCE[dtype]
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) <= TOLERANCE[dtype]


def kernel_dropout_mask(B, h, L, p, seed, device="cpu", width=64):
    """The kernel's keep-mask [B, h, L, L]: with q = k = 0 and v = columns of I the output is the
    dropped-out uniform probability matrix, `width` columns per call (the head dims the kernel
    supports); the mask depends on seed and position only, not on the data."""
    zeros = torch.zeros(B, h, L, min(L, width), device=device)
    identity = torch.eye(L, device=device)
    columns = []
    for start in range(0, L, width):
        values = identity[:, start:start + width].expand(B, h, L, -1).contiguous()          # [B, h, L, w]
        columns.append(disentangled_attention_fused(zeros[..., :values.shape[-1]], zeros[..., :values.shape[-1]],
                                                    values, None, None, None, position_buckets=4,
                                                    max_relative_positions=8, dropout_p=p, seed=seed))
    return torch.cat(columns, dim=-1) != 0


def test_dropout_is_reproducible_and_matches_reference_with_the_kernels_mask():
    shape, p = (1, 2, 40, 32, 8, 24), 0.2
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), False, seed=4)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    first = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out, dropout_p=p, seed=7)
    again = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out, dropout_p=p, seed=7)
    other = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out, dropout_p=p, seed=8)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not torch.equal(first[0], other[0])
    keep = kernel_dropout_mask(1, 2, 40, p, seed=7, width=16)  # three calls: 16 + 16 + 8 columns
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03

    def reference_with_mask(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets, max_relative_positions):
        scores = attention_scores(q, k, pos_key, pos_query, position_buckets=position_buckets,
                                  max_relative_positions=max_relative_positions, scale=1 / math.sqrt(3 * q.shape[-1]))
        return (torch.softmax(scores, -1) * keep / (1 - p)) @ v

    expected = run(reference_with_mask, tensors, mask, shape, torch.float64, grad_out)
    assert relative_error(first[0], expected[0]) <= TOLERANCE[torch.float32]
    for got, want in zip(first[1], expected[1]):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


def test_model_with_fused_attention_equals_reference_end_to_end():
    from deberta_ds.config import RTDConfig, preset
    from deberta_ds.model import ReplacedTokenDetection
    from tests.hf_helpers import padded_batch

    outputs = []
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        config = preset("tiny", vocab_size=200, hidden_dropout=0.0, attention_dropout=0.0, attention_impl=impl,
                        num_layers=2)
        model = ReplacedTokenDetection(RTDConfig(discriminator=config, mask_token_id=5))
        ids, mask = padded_batch(200, [37, 20], seed=1)
        labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.2, ids, -100)
        labels[mask == 0] = -100
        out = model(ids.masked_fill(labels != -100, 5), mask, labels, rng=torch.Generator().manual_seed(3))
        out.loss.backward()
        outputs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    assert abs(outputs[0][0] - outputs[1][0]) <= 1e-5
    for name, grad in outputs[0][1].items():
        assert relative_error(outputs[1][1][name], grad.double()) <= 1e-4, name


def test_custom_op_traces_under_torch_compile():
    shape = SHAPES[0]
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), False)
    q, k, v, pos_key, pos_query = (t.float() for t in tensors)

    def attention(q, k, v, pos_key, pos_query):
        return disentangled_attention_fused(q, k, v, pos_key, pos_query, None, position_buckets=4,
                                            max_relative_positions=8)

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v, pos_key, pos_query), attention(q, k, v, pos_key, pos_query))


def test_auto_falls_back_to_the_reference_per_variant_when_the_kernel_does_not_compile(monkeypatch):
    """A variant that does not compile (Triton 3.6 once rejected the p2c-only forward) falls back
    alone: the kernel keeps serving every other variant, and is not retried for the failed one."""
    from triton.runtime.errors import OutOfResources

    import deberta_ds.kernels as kernels

    calls = []

    def kernel_without_p2c_only(q, k, v, pos_key, pos_query, attention_mask, **kwargs):
        calls.append(pos_key is None)
        if pos_key is None:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return disentangled_attention_fused(q, k, v, pos_key, pos_query, attention_mask, **kwargs)

    monkeypatch.setattr(kernels, "_fused", lambda: (kernel_without_p2c_only, None))
    monkeypatch.setattr(kernels, "_variants_that_do_not_compile", set())
    (q, k, v, pos_key, pos_query), mask = inputs(SHAPES[0], torch.float32, ("c2p", "p2c"), True)
    q, k, v, pos_key, pos_query = (t.float() for t in (q, k, v, pos_key, pos_query))
    kwargs = dict(position_buckets=4, max_relative_positions=8)
    auto = kernels.select_attention("auto", torch.device("cuda"))
    variant = r"\('float32', 32, False, True, True, False, False\)"   # (dtype, d, c2p, p2c, mask, dropout, docs)
    with pytest.warns(UserWarning, match=r"does not compile here for .*" + variant):
        out = auto(q, k, v, None, pos_query, mask, **kwargs)
    assert torch.equal(out, disentangled_attention_reference(q, k, v, None, pos_query, mask, **kwargs))
    auto(q, k, v, None, pos_query, mask, **kwargs)                          # not retried
    both = auto(q, k, v, pos_key, pos_query, mask, **kwargs)                # another variant: the kernel
    assert calls == [True, False]
    assert torch.equal(both, disentangled_attention_fused(q, k, v, pos_key, pos_query, mask, **kwargs))
    with pytest.raises(OutOfResources):  # asking for the kernel explicitly never hides its failure
        kernels.select_attention("fused", torch.device("cuda"))(q, k, v, None, pos_query, mask, **kwargs)


DOCUMENT_LENGTHS = [40, 25, 35]  # 100 positions: 32-row tiles with one, two and no shared document


@pytest.mark.parametrize("attention", [disentangled_attention_reference, disentangled_attention_fused],
                         ids=["reference", "fused"])
def test_packed_documents_attend_as_if_each_ran_alone(attention):
    """document_ids keep attention inside each document: every document's outputs and q/k/v
    gradients in the packed sample equal those of the document run alone, and the relative
    tables' gradients are the sum over documents (relative positions do not see the offset).
    fp32, 1e-5 relative; tiles whose query and key blocks share no document are skipped."""
    shape = (1, 2, sum(DOCUMENT_LENGTHS), 32, 8, 24)
    tensors, _ = inputs(shape, torch.float32, ("c2p", "p2c"), False, seed=4)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    document_ids = torch.repeat_interleave(torch.arange(len(DOCUMENT_LENGTHS)), torch.tensor(DOCUMENT_LENGTHS))[None]
    packed, packed_grads = run(attention, tensors, None, shape, torch.float32, grad_out, document_ids=document_ids)
    table_grads = [torch.zeros_like(g, dtype=torch.float64) for g in packed_grads[3:]]
    start = 0
    for length in DOCUMENT_LENGTHS:
        rows = slice(start, start + length)
        alone_tensors = [t[:, :, rows] for t in tensors[:3]] + tensors[3:]
        alone, alone_grads = run(attention, alone_tensors, None, (*shape[:2], length, *shape[3:]), torch.float32,
                                 grad_out[:, :, rows])
        assert relative_error(packed[:, :, rows], alone.double()) <= 1e-5
        for got, want in zip(packed_grads[:3], alone_grads[:3]):
            assert relative_error(got[:, :, rows], want.double()) <= 1e-5
        for total, want in zip(table_grads, alone_grads[3:]):
            total += want.double()
        start += length
    for got, want in zip(packed_grads[3:], table_grads):
        assert relative_error(got, want) <= 1e-5


def test_fused_document_attention_with_padding_matches_float64_reference():
    """Documents, padding and every term together, two samples with different packings."""
    shape = (2, 2, 70, 32, 8, 24)
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), True, seed=6)
    document_ids = torch.stack([torch.arange(70) // 33, torch.arange(70) // 9])
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected, expected_grads = run(disentangled_attention_reference, tensors, mask, shape, torch.float64, grad_out,
                                   document_ids=document_ids)
    actual, actual_grads = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out,
                               document_ids=document_ids)
    assert relative_error(actual, expected) <= TOLERANCE[torch.float32]
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]
