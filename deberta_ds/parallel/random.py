"""RNG streams for tensor parallelism.

The default torch generator is seeded per data-parallel rank, identically on the TP ranks of
one replica, so dropout on replicated activations matches across TP ranks. Dropout inside a
TP region (attention probabilities, each rank holding other heads) runs under `fork_tp_rng()`:
a second stream seeded by TP rank, so it differs across TP ranks and matches across DP
replicas. Both streams go into checkpoints.
"""

from __future__ import annotations

import contextlib

import torch

from deberta_ds.parallel import state

_TP_RNG_STATE: torch.Tensor | None = None
_TP_SEED_OFFSET = 2718


def seed_streams(seed: int) -> None:
    """Default stream: seed + 1000 (dp_rank + 1); TP stream: seed + 2718 + tp_rank."""
    global _TP_RNG_STATE
    parallel = state.get()
    current = torch.get_rng_state()
    torch.manual_seed(seed + _TP_SEED_OFFSET + parallel.tp_rank)
    _TP_RNG_STATE = torch.get_rng_state()
    torch.set_rng_state(current)
    torch.manual_seed(seed + 1000 * (parallel.dp_rank + 1))


@contextlib.contextmanager
def fork_tp_rng():
    """Run the block on the TP stream (a no-op at TP = 1 or before seeding)."""
    global _TP_RNG_STATE
    if state.tp_size() == 1 or _TP_RNG_STATE is None:
        yield
        return
    default = torch.get_rng_state()
    torch.set_rng_state(_TP_RNG_STATE)
    try:
        yield
    finally:
        _TP_RNG_STATE = torch.get_rng_state()
        torch.set_rng_state(default)


def get_tp_rng_state():
    return _TP_RNG_STATE


def set_tp_rng_state(rng_state) -> None:
    global _TP_RNG_STATE
    _TP_RNG_STATE = rng_state
