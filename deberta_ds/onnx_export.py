"""The discriminator as an ONNX graph: input_ids and attention_mask [batch, length] (both
dynamic) -> last_hidden_state [batch, length, hidden] and, for an RTD pair, replaced_logits
[batch, length] (the RTD head's "this token was replaced" logits).

The graph is traced with the reference attention (the fused kernel is a Triton custom op that
ONNX cannot express); the reference computes its relative-position slots inside the graph when
exporting, so one file serves every length. Hugging Face's exporters for DeBERTa-v2 have open
bugs with these relative positions; this one is tested against PyTorch with onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deberta_ds.atomic_files import atomic_path
from deberta_ds.extras import require_extra
from deberta_ds.model import Encoder, ReplacedTokenDetection

OPSET = 17


class DiscriminatorForExport(nn.Module):
    """The discriminator (or a plain encoder) with its word embedding merged (E_G + E_delta).
    Switches the model it wraps to the reference attention."""

    def __init__(self, model: Encoder | ReplacedTokenDetection):
        super().__init__()
        pair = isinstance(model, ReplacedTokenDetection)
        self.encoder = model.discriminator.encoder if pair else model
        self.head = model.discriminator.head if pair else None
        self.word_embeddings = nn.Parameter(model.export_discriminator_embedding().clone()) if pair else None
        self.encoder.config.attention_impl = "reference"

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids, attention_mask, word_embedding_weight=self.word_embeddings)
        return (hidden,) if self.head is None else (hidden, self.head(hidden))


def export_onnx(model: Encoder | ReplacedTokenDetection, out_file: str | Path) -> Path:
    """Write the graph to out_file (through a temporary name: never a half-written file)."""
    require_extra("onnx", "onnx", feature="ONNX export (convert to-onnx)")
    module = DiscriminatorForExport(model).eval()
    outputs = ["last_hidden_state"] + (["replaced_logits"] if module.head is not None else [])
    dynamic = {name: {0: "batch", 1: "length"} for name in ["input_ids", "attention_mask", *outputs]}
    example = torch.randint(5, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    out_file = Path(out_file)
    with torch.no_grad(), atomic_path(out_file) as tmp:
        torch.onnx.export(module, example, str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return out_file
