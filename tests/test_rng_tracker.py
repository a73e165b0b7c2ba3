"""The TP RNG stream is state of the parallel state, not of the module (single process, CPU).

A `TensorParallel` of size 2 built without a process group is enough here: forking the stream
never communicates. The multi-process behaviour (streams differing across TP ranks, equal
across DP replicas) is tested in test_tensor_parallel_training.py.
"""

import contextlib

import pytest
import torch

import deberta_ds.parallel.random as rng
from deberta_ds.parallel.random import RNGStatesTracker, checkpoint, fork_tp_rng, seed_streams
from deberta_ds.parallel.state import ParallelState, TensorParallel


def tp2(rank: int = 0) -> ParallelState:
    return ParallelState(TensorParallel(2, rank, None, RNGStatesTracker()))


def draw(tp: TensorParallel) -> torch.Tensor:
    with fork_tp_rng(tp):
        return torch.rand(8)


def test_an_unseeded_fork_at_tp_above_one_is_an_error():
    with pytest.raises(RuntimeError, match=r"stream of TP rank 1 \(of 2\) is not seeded: call "
                                           r"deberta_ds.parallel.random.seed_streams\(seed, parallel\)"):
        fork_tp_rng(tp2(rank=1).tp)
    with pytest.raises(RuntimeError, match="not seeded"):  # a hand-built TP > 1 group without a tracker
        fork_tp_rng(TensorParallel(2, 0, None))


def test_tp_one_needs_no_tracker_and_forks_into_a_plain_nullcontext():
    parallel = ParallelState()
    seed_streams(3, parallel)
    assert parallel.tp.tracker is None
    assert isinstance(fork_tp_rng(parallel.tp), contextlib.nullcontext)  # torch.compile traces it
    state = torch.get_rng_state()
    with fork_tp_rng(parallel.tp):
        inside = torch.rand(4)
    torch.set_rng_state(state)
    assert torch.equal(inside, torch.rand(4))  # TP = 1 draws from the default stream


def test_two_trackers_in_one_process_do_not_share_state():
    first, second = tp2(), tp2()
    seed_streams(11, first)
    seed_streams(11, second)
    a1 = draw(first.tp)
    assert torch.equal(a1, draw(second.tp))   # the second stream was not advanced by the first's draw
    a2 = draw(first.tp)
    seed_streams(12, second)                  # reseeding one leaves the other where it was
    assert not torch.equal(a1, a2)
    reference = tp2()
    seed_streams(11, reference)
    draw(reference.tp), draw(reference.tp)
    assert torch.equal(draw(first.tp), draw(reference.tp))
    other_rank = tp2(rank=1)
    seed_streams(11, other_rank)
    assert not torch.equal(draw(other_rank.tp), a1)  # per TP rank: another stream


def test_the_fork_leaves_the_default_stream_where_it_was():
    parallel = tp2()
    seed_streams(5, parallel)
    state = torch.get_rng_state()
    draw(parallel.tp)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_tracker_is_not_part_of_the_groups_identity():
    """Equal groups with different trackers compare and hash equal (TensorParallel stays a frozen
    value; the tracker is state it carries), and random.py keeps no mutable state of its own."""
    assert TensorParallel(2, 0, None, RNGStatesTracker()) == TensorParallel(2, 0, None, RNGStatesTracker())
    assert hash(TensorParallel(2, 0, None, RNGStatesTracker())) == hash(TensorParallel(2, 0, None))
    assert not [name for name, value in vars(rng).items()
                if not name.startswith("__") and isinstance(value, (RNGStatesTracker, dict, list, set))]


def test_activation_checkpointing_recomputes_the_tp_streams_masks():
    """The gradient of dropout is its mask: recomputed on the tracker passed in, it is the first
    run's mask; recomputed on a stream advanced since, it would not be."""
    parallel = tp2()
    seed_streams(7, parallel)

    def dropped(x):
        with fork_tp_rng(parallel.tp):
            return torch.nn.functional.dropout(x, 0.5)

    x = torch.ones(256, requires_grad=True)
    out = checkpoint(parallel.tp.tracker, dropped, x)
    draw(parallel.tp)  # the stream moves on before the backward
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # kept: 2, dropped: 0 in both
    assert 0 < int((out == 0).sum()) < 256
