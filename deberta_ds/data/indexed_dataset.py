"""The Megatron "MMIDIDX" indexed-dataset layout: the one module that writes, reads and checks it.

P.idx: magic(9) version<u8>=1 dtype<u1> N<u8> D<u8> | lengths int32[N] | byte pointers int64[N] |
document boundaries int64[D] (first 0, last N). P.bin: the token ids, concatenated, raw.

The writer streams: token ids go straight to P.bin, and sequence lengths and document
boundaries go to side files, so memory stays bounded for any shard size. Everything is
written under ``.tmp`` names and renamed into place only when complete (P.bin first, P.idx
last): a killed run never leaves a pair that looks valid.
"""

from __future__ import annotations

import glob
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deberta_ds.atomic_files import commit, temporary_name
from deberta_ds.data.paths import expand_path
from deberta_ds.errors import MissingInputError, UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N sequences, D document entries
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
TOKEN_DTYPES = (np.uint16, np.int32)
_CHUNK = 1 << 20  # elements per streamed chunk when composing the index


def dtype_for_vocab(vocab_size: int) -> type:
    """Megatron's rule: uint16 below 65,500 ids, else int32 (never an overflowing uint16)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


_tmp = temporary_name


class ShardWriter:
    """Streams sequences into PREFIX.bin/.idx; one sequence per document unless `add_sequence`
    is used with `end_document`. Call `finalize()` to publish, `abort()` to discard."""

    def __init__(self, prefix: str | Path, dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise UserError(f"{self.prefix}: unsupported token dtype {self.dtype}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(_tmp(data_path(prefix)), "wb")
        self._lengths = open(_tmp(Path(f"{prefix}.lengths")), "wb")
        self._docs = open(_tmp(Path(f"{prefix}.docs")), "wb")
        self.num_sequences = 0
        self.num_tokens = 0
        self.num_documents = 0
        self._open_sequence_tokens = 0

    def add_tokens(self, ids: np.ndarray) -> None:
        """Append ids to the current (open) sequence."""
        ids = np.asarray(ids)
        if ids.dtype != self.dtype:  # a conversion must not wrap around
            if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
                raise UserError(f"{self.prefix}: token id out of range for {self.dtype}")
            ids = ids.astype(self.dtype)
        self._bin.write(ids.tobytes())
        self._open_sequence_tokens += ids.size
        self.num_tokens += ids.size

    def end_sequence(self) -> None:
        self._lengths.write(struct.pack("<i", self._open_sequence_tokens))
        self._open_sequence_tokens = 0
        self.num_sequences += 1

    def end_document(self) -> None:
        self._docs.write(struct.pack("<q", self.num_sequences))
        self.num_documents += 1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many whole documents at once (one sequence each): `tokens` concatenated, `lengths` [n]."""
        if self._open_sequence_tokens:
            raise UserError(f"{self.prefix}: add_documents while a sequence is open")
        self.add_tokens(tokens)
        self._open_sequence_tokens = 0
        self._lengths.write(np.asarray(lengths, dtype=np.int32).tobytes())
        ends = self.num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.num_sequences += len(lengths)
        self.num_documents += len(lengths)

    def add_document(self, ids: np.ndarray) -> None:
        self.add_tokens(ids)
        self.end_sequence()
        self.end_document()

    def finalize(self) -> None:
        for handle in (self._bin, self._lengths, self._docs):
            handle.close()
        lengths_file, docs_file = _tmp(Path(f"{self.prefix}.lengths")), _tmp(Path(f"{self.prefix}.docs"))
        idx_tmp = _tmp(index_path(self.prefix))
        with open(idx_tmp, "wb") as out:
            out.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], self.num_sequences,
                                  self.num_documents + 1))
            lengths = np.memmap(lengths_file, dtype=np.int32, mode="r") if self.num_sequences else np.zeros(0, np.int32)
            out.write(lengths.tobytes())
            offset = 0
            for start in range(0, self.num_sequences, _CHUNK):  # exclusive prefix sum, in chunks
                chunk = lengths[start:start + _CHUNK].astype(np.int64) * self.dtype.itemsize
                pointers = np.cumsum(chunk) - chunk + offset
                offset = int(pointers[-1] + chunk[-1])
                out.write(pointers.tobytes())
            del lengths
            out.write(struct.pack("<q", 0))
            with open(docs_file, "rb") as docs:
                while block := docs.read(_CHUNK * 8):
                    out.write(block)
        commit(_tmp(data_path(self.prefix)), data_path(self.prefix))  # P.bin first: P.idx marks a finished shard
        commit(idx_tmp, index_path(self.prefix))
        lengths_file.unlink()
        docs_file.unlink()

    def abort(self) -> None:
        for handle in (self._bin, self._lengths, self._docs):
            handle.close()
        for suffix in (".bin", ".lengths", ".docs", ".idx"):
            _tmp(Path(f"{self.prefix}{suffix}")).unlink(missing_ok=True)


@dataclass
class IndexHeader:
    dtype: np.dtype
    num_sequences: int
    num_doc_entries: int


class ShardFormatError(UserError):
    """A shard that breaks the layout; the message names the file and the byte offset."""


def read_header(idx_file: Path) -> IndexHeader:
    with open(idx_file, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ShardFormatError(f"{idx_file}: truncated header ({len(raw)} of {HEADER.size} bytes at offset 0)")
    magic, version, code, num_sequences, num_docs = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardFormatError(f"{idx_file}: bad magic {magic!r} at offset 0 (expected {MAGIC!r}); "
                               "not a Megatron MMIDIDX index")
    if version != VERSION:
        raise ShardFormatError(f"{idx_file}: unsupported version {version} at offset 9 (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise ShardFormatError(f"{idx_file}: unknown dtype code {code} at offset 17 (known: {sorted(DTYPE_CODES)})")
    return IndexHeader(np.dtype(DTYPE_CODES[code]), num_sequences, num_docs)


class IndexedShard:
    """Zero-copy reader of one PREFIX.bin/.idx pair (numpy memmaps, reopened after pickling),
    structurally checked on every open."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx_file = index_path(self.prefix)
        for path in (idx_file, data_path(self.prefix)):
            if not path.is_file():
                raise MissingInputError(f"{path}: shard file not found")
        header = read_header(idx_file)
        self.dtype = header.dtype
        n, d = header.num_sequences, header.num_doc_entries
        expected = HEADER.size + 12 * n + 8 * d
        if idx_file.stat().st_size != expected:
            size = idx_file.stat().st_size
            raise ShardFormatError(f"{idx_file}: size {size} bytes, the header implies {expected} (truncated or "
                                   f"padded at offset {min(expected, size)})")
        index = np.memmap(idx_file, dtype=np.uint8, mode="r")
        self.lengths = index[HEADER.size:HEADER.size + 4 * n].view(np.int32)
        self.pointers = index[HEADER.size + 4 * n:HEADER.size + 12 * n].view(np.int64)
        self.doc_index = index[HEADER.size + 12 * n:].view(np.int64)
        self._check_structure()
        bin_size = data_path(self.prefix).stat().st_size
        self.tokens = (np.memmap(data_path(self.prefix), dtype=self.dtype, mode="r") if bin_size
                       else np.zeros(0, dtype=self.dtype))

    def _check_structure(self) -> None:
        """Everything but the token values, vectorised over the index (no pass over P.bin): token
        dtype, lengths, pointers, document index and P.bin's size. Every open runs it, so a shard
        that would read past its data, or misread it, never reaches training, inspect, merge or split."""
        idx_file, bin_file = index_path(self.prefix), data_path(self.prefix)
        n = len(self.lengths)
        pointers_offset = HEADER.size + 4 * n
        docs_offset = pointers_offset + 8 * n
        if self.dtype.type not in TOKEN_DTYPES:
            raise ShardFormatError(f"{idx_file}: token dtype {self.dtype} at offset 17 is not uint16 or int32")
        bad = np.flatnonzero(self.lengths < 0)
        if bad.size:
            raise ShardFormatError(f"{idx_file}: negative sequence length at offset {HEADER.size + 4 * bad[0]}")
        expected_pointers = (np.cumsum(self.lengths, dtype=np.int64) - self.lengths) * self.dtype.itemsize
        bad = np.flatnonzero(self.pointers != expected_pointers)
        if bad.size:
            raise ShardFormatError(f"{idx_file}: sequence pointer {int(self.pointers[bad[0]])} at offset "
                                   f"{pointers_offset + 8 * bad[0]} breaks monotonicity (expected "
                                   f"{int(expected_pointers[bad[0]])})")
        docs = self.doc_index
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n:
            raise ShardFormatError(f"{idx_file}: document index at offset {docs_offset} must start at 0 and end at {n}")
        bad = np.flatnonzero(np.diff(docs) < 0)
        if bad.size:
            raise ShardFormatError(f"{idx_file}: document index decreases at offset {docs_offset + 8 * (bad[0] + 1)}")
        total_bytes = int(self.lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_file.stat().st_size != total_bytes:
            raise ShardFormatError(f"{bin_file}: size {bin_file.stat().st_size} bytes, the index implies {total_bytes} "
                                   f"(pointers past the end or truncated data at offset "
                                   f"{min(total_bytes, bin_file.stat().st_size)})")

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_documents(self) -> int:
        return len(self.doc_index) - 1

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.lengths[i])]

    def document_tokens(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences are contiguous in P.bin)."""
        first, last = int(self.doc_index[doc]), int(self.doc_index[doc + 1])
        if first == last:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        end = int(self.pointers[last - 1]) // self.dtype.itemsize + int(self.lengths[last - 1])
        return self.tokens[start:end]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, int64 [num_documents]."""
        cumulative = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return cumulative[self.doc_index[1:]] - cumulative[self.doc_index[:-1]]


def first_id_at_or_above(shard: IndexedShard, limit: int) -> int | None:
    """The position (in tokens) in P.bin of the first id >= limit (or < 0), or None; one streamed pass."""
    for start in range(0, len(shard.tokens), _CHUNK):
        chunk = shard.tokens[start:start + _CHUNK]
        bad = np.flatnonzero((chunk >= limit) | (chunk < 0))
        if bad.size:
            return start + int(bad[0])
    return None


def verify_shard(prefix: str | Path, vocab_size: int | None = None, mask_id: int | None = None) -> IndexedShard:
    """Full check of one shard: the structure (every open checks it) and, given vocab_size, every
    token id (one pass over P.bin); given the tokenizer's mask_id (the id after its last piece),
    [MASK] and the padding rows past it are refused too, since no text tokenises to them. Raises
    ShardFormatError naming the file and first bad offset."""
    shard = IndexedShard(prefix)
    if vocab_size is None:
        return shard
    position = first_id_at_or_above(shard, vocab_size if mask_id is None else mask_id)
    if position is not None:
        token, offset = int(shard.tokens[position]), position * shard.dtype.itemsize
        if token == mask_id:
            what = f"at offset {offset} is [MASK], which the data must not hold (masking adds it)"
        elif mask_id is not None and mask_id < token < vocab_size:
            what = (f"at offset {offset} is a padding row of the vocabulary (past [MASK] = {mask_id}; no piece of "
                    "the tokenizer has it)")
        else:
            what = f">= vocab size {vocab_size} at offset {offset}"
        raise ShardFormatError(f"{data_path(prefix)}: token id {token} {what}")
    return shard


_SHARD_SUFFIXES = (".idx", ".bin")


def _shard_prefix(path: str) -> str:
    return path[:-4] if path.endswith(_SHARD_SUFFIXES) else path


def find_shard_prefixes(paths) -> list[str]:
    """Expand prefixes, PREFIX.idx/.bin paths, globs, directories and the --output-prefix of a tokenize
    job (all of its shards PREFIX_00000, PREFIX_00001, ...) into sorted shard prefixes."""
    prefixes: list[str] = []
    for raw in paths:
        found = sorted({_shard_prefix(p) for p in expand_path(raw, lambda folder: list(folder.glob("*.idx")),
                                                               keep=lambda match: match.endswith(_SHARD_SUFFIXES))})
        if found == [_shard_prefix(str(raw))] and not index_path(found[0]).is_file():
            found = _job_shards(found[0]) or found
        if not found:
            raise MissingInputError(f"{raw}: no shards (*.idx/*.bin) found")
        for prefix in found:
            if not index_path(prefix).is_file():
                raise MissingInputError(f"{index_path(prefix)}: shard index not found; {_shards_beside(prefix)}")
        prefixes.extend(found)
    return prefixes


def _job_shards(prefix: str) -> list[str]:
    """The shards PREFIX_00000, PREFIX_00001, ... a tokenize job with --output-prefix PREFIX wrote."""
    matches = glob.glob(f"{glob.escape(prefix)}_[0-9][0-9][0-9][0-9][0-9].idx")
    return sorted(_shard_prefix(match) for match in matches)


def _shards_beside(prefix: str) -> str:
    """Which shard names exist where `prefix` points, for an error message."""
    folder = Path(prefix).parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    names = sorted(p.name[:-4] for p in folder.glob("*.idx"))
    if not names:
        return f"{folder} holds no shards (*.idx)"
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return (f"shards in {folder}: {shown} (give a shard's name, the folder, or a tokenize --output-prefix for all "
            "of its shards)")
