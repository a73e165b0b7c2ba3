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
    if not str(path):
        raise MissingInputError("no tokenizer given: set data.tokenizer in the run config (or --tokenizer on a "
                                "command line) to the directory of spm.model, made by `python -m data_prep "
                                "train-tokenizer`")
    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise MissingInputError(f"--tokenizer {path}: no SentencePiece model found (expected {MODEL_FILE} or "
                                "its directory; create one with `python -m data_prep train-tokenizer`)")
    return model


def load_tokenizer(path: str | Path) -> tuple[spm.SentencePieceProcessor, TokenizerMetadata]:
    """The SentencePiece model and its description (tokenizer.json, or derived for a foreign model),
    checked against each other: nothing trains or exports with a tokenizer whose ids it misreads."""
    model_path = resolve_model_path(path)
    try:
        processor = spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as error:
        raise UserError(f"{model_path}: not a readable SentencePiece model (damaged or truncated? SentencePiece: "
                        f"{str(error).strip()[:200]}); re-create it with `python -m data_prep train-tokenizer` or "
                        "restore it from a copy") from None
    metadata_path = model_path.parent / METADATA_FILE
    pieces = processor.get_piece_size()
    if metadata_path.is_file():
        metadata = _read_metadata(metadata_path)
    else:  # a foreign spm.model: derive the same metadata
        metadata = TokenizerMetadata(pieces, pieces, round_up(pieces + 1, 128))
    sha256 = file_sha256(model_path)
    _check_agreement(processor, metadata, sha256, metadata_path if metadata_path.is_file() else model_path)
    metadata.sha256 = sha256
    return processor, metadata


def _read_metadata(metadata_path: Path) -> TokenizerMetadata:
    known = {f.name: f.type for f in dataclasses.fields(TokenizerMetadata)}
    try:
        metadata = TokenizerMetadata(**json.loads(metadata_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise UserError(f"{metadata_path}: not a deberta_ds tokenizer description ({error}); its fields are "
                        f"{list(known)}. Re-create it with data_prep train-tokenizer") from None
    for name, kind in known.items():
        value = getattr(metadata, name)
        if not isinstance(value, str if kind == "str" else int) or isinstance(value, bool):
            raise UserError(f"{metadata_path}: field '{name}' must be {'a string' if kind == 'str' else 'an integer'} "
                            f"(got {json.dumps(value)[:40]}); re-create it with data_prep train-tokenizer")
    return metadata


def _check_agreement(processor: spm.SentencePieceProcessor, meta: TokenizerMetadata, sha256: str,
                     described_in: Path) -> None:
    """The description's ids are the model's: DeBERTaV3's specials where SentencePiece has them,
    [MASK] right after the last piece, a vocabulary that holds it; its recorded hash is the model's."""
    model_file = described_in.parent / MODEL_FILE if described_in.name == METADATA_FILE else described_in
    if meta.sha256 and meta.sha256 != sha256:
        raise UserError(f"{described_in}: records spm.model sha256 {meta.sha256}, but {model_file} has {sha256}: "
                        "the model was replaced or damaged; put back the spm.model it describes, or re-create both "
                        "with `python -m data_prep train-tokenizer`")
    pieces = processor.get_piece_size()
    model_ids = {"pad_id": processor.pad_id(), "cls_id": processor.bos_id(), "sep_id": processor.eos_id(),
                 "unk_id": processor.unk_id()}
    deberta_ids = dict(zip(model_ids, (PAD_ID, CLS_ID, SEP_ID, UNK_ID)))
    if model_ids != deberta_ids:
        raise UserError(f"{model_file}: special ids {model_ids} are not DeBERTaV3's {deberta_ids} ([PAD] [CLS] [SEP] "
                        "[UNK]); train the tokenizer with `python -m data_prep train-tokenizer`")
    expected = {"pieces": pieces, "mask_id": pieces, **model_ids}
    wrong = [f"{name} {getattr(meta, name)} (the model's: {value})" for name, value in expected.items()
             if getattr(meta, name) != value]
    if wrong:
        raise UserError(f"{described_in}: does not match {model_file}: {', '.join(wrong)} ([MASK] follows the last "
                        "piece); re-create both with `python -m data_prep train-tokenizer`")
    if meta.model_vocab_size <= meta.mask_id:
        raise UserError(f"{described_in}: model_vocab_size {meta.model_vocab_size} has no row for [MASK] = "
                        f"{meta.mask_id}; it must be larger (data_prep writes pieces + 1 rounded up to 128)")


def word_start_table(processor: spm.SentencePieceProcessor, vocab_size: int):
    """Bool [vocab_size]: the piece begins a word (starts with '▁'); specials and spare rows count as starts."""
    import numpy as np

    table = np.ones(vocab_size, dtype=bool)
    for piece_id in range(processor.get_piece_size()):
        if not processor.is_control(piece_id) and not processor.is_unknown(piece_id):
            table[piece_id] = processor.id_to_piece(piece_id).startswith(WORD_START)
    return table
