"""Weighted data mixtures: global sample g -> (source, index within that source).

The assignment keeps every source within one sample of its share w_i n at every prefix n, for
any number of sources: sample n goes, among the sources still below their share
(c_i < w_i (n + 1)), to the one whose next sample is due first (smallest (c_i + 1) / w_i; ties to
the first source). This earliest-deadline rule (Tijdeman's chairman assignment) bounds the error
below 1; Megatron's blended dataset (argmax of w_i n - c_i) is within one sample for two sources
but not always for more (1.33 samples with 6 random weights). It is a sequential rule: the
mixture remembers the counts every 4,096 samples and runs the rule from the nearest remembered
position. The counts at the trainer's consumed samples go into checkpoints (`counts_at` /
`restore`), so a resumed run continues exactly without replaying the run, and every data-parallel
rank computes the same assignment for the whole global batch (the global batches do not depend
on the world size). Each source is a `PretrainingSamples` with its own permutation per epoch,
so a source smaller than its share is repeated in a fresh order.
"""

from __future__ import annotations

import math
import threading

import numpy as np


class MixtureSamples:
    """`batch(indices)` like PretrainingSamples, drawing each global index from one source.
    Safe to use from the batch prefetcher's thread and the trainer's at once."""

    KNOWN_EVERY = 4096   # the counts are remembered at every multiple of this position

    def __init__(self, names: list[str], sources: list, weights: list[float]):
        total = float(sum(weights))
        self.names, self.sources = list(names), list(sources)
        self.weights = [w / total for w in weights]
        self._known = {0: (0,) * len(sources)}       # position -> counts of the samples before it
        self._last_end, self._pinned = 0, {0}         # the last end and restored positions are kept too
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(source) for source in self.sources)

    def restore(self, position: int, counts: dict[str, int]) -> None:
        """Continue from a checkpoint's per-source counts at global position `position`."""
        with self._lock:
            self._known[position] = tuple(int(counts[name]) for name in self.names)
            self._pinned.add(position)

    def counts_at(self, position: int) -> dict[str, int]:
        """Samples each source has given to [0, position)."""
        counts, _ = self._simulate(position, record_from=position)
        return dict(zip(self.names, counts))

    def epochs_at(self, position: int) -> dict[str, float]:
        """How many passes over each source [0, position) made."""
        return {name: count / len(source)
                for (name, count), source in zip(self.counts_at(position).items(), self.sources)}

    def _simulate(self, end: int, record_from: int) -> tuple[list[int], dict]:
        """Counts at `end`, and (source, index within it) of every sample in [record_from, end),
        from the nearest remembered position at or before record_from."""
        with self._lock:
            start = max(p for p in self._known if p <= min(record_from, end))
            counts = list(self._known[start])
        weights, passed, remember = self.weights, {}, {}
        due_every = [1.0 / w if w > 0 else math.inf for w in weights]     # samples between two of source i
        for n in range(start, end):
            target = n + 1
            source, due = 0, math.inf
            for i, (weight, count) in enumerate(zip(weights, counts)):
                if count < weight * target and (count + 1) * due_every[i] < due:
                    source, due = i, (count + 1) * due_every[i]
            if n >= record_from:
                passed[n] = (source, counts[source])
            counts[source] += 1
            if target % self.KNOWN_EVERY == 0:
                remember[target] = tuple(counts)
        remember[end] = tuple(counts)   # the next micro-batch starts here
        with self._lock:
            if self._last_end % self.KNOWN_EVERY and self._last_end not in self._pinned:
                self._known.pop(self._last_end, None)
            self._known.update(remember)
            self._last_end = end
        return counts, passed

    def assign(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source [B], index within the source [B]) for global sample indices (any order)."""
        indices = np.asarray(indices, dtype=np.int64)
        _, passed = self._simulate(int(indices.max()) + 1, record_from=int(indices.min()))
        pairs = np.array([passed[int(g)] for g in indices], dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Rows in the order of `indices`, each built by its source from its index within it."""
        sources, within = self.assign(indices)
        parts = {s: self.sources[s].batch(within[sources == s]) for s in np.unique(sources).tolist()}
        first = next(iter(parts.values()))
        out = {key: np.empty((len(sources), *value.shape[1:]), dtype=value.dtype) for key, value in first.items()}
        for s, part in parts.items():
            for key in out:
                out[key][sources == s] = part[key]
        return out


def temperature_weights(token_counts: list[int], alpha: float) -> list[float]:
    """Temperature sampling for multilingual mixtures: n_i^alpha, normalised (alpha 1: by size,
    alpha 0: uniform)."""
    scaled = np.asarray(token_counts, dtype=np.float64) ** alpha
    return (scaled / scaled.sum()).tolist()
