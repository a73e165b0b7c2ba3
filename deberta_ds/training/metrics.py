"""Training metrics: RTD classification statistics, AUC, throughput, TensorBoard writing."""

from __future__ import annotations

import resource

import numpy as np
import torch


def replaced_precision_recall(logits: torch.Tensor, replaced: torch.Tensor, mask: torch.Tensor):
    """Precision and recall of the 'replaced' class over real tokens (nan when undefined)."""
    real = mask.bool()
    predicted, actual = (logits[real] > 0), replaced[real]
    true_positive = (predicted & actual).sum().item()
    precision = true_positive / predicted.sum().item() if predicted.any() else float("nan")
    recall = true_positive / actual.sum().item() if actual.any() else float("nan")
    return precision, recall


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


def model_flops_per_token(generator_params: int, discriminator_params: int, layers: int, hidden: int,
                          seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the weights of both models plus 12 l h s for the
    c2c and PV attention products (the c2p/p2c terms and the EMD's extra pass are not counted)."""
    return 6.0 * (generator_params + discriminator_params) + 12.0 * layers * hidden * seq_len


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: peak resident set


class ScalarLog:
    """TensorBoard scalars on rank 0 only (a no-op elsewhere)."""

    def __init__(self, log_dir, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, scalars: dict, step: int) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
