"""Counter-based randomness: every value is a pure function of (seed, sample index, position).

No generator state exists, so a sample is the same in any process, on any rank, after any
restart, and whole batches are computed at once with numpy.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (a bijection with good avalanche); wraps modulo 2^64
    (callers hold np.errstate(over="ignore"))."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _extend(h, key) -> np.ndarray:
    """The hash of (keys..., key) from h, the hash of (keys...)."""
    with np.errstate(over="ignore"):
        return _mix(np.asarray(key).astype(np.uint64) + h * _GOLDEN)


def hash64(*keys) -> np.ndarray:
    """Combine integer keys (broadcast) into uint64 hashes."""
    h = _GOLDEN
    for key in keys:
        h = _extend(h, key)
    return h


def uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1) from integer keys (53 random bits)."""
    return (hash64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(index: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, size) evaluated at `index`, O(1) memory (4-round Feistel
    network on the next even power of two, cycle-walking back into range)."""
    index = np.asarray(index, dtype=np.uint64)
    half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
    half_mask = np.uint64((1 << half_bits) - 1)
    round_keys = [hash64(seed, round_) for round_ in range(4)]   # hash64(seed, round_, right), keys hoisted
    out = index.copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        x = out[todo]
        left, right = x >> np.uint64(half_bits), x & half_mask
        for key in round_keys:
            left, right = right, left ^ (_extend(key, right) & half_mask)
        x = (left << np.uint64(half_bits)) | right
        out[todo] = x
        todo[todo] = x >= np.uint64(size)
    return out.astype(np.int64)
