"""Batches for the tests that compare with Hugging Face transformers (the oracle model itself:
deberta_ds.hf_oracle)."""

from __future__ import annotations

import torch


def padded_batch(vocab_size: int, lengths: list[int], seed: int = 0):
    """input_ids [B, L] and attention_mask [B, L] with the given real lengths (0 = pad)."""
    gen = torch.Generator().manual_seed(seed)
    max_len = max(lengths)
    ids = torch.randint(4, vocab_size, (len(lengths), max_len), generator=gen)
    mask = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids * mask, mask
