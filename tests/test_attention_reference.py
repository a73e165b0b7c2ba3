"""Reference attention and relative positions against the spec, written as plain loops."""

import math

import pytest
import torch

from deberta_ds.kernels import (
    attention_settings,
    choose_implementation,
    disentangled_attention,
    implementation,
    reference_bytes,
)
from deberta_ds.kernels.reference import disentangled_attention_reference
from deberta_ds.kernels.settings import AttentionSettings
from deberta_ds.relative_position import log_bucket, reachable_slots, relative_slots


def spec_bucket(r: int, k: int, max_rel: int) -> int:
    """deberta_v3.md: bucket(r) = r for |r| <= k/2, else sign(r)(ceil(ln(|r|/mid)/ln((max-1)/mid)(mid-1)) + mid)."""
    mid = k // 2
    if abs(r) <= mid:
        return r
    sign = 1 if r > 0 else -1
    return sign * (math.ceil(math.log(abs(r) / mid) / math.log((max_rel - 1) / mid) * (mid - 1)) + mid)


def test_bucket_table_values_of_v3():
    buckets = log_bucket(torch.tensor([128, 135, 256, 500, 506, 511, 2000]), 256, 512).tolist()
    assert buckets[:4] == [128, 133, 192, 254]
    assert buckets[4] == buckets[5] == 255
    slots = relative_slots(600, 600, 256, 512)
    assert slots[600 - 1, 0] == 511 and slots[506, 0] == 511  # r >= 506 -> last slot


def test_bucket_is_odd_and_matches_spec_formula():
    r = torch.arange(-511, 512)
    buckets = log_bucket(r, 256, 512)
    assert torch.equal(buckets, -log_bucket(-r, 256, 512))
    assert buckets.tolist() == [spec_bucket(x, 256, 512) for x in r.tolist()]


def test_clamping_past_max_relative_positions_follows_hf():
    """Documented decision: no distance clamp (HF). r <= -512 lands on slot 0; the published
    code would clamp r to -511 first and land on slot 1. Both agree for |r| <= 511."""
    slots = relative_slots(700, 700, 256, 512)
    assert slots[0, 511].item() == 1           # r = -511: same in both conventions
    assert slots[0, 512].item() == 0           # r = -512: HF's slot (official: 1)
    assert slots[699, 0].item() == 511


@pytest.mark.parametrize("seq_len, buckets, max_rel", [(1, 8, 64), (16, 256, 512), (65, 8, 64), (160, 32, 128),
                                                      (700, 256, 512)])
def test_the_host_slot_range_is_the_tables_smallest_and_largest_slot(seq_len, buckets, max_rel):
    """reachable_slots (a host constant of L that compiled code keeps) bounds the rows the table reaches."""
    table = relative_slots(seq_len, seq_len, buckets, max_rel)
    assert reachable_slots(seq_len, buckets, max_rel) == (int(table.min()), int(table.max()))


def loop_reference(q, k, v, pos_key, pos_query, mask, buckets, max_rel):
    """Double loop straight from deberta_v3.md, float64."""
    B, h, L, d = q.shape
    scale = 1.0 / math.sqrt(d * (1 + (pos_key is not None) + (pos_query is not None)))
    out = torch.zeros_like(v)
    for b in range(B):
        for head in range(h):
            for i in range(L):
                if mask is not None and not mask[b, i]:
                    continue  # padded query rows output 0
                scores = []
                for j in range(L):
                    slot = min(max(spec_bucket(i - j, buckets, max_rel) + buckets, 0), 2 * buckets - 1)
                    s = q[b, head, i] @ k[b, head, j]
                    if pos_key is not None:
                        s = s + q[b, head, i] @ pos_key[head, slot]
                    if pos_query is not None:
                        s = s + k[b, head, j] @ pos_query[head, slot]
                    keep = mask is None or bool(mask[b, j])
                    scores.append(s * scale if keep else torch.tensor(-math.inf, dtype=q.dtype))
                probs = torch.softmax(torch.stack(scores), 0)
                out[b, head, i] = probs @ v[b, head]
    return out


@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",), ()])
def test_reference_matches_float64_loop(terms):
    gen = torch.Generator().manual_seed(0)
    B, h, L, d, buckets, max_rel = 2, 2, 40, 8, 8, 24   # linear, log and saturated regions all appear
    q, k, v = (torch.randn(B, h, L, d, generator=gen, dtype=torch.float64) for _ in range(3))
    pos_key = torch.randn(h, 2 * buckets, d, generator=gen, dtype=torch.float64) if "c2p" in terms else None
    pos_query = torch.randn(h, 2 * buckets, d, generator=gen, dtype=torch.float64) if "p2c" in terms else None
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 29:] = 0
    expected = loop_reference(q, k, v, pos_key, pos_query, mask, buckets, max_rel)
    actual = disentangled_attention_reference(q, k, v, pos_key, pos_query, mask, position_buckets=buckets,
                                              max_relative_positions=max_rel)
    assert (actual - expected).abs().max().item() <= 1e-10
    assert torch.all(actual[1, :, 29:] == 0)


def test_reference_dropout_is_reproducible_from_seed():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    def run(seed):
        return disentangled_attention_reference(q, k, v, None, None, None, position_buckets=4,
                                                max_relative_positions=8, dropout_p=0.3, seed=seed)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_dispatch_point_uses_the_settings_built_once():
    settings = AttentionSettings(4, 8, None, 0.5, "reference")
    q = torch.randn(1, 1, 6, 8)
    out = disentangled_attention(q, q, q, None, None, None, settings)             # eval: no dropout
    assert torch.equal(out, disentangled_attention_reference(q, q, q, None, None, None, position_buckets=4,
                                                             max_relative_positions=8))
    assert not torch.equal(disentangled_attention(q, q, q, None, None, None, settings, training=True), out)
    assert implementation("reference") is disentangled_attention_reference
    with pytest.raises(ValueError, match="impl"):
        AttentionSettings(4, 8, impl="flash")


def test_auto_picks_the_measured_faster_implementation_that_fits():
    """The rule of kernels/__init__: without CUDA the reference; on CUDA the implementation measured
    faster at the nearest length (the reference, in the only measurement so far) while one sample's
    reference scores over all layers fit the budget, else the kernel (falling back per variant)."""
    base = dict(heads=12, layers=12)
    assert choose_implementation("auto", cuda=False, seq_len=8192, memory_budget=0, **base) == "reference"
    need = reference_bytes(512, 12, 12)
    assert need == 16 * 12 * 512 ** 2 * 12
    assert choose_implementation("auto", cuda=True, seq_len=512, memory_budget=need, **base) == "reference"
    assert choose_implementation("auto", cuda=True, seq_len=512, memory_budget=need - 1,
                                 **base) == "fused_or_reference"
    assert choose_implementation("auto", cuda=True, seq_len=8192, memory_budget=35 * 2 ** 30,
                                 **base) == "fused_or_reference"
    for explicit in ("reference", "fused"):
        assert choose_implementation(explicit, cuda=True, seq_len=512, memory_budget=0, **base) == explicit
    with pytest.raises(ValueError, match="attention_impl"):
        choose_implementation("flash", cuda=False, seq_len=512, memory_budget=None, **base)


def test_encoder_builds_one_settings_object_for_all_its_layers():
    from deberta_ds.config import preset
    from deberta_ds.model.encoder import Encoder

    config = preset("tiny", attention_impl="auto", attention_dropout=0.25)
    encoder = Encoder(config)
    settings = {id(layer.attention.settings) for layer in encoder.layers}
    assert len(settings) == 1
    built = encoder.layers[0].attention.settings
    # the reference: no CUDA here, and on a GPU one tiny sample's scores (67 MB) fit
    assert built == AttentionSettings(32, 128, config.attention_scale, 0.25, "reference")
    assert attention_settings(config, config.num_heads, cuda=True, memory_budget=0).impl == "fused_or_reference"
