"""Training a SentencePiece tokenizer with DeBERTaV3's special ids (loading it:
deberta_ds.data.tokenizer, the home of the file layout and the ids)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm

from deberta_ds.atomic_files import commit, write_atomic
from deberta_ds.content_hash import file_sha256
from deberta_ds.data.tokenizer import (
    CLS_ID,
    METADATA_FILE,
    MODEL_FILE,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    TokenizerMetadata,
    round_up,
)
from deberta_ds.errors import UserError

SPECIAL_PIECES = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")


def train_tokenizer(sentences, output_dir: str | Path, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 0.9995, sample_sentences: int = 2_000_000,
                    seed: int = 0, num_threads: int | None = None, byte_fallback: bool = True) -> TokenizerMetadata:
    """Train on an iterator of sentences; SentencePiece samples `sample_sentences` of them
    (reservoir sampling while streaming), so the corpus never has to fit in memory. With
    byte_fallback (the default) a character outside the vocabulary becomes its UTF-8 bytes
    (256 byte pieces join the vocabulary) instead of [UNK], so no text is lost."""
    if vocab_size <= len(SPECIAL_PIECES):
        raise UserError(f"--vocab-size {vocab_size}: must be larger than the {len(SPECIAL_PIECES)} special pieces "
                        f"({' '.join(SPECIAL_PIECES)}); DeBERTaV3 has 128,000, a few MB of text supports a few "
                        "thousand")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix = output_dir / "spm.tmp"
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            input_sentence_size=sample_sentences, shuffle_input_sentence=True,
            pad_id=PAD_ID, bos_id=CLS_ID, eos_id=SEP_ID, unk_id=UNK_ID,
            **dict(zip(("pad_piece", "bos_piece", "eos_piece", "unk_piece"), SPECIAL_PIECES)),
            byte_fallback=byte_fallback, num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as error:
        raise _training_input_error(error, vocab_size) from None
    quantize_scores(Path(f"{prefix}.model"))
    commit(Path(f"{prefix}.model"), output_dir / MODEL_FILE)
    commit(Path(f"{prefix}.vocab"), output_dir / "spm.vocab")
    metadata = TokenizerMetadata(vocab_size, vocab_size, round_up(vocab_size + 1, 128), model_type=model_type,
                                 sha256=file_sha256(output_dir / MODEL_FILE))
    write_atomic(output_dir / METADATA_FILE, json.dumps(asdict(metadata), indent=2) + "\n")
    return metadata


def _training_input_error(error: RuntimeError, vocab_size: int) -> Exception:
    """SentencePiece's complaints about its input as errors that say what to do; others unchanged."""
    text = str(error)
    if "sentences_.empty()" in text:
        return UserError("--input: no text to train a tokenizer on (the inputs are empty or hold only blank "
                         "lines); give text files with --input")
    if "Vocabulary size is smaller than required_chars" in text:
        needed = re.search(r"required_chars\. \d+ vs (\d+)", text)
        return UserError(f"--vocab-size {vocab_size}: too small for this input, whose characters alone need "
                         f"{needed[1] if needed else 'more'} pieces (random bytes or a binary file have many); give "
                         "a larger --vocab-size or a lower --character-coverage, and check --input is text")
    if "Vocabulary size too high" in text:
        limit = text[text.index("Vocabulary size too high"):].strip()
        return UserError(f"--vocab-size {vocab_size}: too large for this input (SentencePiece: {limit}); give "
                         "more text with --input or a smaller --vocab-size")
    return error


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
