"""The fused kernel's custom ops under torch.compile (CPU: TRITON_INTERPRET=1, tiny shapes).

- torch.library.opcheck on both ops (schema, fake tensors with the real op's shapes, dtypes and
  strides, autograd registration, AOT dispatch with dynamic shapes), with and without mask,
  documents and dropout, non-contiguous q (as the encoder passes it);
- a compiled encoder layer (AOT autograd through the fake implementations, fullgraph) and a
  compiled RTD pair (inductor, `train.compile`'s path; slow) with the fused kernel and dropout on
  equal eager: outputs and every gradient within 1e-5 (fp32; inductor fuses the layer's other ops
  differently), same torch seed. Inductor draws its random numbers from its own Philox stream
  (seeded from torch's generator: reproducible, but not eager's draws); `fallback_random` makes it
  call torch's random ops, as eager does, so both runs draw the same masks and the same kernel seed;
- zero graph breaks with dropout on (the seed is a device tensor drawn in the graph);
- the kernel's dropout is reproducible from the run's seed and resumes from the RNG states a
  checkpoint writes.
"""

import copy

import pytest
import torch

from deberta_ds.config import RTDConfig, preset
from deberta_ds.kernels import fused
from deberta_ds.model import ReplacedTokenDetection
from tests.test_compile import eager_and_compiled

DROPOUT = 0.1


def op_inputs(terms, mask, documents, dropout, B=2, h=2, L=24, d=16, buckets=4):
    """The forward op's arguments; q is a transposed view like the encoder's [B, L, h, d] -> [B, h, L, d]."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, h, d, generator=gen).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, h, L, d, generator=gen).requires_grad_() for _ in range(2))
    pos_key, pos_query = (torch.randn(h, 2 * buckets, d, generator=gen).requires_grad_() if term in terms else None
                          for term in ("c2p", "p2c"))
    keep = None
    if mask:
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[-1, L // 2:] = False
    document_ids = (torch.arange(L) // 7).expand(B, L).contiguous() if documents else None
    seed = fused.dropout_seed(5, "cpu") if dropout else None
    return (q, k, v, pos_key, pos_query, keep, document_ids, seed, buckets, 2 * buckets, 0.2, dropout)


@pytest.mark.parametrize("terms,mask,documents,dropout", [(("c2p", "p2c"), False, False, 0.0),
                                                          (("c2p",), True, True, 0.2)])
def test_both_custom_ops_pass_opcheck(terms, mask, documents, dropout):
    args = op_inputs(terms, mask, documents, dropout)
    torch.library.opcheck(fused._forward_op, args)
    out, lse = fused._forward_op(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(fused._backward_op, (grad_out, *detached[:8], out.detach(), lse.detach(), *detached[8:]))


def fused_rtd(**overrides) -> ReplacedTokenDetection:
    config = preset("tiny", hidden_dropout=DROPOUT, attention_dropout=DROPOUT, attention_impl="fused", num_layers=2,
                    **overrides)
    torch.manual_seed(0)
    return ReplacedTokenDetection(RTDConfig(discriminator=config, mask_token_id=5))


def gradients(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_close(actual, expected, what):
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5), (what, (actual - expected).abs().max())


def test_compiled_layer_with_fused_dropout_equals_eager_without_a_graph_break():
    torch._dynamo.reset()
    encoder = fused_rtd().discriminator.encoder
    layer = encoder.layers[0]
    hidden, mask = torch.randn(2, 20, 64), torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    rel = encoder.relative_table().detach()
    explained = torch._dynamo.explain(layer)(hidden, mask, rel)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = copy.deepcopy(layer)
    compiled.compile(dynamic=False, backend="aot_eager", fullgraph=True)
    results = []
    for module in (layer, compiled):
        leaf = hidden.clone().requires_grad_()
        torch.manual_seed(3)
        out = module(leaf, mask, rel)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out.detach(), leaf.grad, gradients(module)))
    (eager, eager_dx, eager_grads), (comp, comp_dx, comp_grads) = results
    assert_close(comp, eager, "output")
    assert_close(comp_dx, eager_dx, "d hidden")
    assert eager_grads.keys() == comp_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        assert_close(comp_grads[name], grad, name)
    torch.manual_seed(4)   # another seed, other masks: dropout is on in the compiled layer
    assert not torch.allclose(compiled(hidden, mask, rel), comp, atol=1e-3)


@pytest.mark.slow
def test_compiled_pair_with_fused_dropout_equals_eager_without_a_graph_break():
    eager, compiled, (ids, mask, labels, masked) = eager_and_compiled(fused_rtd())
    results = []
    for model in (eager, compiled):
        with torch._inductor.config.patch(fallback_random=True):
            torch.manual_seed(7)
            out = model(ids, mask, labels, rng=torch.Generator().manual_seed(0), masked=masked)
            out.loss.backward()
        results.append((out, gradients(model)))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    (a, grads_a), (b, grads_b) = results
    assert_close(b.loss, a.loss, "loss")
    assert_close(b.generator.logits, a.generator.logits, "generator logits")
    assert_close(b.discriminator.logits, a.discriminator.logits, "discriminator logits")
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert_close(grads_b[name], grad, name)


def test_fused_dropout_follows_the_run_seed_and_resumes_from_the_checkpointed_rng_states(tmp_path):
    """The kernel's seed comes from torch's generator of q's device: the same torch seed gives the
    same masks, another seed others, and restoring the RNG states a checkpoint writes
    (checkpoint._save_rng_states / _load_rng_states) mid-run replays the rest of the run."""
    from deberta_ds.training.checkpoint import _load_rng_states, _save_rng_states

    q = torch.zeros(1, 2, 16, 16)
    v = torch.eye(16)[None, None, :, :16].expand(1, 2, 16, 16).contiguous()

    def step():  # with q = k = 0 and v = I the output is the dropped-out uniform probability matrix
        return fused.disentangled_attention_fused(q, q, v, None, None, None, position_buckets=4,
                                                  max_relative_positions=8, dropout_p=0.5) != 0

    torch.manual_seed(11)
    uninterrupted = [step() for _ in range(3)]
    torch.manual_seed(11)
    resumed = [step()]
    _save_rng_states(tmp_path / "rng.safetensors", None)
    torch.manual_seed(12)                   # the interrupted run goes on elsewhere
    other = step()
    _load_rng_states(tmp_path / "rng.safetensors", None)
    resumed += [step(), step()]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))
    assert not torch.equal(uninterrupted[0], uninterrupted[1])          # each call draws a new seed
    assert not any(torch.equal(other, mask) for mask in uninterrupted)


def test_the_seed_drawn_in_an_inductor_graph_follows_the_run_seed_and_its_rng_state():
    """Without fallback_random (train.compile's setting) inductor draws the seed from its own Philox
    stream, seeded from torch's generator: the same torch seed, or restored generator states, give the
    same kernel seed; each call draws a new one."""
    from deberta_ds.parallel.random import get_rng_states, set_rng_states

    torch._dynamo.reset()
    draw = torch.compile(lambda x: x + fused.dropout_seed(None, x.device))
    zero = torch.zeros(1, dtype=torch.int64)
    torch.manual_seed(0)
    first = draw(zero)
    saved = get_rng_states(None)
    second = draw(zero)
    set_rng_states(saved, None)
    assert torch.equal(draw(zero), second) and not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(draw(zero), first)
    assert 0 <= int(first) < fused.SEED_RANGE
