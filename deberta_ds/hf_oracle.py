"""Hugging Face's DebertaV2Model as the oracle our encoder is compared with (parity tests,
benchmarks/model_bench.py). transformers is a test and benchmark dependency, imported here only."""

from __future__ import annotations

import torch

from deberta_ds.config import ModelConfig
from deberta_ds.hf_format import model_config_to_hf


def random_hf_model(config: ModelConfig, seed: int = 0):
    """A randomly initialised HF DebertaV2Model with our config's shapes, dropout off."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(seed)
    hf_config = DebertaV2Config(**(model_config_to_hf(config) | {"hidden_dropout_prob": 0.0,
                                                                  "attention_probs_dropout_prob": 0.0}))
    model = DebertaV2Model(hf_config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped key cannot hide
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model
