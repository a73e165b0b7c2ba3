"""The fixed settings of one encoder's attention, built once per encoder (`kernels.attention_settings`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMPLEMENTATIONS = ("reference", "fused", "fused_or_reference")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's inputs; float64 is the reference's


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
