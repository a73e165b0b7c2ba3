"""verify, inspect, merge and split for shard sets (streaming, bounded memory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from deberta_ds.data.indexed_dataset import IndexedShard, ShardWriter, find_shard_prefixes, verify_shard
from deberta_ds.data.provenance import check_provenance, manifest_of, record_output, release_output
from deberta_ds.errors import UserError

_COPY_TOKENS = 1 << 22  # tokens per streamed copy


def verify(paths, vocab_size: int | None = None, processor=None, out=print, mask_id: int | None = None,
           tokenizer_sha256: str | None = None, allow_incomplete: bool = False, warn=print) -> int:
    """Check every shard (ids below vocab_size; with the tokenizer's mask_id, no [MASK] or padding-row
    ids), then every byte against its manifest (made with tokenizer_sha256, when given); print a
    summary and a detokenised sample. Returns the exit code."""
    totals = np.zeros(3, dtype=np.int64)  # shards, documents, tokens
    sample = None
    prefixes = find_shard_prefixes(paths)
    for prefix in prefixes:
        shard = verify_shard(prefix, vocab_size, mask_id)
        totals += (1, shard.num_documents, int(shard.lengths.sum(dtype=np.int64)))
        if sample is None and shard.num_documents:
            sample = shard.document_tokens(0)[:64]
    check_provenance(prefixes, tokenizer_sha256, allow_incomplete, warn, full=True)
    out(f"OK: {totals[0]} shards, {totals[1]:,} documents, {totals[2]:,} tokens"
        + (f" (ids < {vocab_size})" if vocab_size else ""))
    if sample is not None and processor is not None:
        out(f"sample: {processor.decode([int(t) for t in sample if t < processor.get_piece_size()])!r}")
    return 0


def inspect(path, processor=None, out=print, tokenizer_sha256: str | None = None) -> None:
    prefixes = find_shard_prefixes([path])
    shards = [IndexedShard(prefix) for prefix in prefixes]
    check_provenance(prefixes, tokenizer_sha256)
    for prefix, shard in zip(prefixes, shards):
        doc_lengths = shard.document_lengths()
        out(f"{prefix}: dtype {shard.dtype}, {len(shard):,} sequences, {shard.num_documents:,} documents, "
            f"{int(doc_lengths.sum()):,} tokens")
        if len(doc_lengths):
            out(f"  tokens/document: min {doc_lengths.min()}, median {int(np.median(doc_lengths))}, "
                f"max {doc_lengths.max()}")
            first = shard.document_tokens(0)[:32]
            out(f"  first document ids: {first.tolist()}")
            if processor is not None:
                out(f"  first document text: {processor.decode([int(t) for t in first])!r}")


def _copy_documents(shard: IndexedShard, documents, writer: ShardWriter) -> None:
    """Copy documents (with their sequence structure) into `writer`, streaming."""
    for doc in documents:
        for seq in range(int(shard.doc_index[doc]), int(shard.doc_index[doc + 1])):
            tokens = shard.sequence(seq)
            for start in range(0, len(tokens), _COPY_TOKENS):
                writer.add_tokens(tokens[start:start + _COPY_TOKENS])
            writer.end_sequence()
        writer.end_document()


def _common_dtype(shards: list[IndexedShard]):
    dtypes = {shard.dtype for shard in shards}
    return np.int32 if np.dtype(np.int32) in dtypes else next(iter(dtypes))


def _checked_inputs(paths) -> tuple[list[IndexedShard], str, dict]:
    """The shards of `paths` (structure checked on open), every byte checked against its manifest;
    one tokenizer for all. Returns (shards, their tokenizer's sha256, where they came from)."""
    prefixes = find_shard_prefixes(paths)
    shards = [IndexedShard(prefix) for prefix in prefixes]
    hashes = check_provenance(prefixes, None, full=True)
    if len(hashes) > 1:
        raise UserError(f"--input: the shards were made with {len(hashes)} different tokenizers (sha256 "
                        f"{', '.join(sorted(hashes))}); merge or split shards of one tokenizer only")
    sources = {"inputs": [{"prefix": prefix, "manifest": str(manifest_of(prefix))} for prefix in prefixes]}
    return shards, hashes.pop(), sources


def _record(writer: ShardWriter, kind: str, tokenizer_sha256: str, sources: dict) -> None:
    record_output(writer.prefix, kind, tokenizer_sha256, writer.num_documents, writer.num_tokens, sources)


def merge(paths, output_prefix) -> ShardWriter:
    """Many shard sets -> one PREFIX.bin/.idx, in the given order (documents kept intact), with its manifest."""
    shards, tokenizer_sha256, sources = _checked_inputs(paths)
    release_output(output_prefix)
    writer = ShardWriter(output_prefix, _common_dtype(shards))
    try:
        for shard in shards:
            _copy_documents(shard, range(shard.num_documents), writer)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    _record(writer, "merge", tokenizer_sha256, sources)
    return writer


def is_validation_document(global_doc: int, seed: int, valid_fraction: float) -> bool:
    """Deterministic per-document choice from a hash of (seed, document number)."""
    digest = hashlib.blake2b(f"{seed}:{global_doc}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < valid_fraction


def split(paths, output_prefix, valid_fraction: float, seed: int = 0) -> tuple[ShardWriter, ShardWriter]:
    """Documents -> PREFIX_train / PREFIX_valid, chosen per document by a seeded hash."""
    if not 0.0 < valid_fraction < 1.0:
        raise UserError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    shards, tokenizer_sha256, sources = _checked_inputs(paths)
    dtype = _common_dtype(shards)
    for part in ("train", "valid"):
        release_output(f"{output_prefix}_{part}")
    train, valid = ShardWriter(f"{output_prefix}_train", dtype), ShardWriter(f"{output_prefix}_valid", dtype)
    try:
        global_doc = 0
        for shard in shards:
            for doc in range(shard.num_documents):
                target = valid if is_validation_document(global_doc, seed, valid_fraction) else train
                _copy_documents(shard, [doc], target)
                global_doc += 1
        train.finalize()
        valid.finalize()
    except BaseException:
        train.abort()
        valid.abort()
        raise
    for writer in (train, valid):
        _record(writer, "split", tokenizer_sha256, sources | {"valid_fraction": valid_fraction, "seed": seed})
    return train, valid


def record(paths, tokenizer: str) -> list[str]:
    """Shards made elsewhere (Megatron's preprocess_data.py): fully verified against the tokenizer
    (structure, every id a piece of it), then each gets its manifest. Returns the prefixes recorded."""
    from deberta_ds.data.tokenizer import load_tokenizer

    meta = load_tokenizer(tokenizer)[1]
    prefixes = find_shard_prefixes(paths)
    for prefix in prefixes:
        try:
            vouched_by = manifest_of(prefix)
        except UserError:
            vouched_by = None
        if vouched_by is not None:
            raise UserError(f"{prefix}: already has a manifest ({vouched_by}); check it with python -m data_prep "
                            "verify instead")
    for prefix in prefixes:
        shard = verify_shard(prefix, meta.model_vocab_size, meta.mask_id)
        record_output(prefix, "recorded", meta.sha256, shard.num_documents, int(shard.lengths.sum(dtype=np.int64)),
                      {"tokenizer": str(tokenizer)})
    return prefixes


def mixture_block(paths: list[str], alpha: float) -> str:
    """A ready `data.train` block: each shard set weighted by n_i^alpha (n_i its tokens), normalised."""
    from deberta_ds.data.mixture import temperature_weights

    tokens = []
    for path in paths:
        prefixes = find_shard_prefixes([path])
        tokens.append(sum(int(IndexedShard(prefix).lengths.sum()) for prefix in prefixes))
        check_provenance(prefixes, None)
    weights = temperature_weights(tokens, alpha)
    lines = [f"# temperature sampling, alpha {alpha}: weight_i = n_i^alpha / sum_j n_j^alpha", "data:", "  train:"]
    for path, count, weight in zip(paths, tokens, weights):
        name = Path(path.rstrip("/")).name
        lines.append(f"    - {{name: {name}, path: {path}, weight: {weight:.6f}}}   # {count:,} tokens, "
                     f"{count / sum(tokens):.2%} of them")
    return "\n".join(lines)

