"""Training metrics: RTD classification statistics, AUC, throughput, peak memory."""

from __future__ import annotations

import resource

import numpy as np
import torch
import torch.distributed as dist


class TrainingStatistics:
    """The training statistics of the micro-batches since the last log step, summed on the
    device (no host synchronisation per micro-batch) and reduced over every rank, then copied
    to the host, only when logged. Means skip non-finite values; precision and recall of the
    'replaced' class are pooled over the interval's tokens. TP ranks repeat their replica's
    values, which leaves every mean and ratio unchanged."""

    MEANS = ("generator/mlm_loss", "generator/mlm_accuracy", "discriminator/rtd_loss", "discriminator/rtd_accuracy",
             "discriminator/replaced_ratio")

    def __init__(self, device: torch.device):
        # [sums of MEANS, counts of MEANS, true positives, predicted positives, actual positives]
        self.totals = torch.zeros(2 * len(self.MEANS) + 3, dtype=torch.float64, device=device)

    def add(self, result, attention_mask: torch.Tensor) -> None:
        """result: the engines' StepResult of one micro-batch."""
        values = torch.stack([result.generator.loss, result.generator.accuracy, result.discriminator.loss,
                              result.discriminator.accuracy, result.replaced_ratio]).detach().double()
        defined = torch.isfinite(values)
        real = attention_mask.bool()  # masks, not boolean indexing: no host synchronisation
        predicted, actual = (result.discriminator.logits.detach() > 0) & real, result.discriminator.replaced & real
        confusion = torch.stack([(predicted & actual).sum(), predicted.sum(), actual.sum()]).double()
        self.totals += torch.cat([torch.where(defined, values, 0.0), defined.double(), confusion])

    def reduce(self) -> dict:
        """Means over every rank's micro-batches since the last call (None where undefined); resets."""
        totals = self.totals.clone()
        self.totals.zero_()
        if dist.is_initialized():
            dist.all_reduce(totals)
        host = totals.tolist()
        count = len(self.MEANS)
        sums, counts, (true_positive, predicted, actual) = host[:count], host[count:2 * count], host[2 * count:]
        metrics = {name: total / n if n else None for name, total, n in zip(self.MEANS, sums, counts)}
        metrics["discriminator/replaced_precision"] = true_positive / predicted if predicted else None
        metrics["discriminator/replaced_recall"] = true_positive / actual if actual else None
        return metrics


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan for one class."""
    labels = labels.astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):  # average rank within ties (1-based)
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by the device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None for a device not in the table (no MFU then)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def peak_memory_bytes(device: torch.device | str) -> int:
    """The peak so far on `device`: the CUDA allocator's, or on the CPU the process's peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
