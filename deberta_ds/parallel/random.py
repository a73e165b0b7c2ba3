"""RNG streams for tensor parallelism, on the CPU and on the GPU (Megatron's RNG tracker).

The default torch generators (the CPU one and the current GPU's) are seeded per data-parallel
replica, identically on the TP ranks of one replica, so dropout on replicated activations
matches across TP ranks. Dropout inside a TP region (attention probabilities, each rank
holding other heads) runs under `fork_tp_rng(tp)`: a second stream seeded by TP rank, so it
differs across TP ranks and matches across DP replicas. A stream is a pair of generator
states (CPU, and the current CUDA device's when there is one) because a model draws its dropout
masks (and the fused attention kernel its seed tensor) from the generator of the device it runs
on. Every stream goes into checkpoints (`get_rng_states` / `set_rng_states`).

Nothing here is global: the TP stream lives in an `RNGStatesTracker` (`parallel.rng_tracker`,
below this module and `parallel.state`) that the parallel state owns (`TensorParallel.tracker`,
made by `parallel.state.initialize` at TP > 1, None at TP = 1) and that is passed along with the
process group; `seed_streams` seeds it, and forking it unseeded is an error.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.utils.checkpoint

from deberta_ds.parallel.rng_tracker import RNGStatesTracker, generator_states, set_generator_states
from deberta_ds.parallel.state import ParallelState, TensorParallel

_TP_SEED_OFFSET = 2718
_DP_SEED_MULTIPLIER = 1000
TP_STREAM = "tensor-parallel"


def seed_streams(seed: int, parallel: ParallelState) -> None:
    """Default streams: seed + 1000 (dp_rank + 1); TP stream (in `parallel.tp.tracker`, which
    exists at TP > 1): seed + 2718 + tp_rank."""
    if parallel.tp.tracker is not None:
        parallel.tp.tracker.states.clear()
        parallel.tp.tracker.add(TP_STREAM, seed + _TP_SEED_OFFSET + parallel.tp.rank)
    torch.manual_seed(seed + _DP_SEED_MULTIPLIER * (parallel.dp_rank + 1))


def fork_tp_rng(tp: TensorParallel):
    """A context that runs its block on `tp`'s TP stream. At TP = 1 a plain nullcontext (which
    torch.compile traces without a graph break); at TP > 1 an unseeded stream is an error, not a
    silent draw from the replicated stream (the ranks' masks would then be equal)."""
    if tp.size == 1:
        return contextlib.nullcontext()
    if tp.tracker is None or TP_STREAM not in tp.tracker.states:
        raise RuntimeError(f"the tensor-parallel RNG stream of TP rank {tp.rank} (of {tp.size}) is not seeded: "
                           "call deberta_ds.parallel.random.seed_streams(seed, parallel) with the ParallelState "
                           "that parallel.state.initialize returned before running the model")
    return tp.tracker.fork(TP_STREAM)


def get_rng_states(tracker: RNGStatesTracker | None) -> dict:
    """Everything a resumed run needs to draw what the uninterrupted one would have drawn
    (`tracker`: the TP streams, None at TP = 1)."""
    return {"generators": generator_states(), "numpy": np.random.get_state(), "python": random.getstate(),
            "tracker": tracker.get_states() if tracker is not None else {}}


def set_rng_states(states: dict, tracker: RNGStatesTracker | None) -> None:
    """Restore `get_rng_states`' states; without a tracker (TP = 1, which never forks) the
    saved TP streams are not needed and are left out."""
    set_generator_states(states["generators"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if tracker is not None:
        tracker.set_states(states["tracker"])


def checkpoint(tracker: RNGStatesTracker | None, function, *args, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in the backward instead of kept.

    The recomputation draws the dropout masks of the first run: torch's checkpoint restores the
    default CPU and CUDA generators (preserve_rng_state), and `tracker`'s streams (the TP
    stream; None at TP = 1) are set back to their states of the first run for the
    recomputation, then put back.
    """
    run = function if tracker is None else _replaying_streams(tracker, function)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _replaying_streams(tracker: RNGStatesTracker, function):
    """`function`, whose second call (the recomputation) runs on the tracker's streams as they
    were at the first call."""
    first_run_states = tracker.get_states()
    recomputing = False

    def run(*inputs, **keywords):
        nonlocal recomputing
        if not recomputing:
            recomputing = True
            return function(*inputs, **keywords)
        current = tracker.get_states()
        tracker.set_states(first_run_states)
        try:
            return function(*inputs, **keywords)
        finally:
            tracker.set_states(current)

    return run
