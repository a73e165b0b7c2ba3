"""Training phases: the samples a global index draws from change at step boundaries.

Phase p covers the global samples [start_p, start_p+1) (its first step x the global batch size);
its samples are indexed from 0 at its start, so a mixture begins its assignment afresh and a
resumed run lands in the right phase at the right sample. A global batch never straddles two
phases (they begin at step boundaries)."""

from __future__ import annotations

import bisect

import numpy as np


class PhasedSamples:
    def __init__(self, phases: list[tuple[int, object]]):
        """phases: (first global sample, samples with `batch(local indices)`), by start."""
        self.starts = [start for start, _ in phases]
        self.phases = [samples for _, samples in phases]

    def phase_at(self, position: int) -> tuple[int, object]:
        """(start, samples) of the phase global sample `position` belongs to."""
        index = bisect.bisect_right(self.starts, position) - 1
        return self.starts[index], self.phases[index]

    def batch(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        start, samples = self.phase_at(int(indices[0]))
        return samples.batch(indices - start)
