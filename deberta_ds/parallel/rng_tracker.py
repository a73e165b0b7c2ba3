"""Named RNG streams swapped in and out of torch's default generators (Megatron's RNG tracker).

A stream is a pair of generator states (CPU, and the current CUDA device's when there is one)
because a model on the GPU draws its dropout masks from the CUDA generator and the fused kernel
its seeds from the CPU one. This module knows nothing of process groups: `parallel.state` gives
each `TensorParallel` a tracker and `parallel.random` seeds and forks its streams.
"""

from __future__ import annotations

import contextlib

import torch


def generator_states() -> dict:
    """The default generators' states: CPU always, the current CUDA device's when CUDA is up."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_generator_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named generator states swapped in and out of torch's default generators."""

    def __init__(self):
        self.states: dict[str, dict] = {}

    def add(self, name: str, seed: int) -> None:
        """A new stream `name` seeded with `seed` (the default generators are left as they were)."""
        current = generator_states()
        torch.manual_seed(seed)  # CPU and every CUDA device
        self.states[name] = generator_states()
        set_generator_states(current)

    @contextlib.contextmanager
    def fork(self, name: str):
        """Run the block on stream `name`; its advanced state is kept for the next fork."""
        default = generator_states()
        set_generator_states(self.states[name])
        try:
            yield
        finally:
            self.states[name] = generator_states()
            set_generator_states(default)

    def get_states(self) -> dict:
        return {name: dict(states) for name, states in self.states.items()}

    def set_states(self, states: dict) -> None:
        self.states = {name: dict(value) for name, value in states.items()}
