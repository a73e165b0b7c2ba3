"""ONNX graphs: input_ids and attention_mask [batch, length] (both dynamic) ->

- the discriminator of a deberta_ds checkpoint or run (`python -m deberta_ds.convert to-onnx`):
  last_hidden_state [batch, length, hidden] and, for an RTD pair, replaced_logits [batch, length]
  (the RTD head's "this token was replaced" logits);
- a fine-tuned classifier (`--classifier`, the Hugging Face folder `deberta_ds.finetune` or
  `deberta_ds.evaluate` saved): logits [batch, classes] (one column for regression), its
  backbone read into our encoder and its pooler (dense + activation on [CLS]) and classifier
  applied as DebertaV2ForSequenceClassification does.

    python -m deberta_ds.onnx_export --classifier runs/sst2/best --out sst2.onnx

The graph is traced with the reference attention (the fused kernel is a Triton custom op that
ONNX cannot express); the reference computes its relative-position slots inside the graph when
exporting, so one file serves every length. Hugging Face's exporters for DeBERTa-v2 have open
bugs with these relative positions; this one is tested against PyTorch with onnxruntime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from deberta_ds.atomic_files import atomic_path
from deberta_ds.checkpoint_reader import load_strict
from deberta_ds.errors import UserError, exit_code
from deberta_ds.extras import require_extra
from deberta_ds.hf_format import encoder_from_hf, read_hf_checkpoint
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


class ClassifierForExport(nn.Module):
    """A fine-tuned DebertaV2ForSequenceClassification folder: our encoder with its backbone,
    then its pooler and classifier (dropout is off at inference)."""

    def __init__(self, folder: str | Path):
        super().__init__()
        config, state = read_hf_checkpoint(folder)
        if "classifier.weight" not in state or "pooler.dense.weight" not in state:
            raise UserError(f"--classifier {folder}: no pooler.dense / classifier weights; name the folder a "
                            "fine-tuning saved (a DebertaV2ForSequenceClassification)")
        activation = config.get("pooler_hidden_act", "gelu")
        if activation != "gelu":
            raise UserError(f"--classifier {folder}: pooler_hidden_act {activation!r}; only gelu is exported")
        self.encoder = encoder_from_hf(folder)
        self.encoder.config.attention_impl = "reference"
        self.pooler = nn.Linear(*state["pooler.dense.weight"].shape[::-1])
        self.classifier = nn.Linear(*state["classifier.weight"].shape[::-1])
        for module, prefix in ((self.pooler, "pooler.dense."), (self.classifier, "classifier.")):
            load_strict(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(folder))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids, attention_mask)   # [batch, length, hidden]
        return (self.classifier(nn.functional.gelu(self.pooler(hidden[:, 0]))),)


def _export(module: nn.Module, outputs: list[str], out_file: str | Path, dynamic: dict) -> Path:
    """Write the graph to out_file (through a temporary name: never a half-written file)."""
    require_extra("onnx", "onnx", feature="ONNX export (convert to-onnx)")
    dynamic = {name: {0: "batch", 1: "length"} for name in ["input_ids", "attention_mask"]} | dynamic
    example = torch.randint(5, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    out_file = Path(out_file)
    if out_file.is_dir():
        raise UserError(f"--out {out_file}: is a directory; name the .onnx file to write")
    with torch.no_grad(), atomic_path(out_file) as tmp:
        torch.onnx.export(module.eval(), example, str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return out_file


def export_onnx(model: Encoder | ReplacedTokenDetection, out_file: str | Path) -> Path:
    """The discriminator's graph (hidden states, and RTD logits for a pair) in out_file."""
    module = DiscriminatorForExport(model)
    outputs = ["last_hidden_state"] + (["replaced_logits"] if module.head is not None else [])
    return _export(module, outputs, out_file, {name: {0: "batch", 1: "length"} for name in outputs})


def export_classifier_onnx(folder: str | Path, out_file: str | Path) -> Path:
    """A fine-tuned classifier's graph (logits [batch, classes]) in out_file."""
    return _export(ClassifierForExport(folder), ["logits"], out_file, {"logits": {0: "batch"}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.onnx_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True,
                        help="a fine-tuned Hugging Face DebertaV2ForSequenceClassification folder")
    parser.add_argument("--out", required=True, help="output .onnx file")
    args = parser.parse_args(argv)
    code = exit_code(lambda: export_classifier_onnx(args.classifier, args.out), failure=2)
    if code == 0:
        print(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
