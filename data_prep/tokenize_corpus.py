"""Parallel, streaming, resumable tokenisation into Megatron-layout shards.

The main process cuts the input into document-aligned blocks (bounded size), W worker
processes split, decode and encode them with SentencePiece, and the main process writes
the ids in input order, so the output does not depend on W. At most 2 W blocks are in flight,
so memory is bounded by the block size, not the corpus. A manifest (PREFIX.manifest.json)
records the job (inputs, tokenizer hash, settings) and every finished shard with the input
position after its last document; re-running the same command after a kill continues from
the last finished shard and produces byte-identical output.
"""

from __future__ import annotations

import array
import contextlib
import json
import multiprocessing as mp
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.inputs import Block, cut_pieces, is_utf8, iterate_blocks, split_block, text_size
from deberta_ds.data.indexed_dataset import ShardWriter, data_path, dtype_for_vocab, index_path
from deberta_ds.data.provenance import manifest_path, read_manifest, shard_entry, shard_prefix, write_manifest
from deberta_ds.data.tokenizer import UNK_ID, load_tokenizer, resolve_model_path
from deberta_ds.errors import UserError


@dataclass
class TokenizeStats:
    documents: int = 0
    tokens: int = 0
    empty_documents: int = 0
    skipped_records: int = 0       # JSONL lines that are not an object with the key, or too long
    split_documents: int = 0       # documents longer than --max-piece-bytes, encoded in pieces
    malformed_utf8: int = 0        # pieces with invalid UTF-8 (decoded with U+FFFD replacement)
    unknown_tokens: int = 0
    input_bytes: int = 0

    def report(self) -> str:
        unk_rate = self.unknown_tokens / max(self.tokens, 1)
        return (f"documents {self.documents:,}  tokens {self.tokens:,}  empty {self.empty_documents:,}  "
                f"skipped {self.skipped_records:,}  split {self.split_documents:,}  "
                f"malformed-utf8 {self.malformed_utf8:,}  unknown-token rate {unk_rate:.4%}")


class JobMismatchError(UserError):
    pass


# ---------------------------------------------------------------- worker side

_WORKER = {}


def _init_worker(model_path: str, fmt: str, doc_boundary: str, json_key: str, max_piece_bytes: int,
                 dtype: str) -> None:
    import sentencepiece as spm

    _WORKER.update(processor=spm.SentencePieceProcessor(model_file=model_path), fmt=fmt,
                   doc_boundary=doc_boundary, json_key=json_key, max_piece_bytes=max_piece_bytes,
                   dtype=np.dtype(dtype))


def _segments(block: Block):
    """Columns (texts: bytes | None, ends_document, end offsets, input bytes) of a block's
    documents, long ones cut into pieces; input bytes are the raw bytes each one spans, so resumed
    runs count them once. Built column-wise: this runs once per document of the corpus."""
    if block.kind == "piece":
        return [block.data], [False], [block.start + len(block.data)], [len(block.data)]
    documents = split_block(block, _WORKER["fmt"], _WORKER["doc_boundary"], _WORKER["json_key"])
    limit = _WORKER["max_piece_bytes"]
    texts = [data for data, _ in documents]
    offsets = [end for _, end in documents]
    sizes = np.diff(offsets, prepend=block.start).tolist()
    ends_document = [True] * len(texts)
    for index in reversed([i for i, data in enumerate(texts) if data is not None and len(data) > limit]):
        pieces = cut_pieces(texts[index], limit)
        head = sum(len(piece) for piece in pieces[:-1])
        texts[index:index + 1] = pieces
        offsets[index:index + 1] = [offsets[index]] * len(pieces)
        sizes[index:index + 1] = [len(piece) for piece in pieces[:-1]] + [max(sizes[index] - head, 0)]
        ends_document[index:index + 1] = [False] * (len(pieces) - 1) + [True]
    return texts, ends_document, offsets, sizes


def _decode(texts: list) -> tuple[list[str], list[bool]]:
    """Strings for SentencePiece (None, an unusable record, -> "") and which had invalid UTF-8
    (decoded with U+FFFD). One pass in the common all-valid case."""
    try:
        return [data.decode("utf-8") if data is not None else "" for data in texts], [False] * len(texts)
    except UnicodeDecodeError:
        malformed = [data is not None and not is_utf8(data) for data in texts]
        return [data.decode("utf-8", errors="replace") if data is not None else "" for data in texts], malformed


@dataclass
class EncodedBlock:
    """One block's documents (and pieces of long ones), as a few arrays: cheap to send back."""
    tokens: np.ndarray       # all ids, concatenated, in the shard dtype
    lengths: np.ndarray      # int64 [n] ids per segment
    ends: np.ndarray         # bool [n] the segment ends its document
    skipped: np.ndarray      # bool [n] an unusable record (no ids)
    malformed: np.ndarray    # bool [n] invalid UTF-8, decoded with U+FFFD
    offsets: np.ndarray      # int64 [n] input offset after the segment's document
    sizes: np.ndarray        # int64 [n] raw input bytes the segment spans
    unknowns: np.ndarray     # int64 [n] [UNK] ids
    file_index: int


def encode_block(block: Block) -> EncodedBlock:
    """Split, decode and encode one block (ids in the shard dtype: SentencePiece ids are below the
    vocabulary that chose it)."""
    raw, ends_document, offsets, sizes = _segments(block)
    texts, malformed = _decode(raw)
    # One text per call: SentencePiece's list call with num_threads=1 measured about 20% slower (it
    # still goes through its thread pool). Parallelism comes from the worker processes.
    encode = _WORKER["processor"].encode
    encoded = [encode(text) for text in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = array.array(_WORKER["dtype"].char)   # array.fromlist: about 2x numpy.fromiter over a chain
    for ids in encoded:
        flat.fromlist(ids)
    tokens = np.frombuffer(flat, dtype=_WORKER["dtype"])
    # [UNK] ids per segment: each rare [UNK] position binned by the segment whose end it precedes.
    unknown_segments = np.searchsorted(np.cumsum(lengths), np.flatnonzero(tokens == UNK_ID), side="right")
    return EncodedBlock(
        tokens=tokens, lengths=lengths, ends=np.array(ends_document, dtype=bool),
        skipped=np.array([data is None for data in raw], dtype=bool), malformed=np.array(malformed, dtype=bool),
        offsets=np.array(offsets, dtype=np.int64), sizes=np.array(sizes, dtype=np.int64),
        unknowns=np.bincount(unknown_segments, minlength=len(lengths)), file_index=block.file_index)


# ---------------------------------------------------------------- manifest

def _job_identity(files, tokenizer_sha, settings) -> dict:
    inputs = [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    return {"inputs": inputs, "tokenizer_sha256": tokenizer_sha, "settings": settings}


def _load_or_start_manifest(prefix, identity: dict) -> dict:
    path = manifest_path(prefix)
    if not path.is_file():
        return identity | {"version": 1, "kind": "tokenize", "shards": [], "complete": False}
    manifest = read_manifest(path)
    _check_resumable(path, manifest)
    for key in ("inputs", "tokenizer_sha256", "settings"):
        if manifest.get(key) != identity[key]:
            raise JobMismatchError(f"{path}: the existing output was made by a different job ({key} differs); "
                                   "delete it or choose another --output-prefix")
    for shard in manifest["shards"]:
        for file in (data_path(shard["prefix"]), index_path(shard["prefix"])):
            if not file.is_file():
                raise JobMismatchError(f"{path}: finished shard file {file} is missing; delete the output and re-run")
    return manifest


def _check_resumable(path: Path, manifest: dict) -> None:
    """What a resume reads of the last finished shard: the input position after it and the counts."""
    for i, entry in enumerate(manifest["shards"]):
        resume, stats = entry.get("resume"), entry.get("stats")
        if not (isinstance(resume, list) and len(resume) == 2 and all(type(x) is int for x in resume)):
            raise JobMismatchError(f"{path}: field 'shards[{i}].resume' must be [file index, byte offset] (got "
                                   f"{json.dumps(resume)[:60]}); the manifest is damaged: delete the output and re-run")
        if not (isinstance(stats, dict) and set(stats) == {f.name for f in fields(TokenizeStats)}
                and all(type(x) is int for x in stats.values())):
            raise JobMismatchError(f"{path}: field 'shards[{i}].stats' must hold the integer counts "
                                   f"{[f.name for f in fields(TokenizeStats)]}; the manifest is damaged: delete the "
                                   "output and re-run")


# ---------------------------------------------------------------- main loop

@contextlib.contextmanager
def _encoder(init_args: tuple, workers: int):
    """A function mapping blocks to EncodedBlocks in input order, at most 2 * workers in flight.
    Workers are forked where the platform allows (no re-import), before any thread starts. One
    worker encodes in this process: a pool of one measured slower (its transfers cost more than
    the reading and writing it would overlap)."""
    if workers <= 1:
        _init_worker(*init_args)
        yield lambda blocks: map(encode_block, blocks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        def encode(blocks):
            in_flight = deque()
            for block in blocks:
                in_flight.append(pool.apply_async(encode_block, (block,)))
                if len(in_flight) >= 2 * workers:
                    yield in_flight.popleft().get()
            while in_flight:
                yield in_flight.popleft().get()
        yield encode


class _ShardSequence:
    """Opens, rolls over and publishes shards; records each in the manifest."""

    def __init__(self, prefix, dtype, shard_tokens: int, manifest: dict, stats: TokenizeStats):
        self.prefix, self.dtype, self.shard_tokens = prefix, dtype, shard_tokens
        self.manifest, self.stats = manifest, stats
        self.writer: ShardWriter | None = None
        self.last_document_end = None  # (file_index, offset) after the last complete document

    def fits(self, tokens: int) -> bool:
        """Whole documents of `tokens` in all would go to the current (or a new) shard without rollover."""
        return (self.writer.num_tokens if self.writer is not None else 0) + tokens <= self.shard_tokens

    def start_document(self, first_piece_tokens: int) -> None:
        if self.writer is not None and self.writer.num_tokens and \
                self.writer.num_tokens + first_piece_tokens > self.shard_tokens:
            self.publish()
        if self.writer is None:
            self.writer = ShardWriter(shard_prefix(self.prefix, len(self.manifest["shards"])), self.dtype)

    def publish(self) -> None:
        self.writer.finalize()
        writer = self.writer
        self.manifest["shards"].append(shard_entry(writer.prefix, writer.num_documents, writer.num_tokens)
                                       | {"resume": list(self.last_document_end), "stats": asdict(self.stats)})
        write_manifest(manifest_path(self.prefix), self.manifest)
        self.writer = None


class _Consumer:
    """Appends encoded blocks to the shards in input order, counting as it goes."""

    def __init__(self, shards: _ShardSequence, stats: TokenizeStats):
        self.shards, self.stats = shards, stats
        self.in_document = False

    def add(self, block: EncodedBlock) -> None:
        if len(block.lengths) == 0:
            return
        if (not self.in_document and block.ends.all() and not block.skipped.any() and block.lengths.all()
                and self.shards.fits(int(block.lengths.sum()))):
            self._add_whole_documents(block)
            return
        cursor = 0
        for i, length in enumerate(block.lengths.tolist()):
            self._add_segment(block, i, block.tokens[cursor:cursor + length])
            cursor += length

    def _add_whole_documents(self, block: EncodedBlock) -> None:
        """The common case: complete, non-empty documents that all fit the current shard."""
        self.shards.start_document(int(block.lengths[0]))
        self.shards.writer.add_documents(block.tokens, block.lengths)
        stats = self.stats
        stats.documents += len(block.lengths)
        stats.tokens += len(block.tokens)
        stats.unknown_tokens += int(block.unknowns.sum())
        stats.malformed_utf8 += int(block.malformed.sum())
        stats.input_bytes += int(block.sizes.sum())
        self.shards.last_document_end = (block.file_index, int(block.offsets[-1]))

    def _add_segment(self, block: EncodedBlock, i: int, ids: np.ndarray) -> None:
        stats, shards, ends = self.stats, self.shards, bool(block.ends[i])
        skipped = bool(block.skipped[i])
        starts_document = not self.in_document and not skipped and (ids.size or not ends)
        if starts_document:  # may publish the previous shard: before this piece is counted
            shards.start_document(ids.size)
        stats.input_bytes += int(block.sizes[i])
        end = (block.file_index, int(block.offsets[i]))
        if not starts_document and not self.in_document:  # a skipped record or an empty document
            stats.skipped_records += skipped
            stats.empty_documents += not skipped
            shards.last_document_end = end
            return
        stats.malformed_utf8 += bool(block.malformed[i])
        stats.split_documents += starts_document and not ends
        shards.writer.add_tokens(ids)
        stats.tokens += ids.size
        stats.unknown_tokens += int(block.unknowns[i])
        self.in_document = not ends
        if ends:
            shards.writer.end_sequence()
            shards.writer.end_document()
            stats.documents += 1
            shards.last_document_end = end


def _check_malformed_share(stats: TokenizeStats, max_malformed: float) -> None:
    """Invalid UTF-8 in more than `max_malformed` of the documents: the input is not UTF-8 text. The job
    stays unfinished (its shards are refused), so nothing trains on it unnoticed."""
    if stats.malformed_utf8 > max_malformed * max(stats.documents, 1):
        raise UserError(f"--input: {stats.malformed_utf8:,} of {stats.documents:,} documents held invalid UTF-8 "
                        f"(more than --max-malformed {max_malformed:g}): is the input UTF-8 text? Fix --input and "
                        "tokenise into a fresh --output-prefix, or accept them: re-run with a larger --max-malformed "
                        "(it finishes this job)")


def tokenize_corpus(files: list[Path], output_prefix: str | Path, tokenizer: str | Path, *, fmt: str = "text",
                    doc_boundary: str = "line", json_key: str = "text", workers: int = 1,
                    shard_tokens: int = 1 << 30, max_piece_bytes: int = 1 << 20,
                    progress: bool = True, max_malformed: float = 1.0) -> TokenizeStats:
    model_path = resolve_model_path(tokenizer)
    _, metadata = load_tokenizer(model_path)
    dtype = dtype_for_vocab(metadata.model_vocab_size)
    settings = {"format": fmt, "doc_boundary": doc_boundary, "json_key": json_key, "shard_tokens": shard_tokens,
                "max_piece_bytes": max_piece_bytes, "dtype": np.dtype(dtype).name}
    manifest = _load_or_start_manifest(output_prefix, _job_identity(files, metadata.sha256, settings))
    if manifest["complete"]:
        return TokenizeStats(**manifest["shards"][-1]["stats"]) if manifest["shards"] else TokenizeStats()
    stats = TokenizeStats(**manifest["shards"][-1]["stats"]) if manifest["shards"] else TokenizeStats()
    start_file, start_offset = manifest["shards"][-1]["resume"] if manifest["shards"] else (0, 0)
    shards = _ShardSequence(output_prefix, dtype, shard_tokens, manifest, stats)
    blocks = iterate_blocks(files, fmt, doc_boundary, max_piece_bytes, start_file, start_offset)
    total_bytes = sum(map(text_size, files))
    init_args = (str(model_path), fmt, doc_boundary, json_key, max_piece_bytes, np.dtype(dtype).name)
    with _encoder(init_args, workers) as encode:
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress, desc="tokenize",
                   initial=stats.input_bytes)
        consumer = _Consumer(shards, stats)
        started = time.monotonic()
        try:
            for result in encode(blocks):
                consumer.add(result)
                bar.update(int(result.sizes.sum()))
                bar.total = max(bar.total, bar.n)  # a .gz larger than its recorded size estimate
                bar.set_postfix(tokens_per_s=f"{stats.tokens / max(time.monotonic() - started, 1e-9):,.0f}",
                                refresh=False)
            if shards.writer is not None:
                shards.publish()
            if stats.documents == 0:  # nothing was written: a re-run with other flags starts afresh
                raise UserError(f"--input: no documents found ({stats.report()}); check --format (jsonl needs one "
                                f"JSON object per line with the text under --json-key {json_key!r}) and --json-key")
            _check_malformed_share(stats, max_malformed)
            manifest["complete"] = True
            manifest["final_stats"] = asdict(stats)
            write_manifest(manifest_path(output_prefix), manifest)
        except BaseException:
            if shards.writer is not None:
                shards.writer.abort()
            raise
        finally:
            bar.close()
    return stats

