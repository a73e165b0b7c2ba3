"""The fused Triton kernel against the float64 reference (CPU: TRITON_INTERPRET=1, small shapes).

Tolerances, max |fused - float64 reference| relative to max |reference| (1 for outputs):
fp32 2e-5, fp16 5e-3, bf16 4e-2 (forward and all five gradients). The kernels run with small tiles
(SMALL: 32 x 16) so that short lengths have every tile class (saturated high and low, band, mixed)
in every kernel, and with the default 128 x 64 tiles at L = 600-700 with 256 buckets. bf16 is
checked on CUDA only: Triton's interpreter does not handle bf16 tensors correctly.
"""

import math

import pytest
import torch

from deberta_ds.kernels.fused import disentangled_attention_fused
from deberta_ds.kernels.reference import attention_scores, default_scale, disentangled_attention_reference
from deberta_ds.kernels.settings import AttentionSettings, quantised_dropout_rate
from deberta_ds.kernels.tables import layout
from deberta_ds.kernels.triton_attention import DEFAULT_TILES, Tile, Tiles, fused_backward, fused_forward, launch_tiles
from tests.kernel_helpers import tile_classes
from tests.test_kernel_compile import TRITONS

TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
SMALL = Tiles(Tile(32, 16, 4, 1), Tile(32, 16, 4, 1), Tile(32, 16, 4, 1), Tile(32, 16, 4, 1))
SHAPES = [  # (B, h, L, d, buckets, max_relative)
    (2, 1, 45, 32, 8, 24),      # L not a tile multiple, saturated tiles of both sides
    (1, 2, 70, 64, 16, 32),     # log buckets and saturation, two heads
    (1, 1, 33, 128, 8, 16),     # head dim 128
    (1, 1, 65, 32, 8, 64),      # a tile whose distances span exactly the last two slots
    (1, 1, 160, 32, 32, 128),   # the same at 32 buckets
    (2, 1, 24, 32, 8, 28),      # SMALL tile corners one past each band edge (band vs mixed tests)
    (2, 1, 65, 32, 8, 96),      # SMALL tile corners on each band edge (saturated vs mixed tests)
]
CLASSES = {"saturated high", "saturated low", "band", "mixed"}


def test_small_tiles_give_every_kernel_every_tile_class():
    for tile, key_major in [(SMALL.forward, False), (SMALL.dq, False), (SMALL.dkdv, True)]:
        kinds = set()
        for _, _, L, _, k, max_rel in SHAPES:
            kinds |= set(tile_classes(L, k, max_rel, tile.rows, tile.cols, key_major))
        assert kinds == CLASSES


def test_small_tiles_put_a_corner_on_and_one_past_each_band_edge():
    """An off-by-one in a kernel's scalar class tests shows only where a tile's extreme distance sits
    on a band edge (saturated vs mixed: such a mutation fails the parity tests) or one past it (band
    vs mixed: there the skewed view reads the saturated column itself, so that off-by-one is
    harmless, as a mutation check confirmed): SHAPES have all four, in both orientations
    (query-major: 32 queries x 16 keys; key-major: 32 keys x 16 queries)."""
    found = set()
    for _, _, L, _, k, max_rel in SHAPES:
        lay = layout(L, k, max_rel, SMALL.pad)
        for key_major in (False, True):
            queries, keys = (16, 32) if key_major else (32, 16)
            for m0 in range(0, L, queries):
                for n0 in range(0, L, keys):
                    lowest, highest = m0 - n0 - (keys - 1), m0 + queries - 1 - n0
                    edges = [("lowest = r_max", lowest == lay.r_max), ("highest = r_min", highest == lay.r_min),
                             ("lowest = r_min - 1", lowest == lay.r_min - 1),
                             ("highest = r_max + 1", highest == lay.r_max + 1)]
                    found |= {(edge, key_major) for edge, hit in edges if hit}
    assert len(found) == 8, found


def test_default_tiles_give_every_class_at_700_with_256_buckets():
    for tile, key_major in [(DEFAULT_TILES.forward, False), (DEFAULT_TILES.dkdv, True)]:
        assert set(tile_classes(700, 256, 512, tile.rows, tile.cols, key_major)) == CLASSES


# The d = 128 tiles `launch_tiles` picks under each compiler the compile test gates (16-query dK/dV steps,
# 64-row dQ and forward tiles), each run once under the interpreter: {tiles: the compilers that launch them}.
WIDE_TILES = {}
for _version in TRITONS:
    WIDE_TILES.setdefault(launch_tiles(128, _version), []).append(_version)


@pytest.mark.parametrize("L,k,max_rel,tiles", [(600, 256, 512, DEFAULT_TILES), (2048, 256, 512, DEFAULT_TILES),
                                               (160, 32, 128, SMALL), (45, 8, 24, SMALL), (1, 4, 8, SMALL),
                                               *[(600, 256, 512, tiles) for tiles in WIDE_TILES]])
def test_band_buffers_have_one_writer_per_cell_and_mixed_tiles_miss_other_cells(L, k, max_rel, tiles):
    """Address arithmetic of the skewed views: every band cell (i, j) has its own address in row i's
    band columns, and a mixed tile's block store puts its out-of-band cells only into row i's
    saturated or pad columns (the mixed-block padding), for both band buffers and every backward
    tile (the default and SMALL tiles, and each compiler's d = 128 tiles)."""
    lay = layout(L, k, max_rel, tiles.pad)
    for origin, pad, tile, key_major in [(lay.e_pad + lay.r_max + 1, lay.e_pad, tiles.dq, False),
                                         (lay.f_pad + 1 - lay.r_min, lay.f_pad, tiles.dkdv, True),
                                         (lay.f_pad + 1 - lay.r_min, lay.f_pad, tiles.dkdv_dropout, True)]:
        rows = torch.arange(L)[:, None]                     # queries for G_c2p, keys for G_p2c
        cols = torch.arange(L)[None, :]
        rel = (cols - rows) if key_major else (rows - cols)
        in_band = (rel >= lay.r_min) & (rel <= lay.r_max)
        address = rows * (lay.row_stride - 1) + cols + origin
        assert address[in_band].unique().numel() == int(in_band.sum())
        assert torch.equal(address[in_band] // lay.row_stride, rows.expand(L, L)[in_band])
        column = address % lay.row_stride - pad
        assert ((column >= 1) & (column <= lay.columns - 2))[in_band].all()
        for a0 in range(0, L, tile.rows):
            for b0 in range(0, L, tile.cols):
                band = in_band[a0:a0 + tile.rows, b0:b0 + tile.cols]
                if band.any() and not band.all():
                    hit = column[a0:a0 + tile.rows, b0:b0 + tile.cols][~band]
                    assert not ((hit >= 1) & (hit <= lay.columns - 2)).any(), (a0, b0)
                    # ...and only into their own row (its pads hold that row's saturated values)
                    tile_rows = rows.expand(L, L)[a0:a0 + tile.rows, b0:b0 + tile.cols]
                    tile_address = address[a0:a0 + tile.rows, b0:b0 + tile.cols]
                    assert torch.equal(tile_address // lay.row_stride, tile_rows), (a0, b0)


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


def kernel(tiles, seed=0):
    """The kernel's forward and backward with the given tiles, as an attention function for `run`."""
    seed = torch.tensor([seed], dtype=torch.int64)
    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, pos_key, pos_query, mask, settings, document_ids):
            out, lse = fused_forward(q, k, v, pos_key, pos_query, mask, document_ids, settings, seed, tiles)
            ctx.save_for_backward(q, k, v, pos_key, pos_query, mask, document_ids, out, lse)
            ctx.settings = settings
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, pos_key, pos_query, mask, document_ids, out, lse = ctx.saved_tensors
            grads = fused_backward(grad_out, q, k, v, pos_key, pos_query, mask, document_ids, out, lse,
                                   ctx.settings, seed, tiles)
            return (*grads, None, None, None)

    def attention(q, k, v, pos_key, pos_query, mask, *, position_buckets, max_relative_positions, dropout_p=0.0,
                  document_ids=None):
        settings = AttentionSettings(position_buckets, max_relative_positions,
                                     default_scale(q.shape[-1], pos_key, pos_query), dropout_p, "fused")
        return Attention.apply(q, k, v, pos_key, pos_query, mask, settings, document_ids)
    return attention


def relative_error(actual, expected):
    return (actual.double() - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def assert_matches_reference(shape, terms, padding, dtype, tiles, seed=0, **kwargs):
    tensors, mask = inputs(shape, dtype, terms, padding, seed)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed + 1))
    expected, expected_grads = run(disentangled_attention_reference, tensors, mask, shape, torch.float64, grad_out,
                                   **kwargs)
    actual, actual_grads = run(kernel(tiles), tensors, mask, shape, dtype, grad_out, **kwargs)
    assert actual.dtype == dtype
    assert relative_error(actual, expected) <= TOLERANCE[dtype]
    if mask is not None:
        assert torch.all(actual[-1, :, mask[-1] == 0] == 0)
    for name, got, want in zip(["dq", "dk", "dv", "dKr/dQr", "dQr"], actual_grads, expected_grads):
        assert relative_error(got, want) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms,padding", [(("c2p", "p2c"), True), (("c2p",), False), (("p2c",), True),
                                           ((), False)])
def test_fp32_forward_and_gradients_match_float64_reference(shape, terms, padding):
    assert_matches_reference(shape, terms, padding, torch.float32, SMALL)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]])
def test_pointer_loads_match_float64_reference(shape):
    """Tiles.tma off (a kernel_tune candidate): table blocks by masked pointer loads and stores."""
    assert_matches_reference(shape, ("c2p", "p2c"), True, torch.float32, SMALL._replace(tma=False))


@pytest.mark.parametrize("shape", [(1, 1, 650, 64, 256, 512), (1, 1, 65, 32, 8, 64), (1, 1, 160, 32, 32, 128)])
def test_default_tiles_match_float64_reference(shape):
    assert_matches_reference(shape, ("c2p", "p2c"), True, torch.float32, DEFAULT_TILES)


BF16_ON_CPU = pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="Triton's interpreter (3.7.1 and 3.9.0 checked) corrupts bf16 loads; "
                                        "bf16 runs in the CUDA tests")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_ON_CPU)])
def test_low_precision_matches_float64_reference(dtype):
    assert_matches_reference(SHAPES[0], ("c2p", "p2c"), True, dtype, SMALL, seed=2)


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


def test_dropout_mask_is_keyed_by_seed_head_batch_and_position():
    keep = kernel_dropout_mask(2, 2, 40, 0.2, seed=7, width=16)     # three calls: 16 + 16 + 8 columns
    assert abs(keep.float().mean().item() - 0.8) < 0.03
    assert torch.equal(keep, kernel_dropout_mask(2, 2, 40, 0.2, seed=7, width=32))   # data-independent
    assert not torch.equal(keep[0, 0], keep[0, 1])                  # heads differ
    assert not torch.equal(keep[0, 0], keep[1, 0])                  # batch elements differ
    assert not torch.equal(keep, kernel_dropout_mask(2, 2, 40, 0.2, seed=8, width=16))
    assert (keep[0, 0] != keep[0, 0].T).any()                       # (i, j) and (j, i) draw separately


def test_dropout_matches_reference_with_the_kernels_mask_and_backward_is_deterministic():
    shape, p = (1, 2, 40, 32, 8, 24), 0.2
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), False, seed=4)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    first = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out, dropout_p=p, seed=7)
    again = run(disentangled_attention_fused, tensors, mask, shape, torch.float32, grad_out, dropout_p=p, seed=7)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    keep = kernel_dropout_mask(1, 2, 40, p, seed=7, width=32)

    def reference_with_mask(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets, max_relative_positions):
        scores = attention_scores(q, k, pos_key, pos_query, position_buckets=position_buckets,
                                  max_relative_positions=max_relative_positions, scale=1 / math.sqrt(3 * q.shape[-1]))
        return (torch.softmax(scores, -1) * keep / (1 - quantised_dropout_rate(p))) @ v

    expected = run(reference_with_mask, tensors, mask, shape, torch.float64, grad_out)
    assert relative_error(first[0], expected[0]) <= TOLERANCE[torch.float32]
    for got, want in zip(first[1], expected[1]):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


def assert_dropout_matches_the_kernels_mask(shape, p, tiles, seed):
    """With padding and dropout p, the kernels at `tiles` equal float64 attention under the keep-mask the
    kernel draws at its default tiles (`kernel_dropout_mask`)."""
    tensors, mask = inputs(shape, torch.float32, ("c2p", "p2c"), True, seed=seed)
    grad_out = torch.randn(*shape[:3], shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    keep = kernel_dropout_mask(*shape[:3], p, seed=0, width=32)

    def reference_with_mask(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets, max_relative_positions):
        scores = attention_scores(q, k, pos_key, pos_query, position_buckets=position_buckets,
                                  max_relative_positions=max_relative_positions, scale=1 / math.sqrt(3 * q.shape[-1]))
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, -1) * keep / (1 - quantised_dropout_rate(p))
        return (probs @ v) * attention_mask[:, None, :, None]

    expected = run(reference_with_mask, tensors, mask, shape, torch.float64, grad_out)
    actual = run(kernel(tiles), tensors, mask, shape, torch.float32, grad_out, dropout_p=p)
    assert relative_error(actual[0], expected[0]) <= TOLERANCE[torch.float32]
    for got, want in zip(actual[1], expected[1]):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


def test_dropout_with_every_tile_class_and_padding_matches_the_kernels_mask():
    """The keep-mask is a function of (seed, b*h, i, j) alone: drawn at one tile size, it reproduces the
    kernels at another (SMALL tiles: every class, both backward orientations, padding)."""
    assert_dropout_matches_the_kernels_mask((2, 1, 45, 32, 8, 24), 0.3, SMALL, seed=8)


@pytest.mark.parametrize("tiles", list(WIDE_TILES), ids=["triton " + "+".join(v) for v in WIDE_TILES.values()])
def test_every_compilers_d128_tiles_match_float64_with_padding_and_dropout(tiles):
    shape = (2, 1, 150, 128, 32, 96)
    assert_matches_reference(shape, ("c2p", "p2c"), True, torch.float32, tiles)
    assert_dropout_matches_the_kernels_mask(shape, 0.2, tiles, seed=3)


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
    shape = SHAPES[2]
    tensors, _ = inputs(shape, torch.float32, ("c2p", "p2c"), False)
    q, k, v, pos_key, pos_query = (t.float() for t in tensors)

    def attention(q, k, v, pos_key, pos_query):
        return disentangled_attention_fused(q, k, v, pos_key, pos_query, None, position_buckets=8,
                                            max_relative_positions=16)

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v, pos_key, pos_query), attention(q, k, v, pos_key, pos_query))


def test_auto_falls_back_to_the_reference_per_variant_when_the_kernel_does_not_compile(monkeypatch):
    """A variant that does not compile falls back alone: the kernel keeps serving every other
    variant, and is not retried for the failed one. (CPU tensors posing as CUDA ones.)"""
    from triton.runtime.errors import OutOfResources

    import deberta_ds.kernels as kernels

    calls = []

    def kernel_without_p2c_only(q, k, v, pos_key, pos_query, attention_mask, **kwargs):
        calls.append(pos_key is None)
        if pos_key is None:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return disentangled_attention_fused(q, k, v, pos_key, pos_query, attention_mask, **kwargs)

    monkeypatch.setattr(kernels, "_variants_that_do_not_compile", set())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    (q, k, v, pos_key, pos_query), mask = inputs(SHAPES[0], torch.float32, ("c2p", "p2c"), True)
    q, k, v, pos_key, pos_query = (t.float() for t in (q, k, v, pos_key, pos_query))
    kwargs = dict(position_buckets=8, max_relative_positions=24)
    auto = kernels._falling_back_to_reference(kernel_without_p2c_only)
    variant = r"\('float32', 32, False, True, True, False, False\)"   # (dtype, d, c2p, p2c, mask, dropout, docs)
    with pytest.warns(UserWarning, match=r"does not compile here for .*" + variant):
        out = auto(q, k, v, None, pos_query, mask, **kwargs)
    assert torch.equal(out, disentangled_attention_reference(q, k, v, None, pos_query, mask, **kwargs))
    auto(q, k, v, None, pos_query, mask, **kwargs)                          # not retried
    both = auto(q, k, v, pos_key, pos_query, mask, **kwargs)                # another variant: the kernel
    assert calls == [True, False]
    assert torch.equal(both, disentangled_attention_fused(q, k, v, pos_key, pos_query, mask, **kwargs))
    wide = [t.double() for t in (q, k, v, pos_key, pos_query)]                # float64: the reference's alone
    assert torch.equal(auto(*wide, mask, **kwargs), disentangled_attention_reference(*wide, mask, **kwargs))
    assert calls == [True, False]


DOCUMENT_LENGTHS = [40, 25, 35]  # 100 positions: 32 x 16 tiles inside one run, straddling, sharing none


@pytest.mark.parametrize("attention", [disentangled_attention_reference, kernel(SMALL)], ids=["reference", "fused"])
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


def test_documents_with_padding_and_recurring_ids_match_float64_reference():
    """Documents with padding and every term, two samples with different packings; in the second
    an id recurs after another document (the loop range then spans both runs)."""
    document_ids = torch.stack([torch.arange(70) // 33, (torch.arange(70) // 9) % 3])
    assert_matches_reference((2, 2, 70, 32, 8, 24), ("c2p", "p2c"), True, torch.float32, SMALL, seed=6,
                             document_ids=document_ids)
