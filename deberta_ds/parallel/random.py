"""RNG streams for tensor parallelism, on the CPU and on the GPU (Megatron's RNG tracker).

The default torch generators (the CPU one and the current GPU's) are seeded per data-parallel
replica, identically on the TP ranks of one replica, so dropout on replicated activations
matches across TP ranks. Dropout inside a TP region (attention probabilities, each rank
holding other heads) runs under `fork_tp_rng(tp)`: a second stream seeded by TP rank, so it
differs across TP ranks and matches across DP replicas. A stream is a pair of generator
states (CPU, and the current CUDA device's when there is one) because a model on the GPU
draws its dropout masks from the CUDA generator and the fused kernel its seeds from the CPU
one. Every stream goes into checkpoints (`get_rng_states` / `set_rng_states`).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.utils.checkpoint

from deberta_ds.parallel.state import ParallelState, TensorParallel

_TP_SEED_OFFSET = 2718
_DP_SEED_MULTIPLIER = 1000


def _generator_states() -> dict:
    """The default generators' states: CPU always, the current CUDA device's when CUDA is up."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_generator_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named generator states swapped in and out of torch's default generators."""

    def __init__(self):
        self.states: dict[str, dict] = {}

    def add(self, name: str, seed: int) -> None:
        """A new stream `name` seeded with `seed` (the default generators are left as they were)."""
        current = _generator_states()
        torch.manual_seed(seed)  # CPU and every CUDA device
        self.states[name] = _generator_states()
        _set_generator_states(current)

    @contextlib.contextmanager
    def fork(self, name: str):
        """Run the block on stream `name`; its advanced state is kept for the next fork."""
        default = _generator_states()
        _set_generator_states(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _generator_states()
            _set_generator_states(default)


_TRACKER = RNGStatesTracker()
TP_STREAM = "tensor-parallel"


def seed_streams(seed: int, parallel: ParallelState | None = None) -> None:
    """Default streams: seed + 1000 (dp_rank + 1); TP stream: seed + 2718 + tp_rank."""
    parallel = parallel or ParallelState()
    _TRACKER.states.clear()
    _TRACKER.add(TP_STREAM, seed + _TP_SEED_OFFSET + parallel.tp.rank)
    torch.manual_seed(seed + _DP_SEED_MULTIPLIER * (parallel.dp_rank + 1))


def fork_tp_rng(tp: TensorParallel):
    """A context that runs its block on the TP stream (a no-op at TP = 1 or before seeding: a
    plain nullcontext, which torch.compile traces without a graph break)."""
    if tp.size == 1 or TP_STREAM not in _TRACKER.states:
        return contextlib.nullcontext()
    return _TRACKER.fork(TP_STREAM)


def get_tracker_states() -> dict:
    return {name: dict(states) for name, states in _TRACKER.states.items()}


def set_tracker_states(states: dict) -> None:
    _TRACKER.states = {name: dict(value) for name, value in states.items()}


def get_rng_states() -> dict:
    """Everything a resumed run needs to draw what the uninterrupted one would have drawn."""
    return {"generators": _generator_states(), "numpy": np.random.get_state(), "python": random.getstate(),
            "tracker": get_tracker_states()}


def set_rng_states(states: dict) -> None:
    _set_generator_states(states["generators"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    set_tracker_states(states["tracker"])


def checkpoint(function, *args, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in the backward instead of kept.

    The recomputation draws the dropout masks of the first run: torch's checkpoint restores the
    default CPU and CUDA generators (preserve_rng_state), and the tracker's streams (the TP
    stream) are set back to their states of the first run for the recomputation, then put back.
    """
    first_run_states = get_tracker_states()
    recomputing = False

    def run(*inputs, **keywords):
        nonlocal recomputing
        if not recomputing:
            recomputing = True
            return function(*inputs, **keywords)
        current = get_tracker_states()
        set_tracker_states(first_run_states)
        try:
            return function(*inputs, **keywords)
        finally:
            set_tracker_states(current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
