"""The fixed settings of one encoder's attention, built once per encoder (`kernels.attention_settings`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMPLEMENTATIONS = ("reference", "fused", "fused_or_reference")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's inputs; float64 is the reference's
DROPOUT_LEVELS = 256  # the fused kernel draws one byte per score (16 per Philox call, as FlashAttention)


def dropout_threshold(dropout_p: float) -> int:
    """The attention dropout rate in whole 1/256: a score is dropped when its random byte is below it,
    the kept ones scaled by 256 / (256 - threshold). Both implementations apply this rate
    (`quantised_dropout_rate`), so they agree in expectation (0.1 becomes 26/256 = 0.1016)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention dropout rate: {dropout_p} is not in [0, 1)")
    return min(round(dropout_p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)


def quantised_dropout_rate(dropout_p: float) -> float:
    """The rate both attention implementations apply for `dropout_p` (`dropout_threshold` / 256)."""
    return dropout_threshold(dropout_p) / DROPOUT_LEVELS


@dataclass(frozen=True)
class AttentionSettings:
    """position_buckets, max_relative_positions: the slot table; scale: None for 1 / sqrt(d (1 + terms));
    dropout_p: the attention dropout rate (applied in training mode); impl: the implementation chosen
    once (`fused_or_reference`: the kernel, with the reference for a variant that does not compile)."""
    position_buckets: int
    max_relative_positions: int
    scale: float | None = None
    dropout_p: float = 0.0
    impl: str = "reference"

    def __post_init__(self):
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"AttentionSettings.impl: {self.impl!r} is not one of {IMPLEMENTATIONS}")
