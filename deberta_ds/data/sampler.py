"""Global-batch sampling for data parallelism, resumable from `consumed_samples`.

Global batch b holds the global sample indices [b * G, (b + 1) * G); data-parallel rank r of
W takes the contiguous slice [r * G / W, (r + 1) * G / W) of it. The sequence of global
batches therefore depends neither on W nor on restarts: resuming at consumed_samples = b * G
continues with global batch b on any world size.
"""

from __future__ import annotations

import numpy as np

from deberta_ds.errors import UserError


class GlobalBatchSampler:
    def __init__(self, global_batch_size: int, rank: int = 0, world_size: int = 1, consumed_samples: int = 0,
                 total_samples: int | None = None):
        if global_batch_size % world_size:
            raise UserError(f"global batch size {global_batch_size} is not divisible by the data-parallel "
                             f"world size {world_size}")
        if consumed_samples % global_batch_size:
            raise UserError(f"consumed_samples {consumed_samples} is not a multiple of the global batch size "
                             f"{global_batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside the world of {world_size}")
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.consumed_samples, self.total_samples = consumed_samples, total_samples
        self.local_batch_size = global_batch_size // world_size

    def __iter__(self):
        batch = self.consumed_samples // self.global_batch_size
        while self.total_samples is None or (batch + 1) * self.global_batch_size <= self.total_samples:
            start = batch * self.global_batch_size + self.rank * self.local_batch_size
            yield np.arange(start, start + self.local_batch_size, dtype=np.int64)
            batch += 1

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an endless sampler has no length")
        return max(0, (self.total_samples - self.consumed_samples) // self.global_batch_size)
