"""Helpers shared by the tests that use Hugging Face transformers as the oracle."""

from __future__ import annotations

import torch
from transformers import DebertaV2Config, DebertaV2Model

from deberta_ds.config import ModelConfig
from deberta_ds.convert import model_config_to_hf


def random_hf_model(config: ModelConfig, seed: int = 0) -> DebertaV2Model:
    """A randomly initialised HF DebertaV2Model with our config's shapes, dropout off."""
    torch.manual_seed(seed)
    hf_config = DebertaV2Config(**(model_config_to_hf(config) | {"hidden_dropout_prob": 0.0,
                                                                  "attention_probs_dropout_prob": 0.0}))
    model = DebertaV2Model(hf_config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped key cannot hide
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def padded_batch(vocab_size: int, lengths: list[int], seed: int = 0):
    """input_ids [B, L] and attention_mask [B, L] with the given real lengths (0 = pad)."""
    gen = torch.Generator().manual_seed(seed)
    max_len = max(lengths)
    ids = torch.randint(4, vocab_size, (len(lengths), max_len), generator=gen)
    mask = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids * mask, mask
