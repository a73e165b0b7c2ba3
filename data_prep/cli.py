"""python -m data_prep <command>: offline data preparation for deberta_ds.

Commands: default-corpus, train-tokenizer, tokenize, verify, inspect, merge, split, mixture, manifest.
Shards are Megatron MMIDIDX pairs named PREFIX_00000.bin/.idx, PREFIX_00001..., readable by
megatron-core's IndexedDataset and by deberta_ds.data. Every output carries a manifest
(PREFIX.manifest.json: the tokenizer's hash, each file's size and hashes) that every reader checks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep.inputs import (
    CORPUS_SUFFIXES,
    DOC_BOUNDARIES,
    FORMATS,
    check_text,
    expand_inputs,
    iterate_blocks,
    resolve_format,
    split_block,
)
from deberta_ds.errors import UserError


def _positive_int(text: str) -> int:
    """argparse type; argparse names the flag in the error ('argument --workers: 0 is not ...')."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return int(text)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")  # refused by every range check below


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    if not 0.0 < (value := _number(text)) <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not a number in (0, 1]")
    return value


def _share(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    if not 0.0 <= (value := _number(text)) <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a number in [0, 1]")
    return value


def _input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="input files, globs or directories (searched recursively for corpus files: .txt .text "
                             ".jsonl .ndjson, also .gz); .gz is decompressed")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="text: plain UTF-8 text; jsonl: one JSON object per line; auto (default): from each "
                             "file's extension (.txt .text / .jsonl .ndjson, also .gz), else its content")
    parser.add_argument("--max-malformed", type=_share, default=0.05,
                        help="largest share of documents with invalid UTF-8 accepted (default 0.05; more means "
                             "the input is not UTF-8 text)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the document text (default text)")
    parser.add_argument("--doc-boundary", choices=DOC_BOUNDARIES, default="line",
                        help="text only: one document per line, or documents separated by blank lines (default line)")
    parser.add_argument("--max-piece-bytes", type=_positive_int, default=1 << 20,
                        help="documents longer than this are read and encoded in pieces of at most this many "
                             "bytes, cut at a space (default 1 MiB); bounds memory for huge lines")


def _output_flags(parser: argparse.ArgumentParser, default_name: str) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--output-prefix", help="output path prefix, e.g. out/wiki (gives out/wiki_00000.bin ...)")
    group.add_argument("--output-dir", help=f"output directory; the prefix becomes DIR/{default_name}")


def _output_prefix(args, default_name: str) -> str:
    return args.output_prefix or str(Path(args.output_dir) / default_name)


def _tokenizer_flag(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--tokenizer", required=required, metavar="PATH",
                        help="SentencePiece model: spm.model or the directory holding it (with tokenizer.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser("default-corpus", help="write the built-in corpus (Python's own documentation)")
    corpus.add_argument("--output", required=True, help="output text file, one document per line")
    corpus.add_argument("--max-bytes", type=_positive_int,
                        help="stop after about this many bytes (default: all, a few MB)")

    train = commands.add_parser("train-tokenizer", help="train a SentencePiece model with DeBERTaV3's special ids")
    _input_flags(train)
    train.add_argument("--output-dir", required=True, help="directory for spm.model, spm.vocab and tokenizer.json")
    train.add_argument("--vocab-size", type=_positive_int, required=True,
                       help="number of pieces ([MASK] is appended after)")
    train.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram", help="default unigram")
    train.add_argument("--character-coverage", type=_fraction, default=0.9995,
                       help="fraction of characters covered by the vocabulary (default 0.9995)")
    train.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                       help="characters outside the vocabulary become UTF-8 byte pieces, not [UNK] (default on)")
    train.add_argument("--sample-sentences", type=_positive_int, default=2_000_000,
                       help="sentences sampled (reservoir) for training, so a huge corpus needs no RAM "
                            "(default 2,000,000)")
    train.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    train.add_argument("--workers", type=_positive_int, default=os.cpu_count(),
                       help="training threads (default: all cores)")

    tok = commands.add_parser("tokenize", help="tokenise inputs into shards (parallel, streaming, resumable)")
    _input_flags(tok)
    _output_flags(tok, "shard")
    _tokenizer_flag(tok, required=True)
    tok.add_argument("--workers", type=_positive_int, default=os.cpu_count(),
                     help="encoder processes (default: all cores); the output does not depend on it")
    tok.add_argument("--shard-tokens", type=_positive_int, default=1 << 30,
                     help="start a new shard before a document that would take a shard past this many tokens "
                          "(default 2^30)")
    tok.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = commands.add_parser("verify", help="check shards fully; non-zero exit naming file and offset")
    verify.add_argument("paths", nargs="+", metavar="PREFIX_OR_DIR", help="shard prefixes, .idx/.bin files, "
                                                                          "globs or directories")
    _tokenizer_flag(verify, required=False)
    verify.add_argument("--vocab-size", type=_positive_int, help="ids must be below this (default: from --tokenizer)")
    verify.add_argument("--allow-incomplete", action="store_true",
                        help="accept shards of a tokenize job that did not finish (with a warning)")

    inspect = commands.add_parser("inspect", help="print sizes, length statistics and the first document")
    inspect.add_argument("path", metavar="PREFIX_OR_DIR")
    _tokenizer_flag(inspect, required=False)

    merge = commands.add_parser("merge", help="many shard sets -> one PREFIX.bin/.idx (streaming)")
    merge.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_DIR", help="shard sets, in order")
    merge.add_argument("--output-prefix", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")

    mixture = commands.add_parser("mixture", help="print a data.train block of temperature-sampled weights")
    mixture.add_argument("paths", nargs="+", metavar="PREFIX_OR_DIR", help="one shard set per source")
    mixture.add_argument("--alpha", type=_fraction, default=0.3,
                         help="weights n_i^alpha, normalised (1: by size; lower: more weight to small sources; "
                              "default 0.3)")

    split = commands.add_parser("split", help="train/valid split by document (deterministic)")
    split.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_DIR", help="shard sets, in order")
    split.add_argument("--output-prefix", required=True, help="writes PREFIX_train.* and PREFIX_valid.*")
    split.add_argument("--valid-fraction", type=_fraction, default=0.01, help="fraction of documents (default 0.01)")
    split.add_argument("--seed", type=int, default=0, help="seed of the per-document choice (default 0)")

    record = commands.add_parser("manifest", help="check shards made elsewhere (Megatron's preprocess_data.py) "
                                                  "against a tokenizer and record their manifest")
    record.add_argument("paths", nargs="+", metavar="PREFIX_OR_DIR", help="shard prefixes, globs or directories")
    _tokenizer_flag(record, required=True)
    return parser


def _inputs(args) -> tuple[list[Path], str]:
    """The input files and their format, both said in the log; a file that is not UTF-8 text is an error."""
    skipped: list[Path] = []
    files = expand_inputs(args.input, skipped)
    size = sum(file.stat().st_size for file in files)
    shown = ", ".join(map(str, files[:4])) + (f", ... ({len(files)} in all)" if len(files) > 4 else "")
    print(f"input: {len(files)} file(s), {size:,} bytes on disk: {shown}")
    if skipped:
        names = ", ".join(map(str, skipped[:4])) + (", ..." if len(skipped) > 4 else "")
        print(f"input: skipped {len(skipped)} file(s) in the folders that are not corpus files (not "
              f"{' '.join(CORPUS_SUFFIXES)} or .gz of them): {names}")
    check_text(files, args.max_malformed)
    fmt, reason = resolve_format(files, args.format)
    print(f"input: format {fmt} ({reason})")
    return files, fmt


def _sentences(files: list[Path], fmt: str, args):
    for block in iterate_blocks(files, fmt, args.doc_boundary, args.max_piece_bytes):
        for data, _ in split_block(block, fmt, args.doc_boundary, args.json_key):
            for line in (data or b"").decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    yield line


def run(args) -> int:
    from data_prep import tools
    from deberta_ds.data.tokenizer import load_tokenizer

    if args.command == "default-corpus":
        from data_prep.default_corpus import write_default_corpus
        path = write_default_corpus(args.output, args.max_bytes)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    elif args.command == "train-tokenizer":
        from data_prep.tokenizer import train_tokenizer
        meta = train_tokenizer(_sentences(*_inputs(args), args), args.output_dir, args.vocab_size, args.model_type,
                               args.character_coverage, args.sample_sentences, args.seed, args.workers,
                               args.byte_fallback)
        print(f"wrote {args.output_dir}/spm.model: {meta.pieces} pieces, [MASK]={meta.mask_id}, "
              f"model vocab {meta.model_vocab_size}")
    elif args.command == "tokenize":
        from data_prep.tokenize_corpus import tokenize_corpus
        prefix = _output_prefix(args, "shard")
        files, fmt = _inputs(args)
        stats = tokenize_corpus(files, prefix, args.tokenizer, fmt=fmt, doc_boundary=args.doc_boundary,
                                json_key=args.json_key, workers=args.workers, shard_tokens=args.shard_tokens,
                                max_piece_bytes=args.max_piece_bytes, progress=not args.no_progress,
                                max_malformed=args.max_malformed)
        print(f"{prefix}_*: {stats.report()}")
    elif args.command == "verify":
        processor, vocab, tokenizer_sha256, mask_id = None, args.vocab_size, None, None
        if args.tokenizer:
            processor, meta = load_tokenizer(args.tokenizer)
            vocab, tokenizer_sha256, mask_id = vocab or meta.model_vocab_size, meta.sha256, meta.mask_id
        return tools.verify(args.paths, vocab, processor, mask_id=mask_id, tokenizer_sha256=tokenizer_sha256,
                            allow_incomplete=args.allow_incomplete,
                            warn=lambda message: print(message, file=sys.stderr))
    elif args.command == "inspect":
        processor, meta = load_tokenizer(args.tokenizer) if args.tokenizer else (None, None)
        tools.inspect(args.path, processor, tokenizer_sha256=meta and meta.sha256)
    elif args.command == "merge":
        writer = tools.merge(args.input, args.output_prefix)
        print(f"wrote {args.output_prefix}.bin/.idx: {writer.num_documents:,} documents, {writer.num_tokens:,} tokens")
    elif args.command == "mixture":
        print(tools.mixture_block(args.paths, args.alpha))
    elif args.command == "manifest":
        for prefix in tools.record(args.paths, args.tokenizer):
            print(f"recorded {prefix}.manifest.json")
    elif args.command == "split":
        train, valid = tools.split(args.input, args.output_prefix, args.valid_fraction, args.seed)
        print(f"wrote {args.output_prefix}_train ({train.num_documents:,} documents) and "
              f"{args.output_prefix}_valid ({valid.num_documents:,} documents)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as error:  # bad input; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a read-only folder: the open output was removed, finished shards kept
        print(f"error: {error} (disk full or not writable?); no partial output was left behind, and re-running the "
              "same command continues after the last finished shard", file=sys.stderr)
        return 1
