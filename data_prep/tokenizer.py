"""SentencePiece training and loading with DeBERTaV3's special ids.

[PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 are SentencePiece's own control/unknown pieces; [MASK] is
appended after the last piece (id = number of pieces), as in DeBERTaV3 (128,000 pieces,
[MASK]=128000). The model's vocabulary is the pieces plus [MASK], rounded up to a multiple of
128 (spare rows, as V3's 128,100), recorded in ``tokenizer.json`` beside ``spm.model``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from deberta_ds.atomic_files import commit, write_atomic
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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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


def train_tokenizer(sentences, output_dir: str | Path, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 0.9995, sample_sentences: int = 2_000_000,
                    seed: int = 0, num_threads: int | None = None, byte_fallback: bool = True) -> TokenizerMetadata:
    """Train on an iterator of sentences; SentencePiece samples `sample_sentences` of them
    (reservoir sampling while streaming), so the corpus never has to fit in memory. With
    byte_fallback (the default) a character outside the vocabulary becomes its UTF-8 bytes
    (256 byte pieces join the vocabulary) instead of [UNK], so no text is lost."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix = output_dir / "spm.tmp"
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        input_sentence_size=sample_sentences, shuffle_input_sentence=True,
        pad_id=PAD_ID, bos_id=CLS_ID, eos_id=SEP_ID, unk_id=UNK_ID,
        pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", byte_fallback=byte_fallback,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    quantize_scores(Path(f"{prefix}.model"))
    commit(Path(f"{prefix}.model"), output_dir / MODEL_FILE)
    commit(Path(f"{prefix}.vocab"), output_dir / "spm.vocab")
    metadata = TokenizerMetadata(vocab_size, vocab_size, round_up(vocab_size + 1, 128), model_type=model_type,
                                 sha256=file_sha256(output_dir / MODEL_FILE))
    write_atomic(output_dir / METADATA_FILE, json.dumps(asdict(metadata), indent=2) + "\n")
    return metadata


SCORE_GRID = 2 ** -8


def quantize_scores(model_file: Path) -> None:
    """Round every piece's score to a multiple of 2^-8 (a change of at most 0.002 in a log
    probability). SentencePiece sums a segmentation's scores in float32, the `tokenizers` library
    (our Hugging Face export) in float64; on the grid both sums are exact (up to ~6,000 pieces per
    line), so segmentations of equal score (runs like '-----') tie in both and both libraries keep
    the first candidate: the exported tokenizer gives SentencePiece's ids."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    for piece in proto.pieces:
        piece.score = round(piece.score / SCORE_GRID) * SCORE_GRID
    model_file.write_bytes(proto.SerializeToString())


def word_start_table(processor: spm.SentencePieceProcessor, vocab_size: int):
    """Bool [vocab_size]: the piece begins a word (starts with '▁'); specials and spare rows count as starts."""
    import numpy as np

    table = np.ones(vocab_size, dtype=bool)
    for piece_id in range(processor.get_piece_size()):
        if not processor.is_control(piece_id) and not processor.is_unknown(piece_id):
            table[piece_id] = processor.id_to_piece(piece_id).startswith(WORD_START)
    return table
