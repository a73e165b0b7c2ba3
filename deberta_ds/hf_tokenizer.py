"""Our SentencePiece tokenizer as Hugging Face tokenizer files, so that an exported model loads
with `AutoTokenizer.from_pretrained(dir)` and gets exactly our ids.

Written: `tokenizer.json` (the `tokenizers` library's format, built here from the SentencePiece
model: its precompiled normalisation, whitespace collapsing, "▁" word starts, the unigram pieces
and scores, byte fallback when the model has it, [MASK] after the last piece, and
[CLS] A [SEP] / [CLS] A [SEP] B [SEP] templates), `spm.model` (for SentencePiece-backed
DebertaV2Tokenizer classes of older transformers), `tokenizer_config.json` and
`special_tokens_map.json`. The config names the generic fast class: transformers 5's
`DebertaV2Tokenizer` rebuilds its pipeline from the vocabulary (NFC instead of SentencePiece's
NFKC charsmap, no byte fallback) and would disagree with SentencePiece.
"""

from __future__ import annotations

import json
from pathlib import Path

from deberta_ds.atomic_files import atomic_path, write_atomic
from deberta_ds.data.tokenizer import CLS_ID, MODEL_FILE, SEP_ID, UNK_ID, load_tokenizer, resolve_model_path
from deberta_ds.errors import UserError

SPECIAL_TOKENS = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                  "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]"}


def fast_tokenizer(model_file: Path, mask_id: int):
    """A `tokenizers.Tokenizer` whose ids equal SentencePiece's. Ties between segmentations of
    equal score (runs like '-----') resolve alike only when both libraries sum scores exactly:
    our train-tokenizer puts the scores on a grid for that (data_prep.tokenizer.quantize_scores);
    a foreign spm.model off the grid may, rarely, segment such a run in another order."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    if mask_id != len(vocab):
        raise UserError(f"{model_file}: [MASK] must follow the last of its {len(vocab)} pieces, not be id {mask_id}")
    vocab.append(("[MASK]", 0.0))
    tokenizer = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=proto.trainer_spec.byte_fallback))
    # SentencePiece's remove_extra_whitespaces: whitespace runs become one space, none at either end.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                                 normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    return tokenizer


def write_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, model_max_length: int = 512) -> None:
    """The tokenizer files of a Hugging Face model directory (see the module docstring)."""
    model_file = resolve_model_path(tokenizer_path)
    _, meta = load_tokenizer(model_file)  # DeBERTaV3's special ids, checked against spm.model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        fast_tokenizer(model_file, meta.mask_id).save(str(tmp))
    write_atomic(out_dir / MODEL_FILE, model_file.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": False, "split_by_punct": False,
              "add_prefix_space": True, "model_max_length": model_max_length, "vocab_file": MODEL_FILE,
              **SPECIAL_TOKENS}
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=1) + "\n")
    write_atomic(out_dir / "special_tokens_map.json", json.dumps(SPECIAL_TOKENS, indent=1) + "\n")
