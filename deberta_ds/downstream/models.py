"""The models a downstream evaluation compares: a Hugging Face DebertaV2 folder, a deberta_ds
checkpoint (a training run, its checkpoints folder or a step folder; a native checkpoint)
exported on the fly with `convert`'s code, or `random-init`: another model's shape and
tokenizer with fresh weights for every seed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deberta_ds.downstream.readers import DataError

RANDOM_INIT = "random-init"
TOKENIZER_FILES = ("tokenizer.json", "spm.model")


@dataclass
class ModelSource:
    name: str            # the model's name in the table
    folder: Path         # an HF folder (config.json and weights)
    tokenizer: Path      # a folder holding the tokenizer
    random_init: bool = False

    def build(self, head: str, seed: int, **head_arguments) -> torch.nn.Module:
        """The model with a task head (transformers' Auto class `head`); the seed sets the head's
        initial weights (and, for random-init, every weight)."""
        import transformers

        auto = getattr(transformers, head)
        torch.manual_seed(seed)
        if self.random_init:
            return auto.from_config(transformers.AutoConfig.from_pretrained(self.folder, **head_arguments))
        return auto.from_pretrained(self.folder, **head_arguments)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer)


def check_hf_folder(folder: Path, tokenizer: Path | None, flag: str = "--model") -> Path:
    """An HF DebertaV2 folder with a tokenizer (its own or `tokenizer`); returns the tokenizer folder."""
    config = folder / "config.json"
    if not config.is_file():
        raise DataError(f"{flag} {folder}: no config.json; name a Hugging Face checkpoint directory, a deberta_ds "
                        "checkpoint or a training run's output_dir")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise DataError(f"{config}: not a JSON object ({error})") from None
    if model_type != "deberta-v2":
        raise DataError(f"{flag} {folder}: model_type {model_type!r} is not a DeBERTa-v2/v3 checkpoint (deberta-v2)")
    if (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").is_file():
        raise DataError(f"{flag} {folder}: holds pytorch_model.bin, a pickle (loading it could run code); convert it "
                        "to model.safetensors (safetensors' convert script) or export with `convert to-hf`")
    source = tokenizer or folder
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{flag} {folder}: holds no tokenizer; export it with `convert to-hf` (which writes one) or "
                        "pass --tokenizer")
    return source


def resolve_model(path: str, tokenizer: str | None, export_dir: Path, name: str) -> ModelSource:
    """A model the user named: an HF folder as it is, a deberta_ds checkpoint exported into
    export_dir (with the tokenizer its run recorded, or `tokenizer`)."""
    from deberta_ds.checkpoint_reader import NATIVE_CONFIG, is_training_checkpoint

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"--model {path}: not found (a folder: an HF checkpoint, a deberta_ds checkpoint or a run)")
    tokenizer_dir = Path(tokenizer) if tokenizer else None
    if is_training_checkpoint(folder) or (folder / NATIVE_CONFIG).is_file():
        folder = export_checkpoint(folder, tokenizer, export_dir)
        tokenizer_dir = None
    return ModelSource(name, folder, check_hf_folder(folder, tokenizer_dir))


def export_checkpoint(checkpoint: Path, tokenizer: str | None, out: Path) -> Path:
    """`convert to-hf` of the discriminator, with its tokenizer, into `out` (replaced whole)."""
    from deberta_ds.atomic_files import atomic_path
    from deberta_ds.checkpoint_reader import load_native
    from deberta_ds.convert import export_tokenizer, to_hf
    from deberta_ds.model import ReplacedTokenDetection

    model = load_native(checkpoint)
    config = model.config.discriminator if isinstance(model, ReplacedTokenDetection) else model.config
    with atomic_path(out) as tmp:
        export_tokenizer(checkpoint, tmp, tokenizer, config.vocab_size)
        to_hf(model, tmp)
    return out


def random_twin(model: ModelSource) -> ModelSource:
    return ModelSource(RANDOM_INIT, model.folder, model.tokenizer, random_init=True)
