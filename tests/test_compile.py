"""torch.compile per encoder layer and of the generator's cross-entropy (train.compile): same
results as eager, no graph break in model code, no recompilation from one step to the next, no
fp32 [M, V] buffer in the compiled cross-entropy. CPU inductor, tiny shapes."""

import copy

import pytest
import torch

from deberta_ds.model.rtd import IGNORE_INDEX, compile_training_step, masked_positions
from deberta_ds.parallel.layers import vocab_parallel_cross_entropy
from deberta_ds.parallel.state import TensorParallel
from deberta_ds.training.run_config import run_config_from_dict
from tests.test_rtd_model import make_rtd, masked_batch


def _graph_break_sites(layer, *args, **kwargs) -> list[str]:
    explained = torch._dynamo.explain(layer)(*args, **kwargs)
    return [f"{b.user_stack[-1].filename.split('/deberta_ds/')[-1]}:{b.user_stack[-1].lineno}"
            for b in explained.break_reasons]


def test_encoder_layers_compile_without_a_graph_break():
    torch._dynamo.reset()
    model = make_rtd()
    encoder = model.generator.encoder
    hidden, mask = torch.randn(2, 16, 64), torch.ones(2, 16, dtype=torch.long)
    rel = encoder.relative_table()
    layer = encoder.layers[-1]
    plain = _graph_break_sites(layer, hidden, mask, rel)
    keys = layer.attention.keys_values(hidden, rel)
    emd = _graph_break_sites(layer, hidden, mask, rel, query_states=hidden + 1, keys=keys)
    # The reference attention's reachable slot range is a host constant of L (reachable_slots).
    assert plain == [] and emd == []


def eager_and_compiled(eager):
    """(eager, a compiled copy as train.compile makes it, (ids, mask, labels, masked) of a small batch);
    dynamo's counters cleared."""
    torch._dynamo.reset()
    compiled = copy.deepcopy(eager)
    compile_training_step(compiled)
    ids, mask, labels = masked_batch(lengths=(24, 17), every=3)
    torch._dynamo.utils.counters.clear()
    return eager, compiled, (ids, mask, labels, masked_positions(labels))


@pytest.mark.slow
def test_compiled_pair_equals_eager_and_does_not_recompile_across_steps():
    eager, compiled, (ids, mask, labels, masked) = eager_and_compiled(make_rtd())
    for step in range(3):
        outputs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                out = model(ids, mask, labels, rng=torch.Generator().manual_seed(step), masked=masked)
                out.loss.backward()
            outputs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            with torch.no_grad():  # a plain SGD step, so each step sees new weights
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
        (a, grads_a), (b, grads_b) = outputs
        assert torch.allclose(a.loss, b.loss, atol=1e-5, rtol=1e-5)
        assert torch.allclose(a.generator.logits, b.generator.logits, atol=1e-5, rtol=1e-5)
        assert torch.allclose(a.discriminator.logits, b.discriminator.logits, atol=1e-5, rtol=1e-5)
        assert grads_a.keys() == grads_b.keys()
        for name, grad in grads_a.items():
            assert torch.allclose(grad, grads_b[name], atol=1e-5, rtol=1e-5), (step, name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers did run compiled


def test_compile_defaults_on_for_cuda_below_zero3_and_is_refused_with_zero3():
    train = run_config_from_dict({}).train
    assert train.compiles(torch.device("cuda")) and not train.compiles(torch.device("cpu"))
    zero3 = run_config_from_dict({"train": {"zero_stage": 3}}).train
    assert not zero3.compiles(torch.device("cuda"))
    assert run_config_from_dict({"train": {"compile": True}}).train.compiles(torch.device("cpu"))
    with pytest.raises(ValueError, match="train.compile"):
        run_config_from_dict({"train": {"zero_stage": 3, "compile": True}})


def _large_allocations(step, threshold: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [e.name for e in prof.events() if e.cpu_memory_usage >= threshold]


@pytest.mark.slow
def test_compiled_cross_entropy_reads_bf16_logits_without_an_fp32_copy():
    """Measured with the profiler's memory counters: the eager cross-entropy allocates fp32
    [M, V] buffers (one per pass), the compiled one none; values and gradients agree."""
    torch._dynamo.reset()
    rows, vocab = 64, 3001
    compiled = torch.compile(vocab_parallel_cross_entropy)
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16).mul(3).requires_grad_()
    target = torch.randint(0, vocab, (rows,))
    target[::7] = IGNORE_INDEX
    results = {}
    for name, function in (("eager", vocab_parallel_cross_entropy), ("compiled", compiled)):
        function(logits, target, vocab, TensorParallel()).sum().backward()  # compiles, outside the profile
        logits.grad = None

        def step(function=function, name=name):
            loss = function(logits, target, vocab, TensorParallel())
            loss.sum().backward()
            results[name] = (loss.detach(), logits.grad.clone())
            logits.grad = None
        results[f"{name} allocations"] = _large_allocations(step, rows * vocab * 4)
    assert results["eager allocations"] and results["compiled allocations"] == []
    assert torch.allclose(results["eager"][0], results["compiled"][0], atol=1e-5)
    assert torch.allclose(results["eager"][1].float(), results["compiled"][1].float(), atol=1e-2)  # bf16 gradients
