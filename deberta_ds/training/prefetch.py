"""Training batches built ahead of time, off the training loop's critical path.

Samples are pure functions of their global index, so the batches of the coming steps are
known in advance: a background thread builds them (masking, padding, and on a GPU machine
pinned host memory, so the copy to the device can overlap compute) while the current step
runs. The loop only takes the next ready step and moves it with `to_device`, and the time it
spends waiting is counted (`perf/data_wait_fraction`).
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from deberta_ds.data.sampler import GlobalBatchSampler
from deberta_ds.model.rtd import masked_positions


def to_tensors(batch: dict, pin: bool = False) -> dict:
    """numpy arrays -> host tensors (page-locked when `pin`, for asynchronous copies). A batch
    with labels also gets its masked positions as padded index tensors (masked_index,
    masked_labels: deberta_ds.model.rtd.masked_positions), counted here on the host so the model
    never has to ask the device how many there are."""
    tensors = {key: torch.from_numpy(value) for key, value in batch.items()}
    if "labels" in tensors:
        tensors["masked_index"], tensors["masked_labels"] = masked_positions(tensors["labels"])
    return {key: value.pin_memory() for key, value in tensors.items()} if pin else tensors


def to_device(batch: dict, device: torch.device) -> dict:
    """Host tensors -> `device`; asynchronous when they are pinned and the device is a GPU."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class BatchPrefetcher:
    """This data-parallel rank's micro-batches, step after step from `consumed_samples`.

    next_step() -> [(global indices [micro], host tensors {input_ids, attention_mask, labels,
    masked_index, masked_labels})]
    with `accumulation` micro-batches. Up to `depth` steps are built ahead. An error while
    building is raised by the next_step() that would have returned that step.
    """

    def __init__(self, samples, sampler: GlobalBatchSampler, accumulation: int, pin: bool, depth: int = 2):
        self.samples, self.sampler, self.accumulation, self.pin = samples, sampler, accumulation, pin
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.closing = threading.Event()
        self.wait_s = 0.0  # time next_step() spent waiting for a step that was not built yet
        self.thread = threading.Thread(target=self._build, name="batch-prefetcher", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.closing.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _build(self) -> None:
        try:
            for local_indices in self.sampler:                                 # [micro * accumulation]
                step = [(micro, to_tensors(self.samples.batch(micro), self.pin))
                        for micro in np.split(local_indices, self.accumulation)]
                if not self._put(step):
                    return
        except BaseException as error:  # handed to the training loop, which raises it
            self._put(error)

    def next_step(self) -> list[tuple[np.ndarray, dict]]:
        start = time.perf_counter()
        item = self.ready.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item  # with the builder thread's traceback
        return item

    def close(self) -> None:
        self.closing.set()
        self.thread.join()
