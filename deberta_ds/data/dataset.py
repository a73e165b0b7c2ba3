"""Pre-training samples from token shards: packing, masking, and the global sample order.

Sample g (a global sample index, counting across epochs) is a pure function of
(seed, g): epoch e = g // N picks a seeded permutation of the N packed samples, and every
random choice of the masking comes from counter-based hashes of (seed, g, position). So
any rank, any worker, any restart computes the same sample for the same g.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deberta_ds.data.indexed_dataset import IndexedShard, find_shard_prefixes
from deberta_ds.data.random import permute, uniform
from deberta_ds.errors import UserError

IGNORE_INDEX = -100
# Hash streams: independent random values per purpose.
_STREAM_RTD, _STREAM_SPAN, _STREAM_NGRAM, _STREAM_ACTION, _STREAM_RANDOM_ID = range(5)


class TokenCorpus:
    """Many shards opened as one list of documents (zero-copy memmaps, picklable)."""

    def __init__(self, paths):
        self.shards = [IndexedShard(prefix) for prefix in find_shard_prefixes(paths)]
        lengths = [shard.document_lengths() for shard in self.shards]
        self.doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)   # [D]
        self.doc_shard = np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(lengths)])
        self.doc_local = np.concatenate([np.arange(len(x), dtype=np.int64) for x in lengths])
        self.max_token_id = max((int(s.tokens.max()) for s in self.shards if len(s.tokens)), default=-1)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def document(self, doc: int) -> np.ndarray:
        return self.shards[self.doc_shard[doc]].document_tokens(int(self.doc_local[doc]))


class PackedSamples:
    """Packs documents into samples of at most `capacity` tokens (= max length - 2).

    cross_documents=True: the documents form one token stream cut every `capacity` tokens.
    cross_documents=False: each document is cut on its own; its last piece may be short.
    The last, shorter sample is kept in both modes: no token is dropped.
    """

    def __init__(self, corpus: TokenCorpus, capacity: int, cross_documents: bool):
        if capacity < 1:
            raise UserError(f"max_length must be at least 3 ([CLS] x [SEP]), got capacity {capacity}")
        self.corpus, self.capacity, self.cross_documents = corpus, capacity, cross_documents
        if cross_documents:
            # A shard's .bin is its documents back to back, so the stream is the shards' token arrays.
            self.shard_starts = np.concatenate([[0], np.cumsum([len(s.tokens) for s in corpus.shards])])
            self.num_samples = -(-int(self.shard_starts[-1]) // capacity)
            self.document_ends = np.cumsum(corpus.doc_lengths)                             # [D], in the stream
        else:
            chunks = -(-corpus.doc_lengths // capacity)
            self.sample_starts = np.concatenate([[0], np.cumsum(chunks)])              # [D + 1]
            self.num_samples = int(self.sample_starts[-1])
        if self.num_samples == 0:
            raise UserError("the shards hold no tokens")

    def tokens(self, sample: int) -> np.ndarray:
        if not self.cross_documents:
            doc = int(np.searchsorted(self.sample_starts, sample, side="right")) - 1
            start = (sample - int(self.sample_starts[doc])) * self.capacity
            return self.corpus.document(doc)[start:start + self.capacity]
        begin, end = sample * self.capacity, min((sample + 1) * self.capacity, int(self.shard_starts[-1]))
        shard = int(np.searchsorted(self.shard_starts, begin, side="right")) - 1
        pieces = []
        while begin < end:
            offset = begin - int(self.shard_starts[shard])
            take = min(end - begin, int(self.shard_starts[shard + 1]) - begin)
            pieces.append(self.corpus.shards[shard].tokens[offset:offset + take])
            begin += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def document_starts(self, samples: np.ndarray) -> list[np.ndarray]:
        """For each packed sample, the offsets in `tokens(sample)` where a later document begins
        (none without cross-document packing: a sample is a piece of one document)."""
        if not self.cross_documents:
            return [np.zeros(0, np.int64)] * len(samples)
        begins = np.asarray(samples, np.int64) * self.capacity
        ends = np.minimum(begins + self.capacity, int(self.shard_starts[-1]))
        first = np.searchsorted(self.document_ends, begins, side="right")   # the document holding each begin
        last = np.searchsorted(self.document_ends, ends - 1, side="right")
        return [self.document_ends[lo:hi] - begin for lo, hi, begin in zip(first, last, begins)]


@dataclass
class MaskingConfig:
    """Which pieces the generator must predict: the run config's `data.masking` section."""

    mode: str = "rtd"              # rtd: every selected piece -> [MASK]; mlm: 80% [MASK], 10% random, 10% kept
    probability: float = 0.15
    whole_word: bool = False       # select whole words (n-grams of 1..max_ngram words, p(n) ~ 1/n)
    max_ngram: int = 3

    def __post_init__(self):
        if self.mode not in ("rtd", "mlm"):
            raise UserError(f"data.masking.mode: {self.mode!r} is not 'rtd' or 'mlm'")
        if not 0.0 < self.probability < 1.0:
            raise UserError(f"data.masking.probability: must be in (0, 1), got {self.probability}")
        if self.max_ngram < 1:
            raise UserError(f"data.masking.max_ngram: must be >= 1, got {self.max_ngram}")


@dataclass
class SpecialIds:
    """The ids masking must know, from the tokenizer (see `special_ids`)."""

    mask: int                   # [MASK]: the id after the last piece
    num_pieces: int
    pad: int = 0
    cls: int = 1
    sep: int = 2
    unk: int = 3
    first_regular: int = 4      # random replacements draw from [first_regular, num_pieces)


def special_ids(meta) -> SpecialIds:
    """A tokenizer's (deberta_ds.data.tokenizer.TokenizerMetadata) special ids."""
    return SpecialIds(mask=meta.mask_id, num_pieces=meta.pieces, pad=meta.pad_id, cls=meta.cls_id, sep=meta.sep_id,
                      unk=meta.unk_id)


class PretrainingSamples:
    """sample(g) -> {input_ids, attention_mask, labels} int64 [max_length], pure in (seed, g);
    with document_attention also document_ids (which packed document each position belongs to:
    [CLS] to the first, [SEP] and padding to the last)."""

    def __init__(self, corpus: TokenCorpus, max_length: int, special: SpecialIds, masking: MaskingConfig,
                 seed: int = 0, cross_documents: bool = True, word_start: np.ndarray | None = None,
                 document_attention: bool = False):
        self.packed = PackedSamples(corpus, max_length - 2, cross_documents)
        self.max_length, self.special, self.masking, self.seed = max_length, special, masking, seed
        self.document_attention = document_attention
        # Special ids ([UNK] too) are never masked, so never a generator target or a replacement
        # site: a lookup table over every id a sample can hold (one gather per batch, not np.isin).
        specials = [special.cls, special.sep, special.unk, special.mask, special.pad]
        self.unmaskable = np.zeros(max(corpus.max_token_id, *specials) + 1, dtype=bool)
        self.unmaskable[specials] = True
        if masking.whole_word and word_start is None:
            raise UserError("whole-word masking needs the tokenizer's word-start table")
        self.word_start = word_start

    def __len__(self) -> int:
        return self.packed.num_samples

    def sample_id(self, g: np.ndarray) -> np.ndarray:
        """Global sample index -> packed sample, a fresh permutation every epoch."""
        g = np.asarray(g, dtype=np.int64)
        epoch, position = np.divmod(g, self.packed.num_samples)
        out = np.empty_like(g)
        for e in np.unique(epoch):
            here = epoch == e
            out[here] = permute(position[here], self.packed.num_samples, self.seed * 1_000_003 + int(e))
        return out

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Masked, padded samples for global indices [B] -> arrays [B, max_length]."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = np.full((len(indices), self.max_length), self.special.pad, dtype=np.int64)
        attention_mask = np.zeros_like(ids)
        packed = self.sample_id(indices)
        for row, sample in enumerate(packed):
            tokens = self.packed.tokens(int(sample))
            ids[row, 0] = self.special.cls
            ids[row, 1:1 + len(tokens)] = tokens
            ids[row, 1 + len(tokens)] = self.special.sep
            attention_mask[row, :2 + len(tokens)] = 1
        maskable = attention_mask.astype(bool) & ~self.unmaskable[ids]
        if self.masking.whole_word:
            selected = np.stack([self._whole_word_selection(g, row, can)
                                 for g, row, can in zip(indices, ids, maskable)])
        else:
            positions = np.arange(self.max_length)
            selected = maskable & (uniform(self.seed, indices[:, None], positions, _STREAM_RTD)
                                   < self.masking.probability)
        labels = np.where(selected, ids, IGNORE_INDEX)
        batch = {"input_ids": self._corrupt(ids, selected, indices), "attention_mask": attention_mask,
                 "labels": labels}
        return batch | ({"document_ids": self._document_ids(packed)} if self.document_attention else {})

    def _document_ids(self, packed: np.ndarray) -> np.ndarray:
        """[B, max_length]: a count of the document starts up to each position ([CLS] is at 0, so
        a start at token offset t marks position t + 1; [SEP] and padding stay in the last)."""
        starts = np.zeros((len(packed), self.max_length), np.int64)
        for row, offsets in enumerate(self.packed.document_starts(packed)):
            starts[row, offsets + 1] = 1
        return np.cumsum(starts, axis=1)

    def _corrupt(self, ids, selected, indices) -> np.ndarray:
        if self.masking.mode == "rtd":
            return np.where(selected, self.special.mask, ids)
        positions = np.arange(self.max_length)
        action = uniform(self.seed, indices[:, None], positions, _STREAM_ACTION)
        span = self.special.num_pieces - self.special.first_regular
        random_ids = self.special.first_regular + (uniform(self.seed, indices[:, None], positions,
                                                           _STREAM_RANDOM_ID) * span).astype(np.int64)
        out = np.where(selected & (action < 0.8), self.special.mask, ids)        # 80% [MASK]
        return np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, out)  # 10% random, 10% kept

    def _whole_word_selection(self, g: int, ids: np.ndarray, maskable: np.ndarray) -> np.ndarray:
        """N-gram whole-word masking: words start at '▁' pieces; n in 1..max_ngram with p(n) ~ 1/n;
        spans are taken in a seeded random order until the masked-token budget is reached."""
        positions = np.flatnonzero(maskable)
        selected = np.zeros(len(ids), dtype=bool)
        if positions.size == 0:
            return selected
        starts = positions[self.word_start[ids[positions]] | (positions == positions[0])]
        word_ends = np.append(starts[1:], positions[-1] + 1)                    # word w = [starts[w], ends[w])
        budget = int(np.floor(positions.size * self.masking.probability
                              + uniform(self.seed, g, -1, _STREAM_SPAN)))
        weights = 1.0 / np.arange(1, self.masking.max_ngram + 1)
        cumulative = np.cumsum(weights / weights.sum())
        order = np.argsort(uniform(self.seed, g, np.arange(len(starts)), _STREAM_SPAN), kind="stable")
        ngram_draw = uniform(self.seed, g, np.arange(len(starts)), _STREAM_NGRAM)
        covered = 0
        for w in order:
            if covered >= budget:
                break
            n = int(np.searchsorted(cumulative, ngram_draw[w], side="right")) + 1
            last = min(w + n, len(starts)) - 1
            span = slice(starts[w], word_ends[last])
            if selected[span].any() or covered + (span.stop - span.start) > budget + 2:
                continue
            selected[span] = True
            covered += span.stop - span.start
        return selected & maskable
