"""Loading a SentencePiece tokenizer with DeBERTaV3's special ids (training one: data_prep).

[PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 are SentencePiece's own control/unknown pieces; [MASK] is
appended after the last piece (id = number of pieces), as in DeBERTaV3 (128,000 pieces,
[MASK]=128000). The model's vocabulary is the pieces plus [MASK], rounded up to a multiple of
128 (spare rows, as V3's 128,100), recorded in ``tokenizer.json`` beside ``spm.model``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from deberta_ds.content_hash import file_sha256
from deberta_ds.errors import MissingInputError, UserError

MODEL_FILE = "spm.model"
METADATA_FILE = "tokenizer.json"
PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
WORD_START = "\u2581"  # SentencePiece's word-start marker


@dataclass
class TokenizerMetadata:
    pieces: int
    mask_id: int
    model_vocab_size: int
    pad_id: int = PAD_ID
    cls_id: int = CLS_ID
    sep_id: int = SEP_ID
    unk_id: int = UNK_ID
    model_type: str = "unigram"
    sha256: str = ""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def resolve_model_path(path: str | Path) -> Path:
    """--tokenizer accepts spm.model itself or the directory holding it."""
    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise MissingInputError(f"--tokenizer {path}: no SentencePiece model found (expected {MODEL_FILE} or "
                                "its directory; create one with `python -m data_prep train-tokenizer`)")
    return model


def load_tokenizer(path: str | Path) -> tuple[spm.SentencePieceProcessor, TokenizerMetadata]:
    model_path = resolve_model_path(path)
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    metadata_path = model_path.parent / METADATA_FILE
    if metadata_path.is_file():
        try:
            metadata = TokenizerMetadata(**json.loads(metadata_path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            known = [f.name for f in dataclasses.fields(TokenizerMetadata)]
            raise UserError(f"{metadata_path}: not a deberta_ds tokenizer description ({error}); its fields are "
                             f"{known}. Re-create it with data_prep train-tokenizer") from None
    else:  # a foreign spm.model: derive the same metadata
        pieces = processor.get_piece_size()
        metadata = TokenizerMetadata(pieces, pieces, round_up(pieces + 1, 128))
    metadata.sha256 = file_sha256(model_path)
    return processor, metadata


def word_start_table(processor: spm.SentencePieceProcessor, vocab_size: int):
    """Bool [vocab_size]: the piece begins a word (starts with '▁'); specials and spare rows count as starts."""
    import numpy as np

    table = np.ones(vocab_size, dtype=bool)
    for piece_id in range(processor.get_piece_size()):
        if not processor.is_control(piece_id) and not processor.is_unknown(piece_id):
            table[piece_id] = processor.id_to_piece(piece_id).startswith(WORD_START)
    return table
