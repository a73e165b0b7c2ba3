"""ELECTRA-style replaced token detection with DeBERTaV3's embedding sharing.

Outputs are NamedTuples: DeepSpeed's ZeRO-3 hooks find the tensors inside them (and not
inside dataclasses), which they need to gather parameters again for the backward pass.

Batch convention: ``input_ids`` already carry [MASK] at the masked positions, ``labels``
hold the original id there and IGNORE_INDEX (-100, the data module's convention) elsewhere,
``attention_mask`` is 1 for real tokens. The masked positions also come as a `MaskedPositions`
(built from the labels on the host by the batch prefetcher, `masked_positions`): fixed-size
padded index tensors, so no step of the forward or backward indexes with a boolean mask or
waits for the device to learn how many positions there are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deberta_ds.config import RTDConfig
from deberta_ds.data.dataset import IGNORE_INDEX
from deberta_ds.model.encoder import Encoder, compile_layers
from deberta_ds.model.heads import EnhancedMaskDecoder, LMHead, RTDHead
from deberta_ds.parallel.layers import (
    SINGLE,
    mark_partitioned,
    padded_vocab_size,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
    vocab_parallel_gumbel_max,
)
from deberta_ds.parallel.state import TensorParallel

MASKED_ROWS_MULTIPLE = 128  # masked positions are padded to a multiple of this many rows


class MaskedPositions(NamedTuple):
    """The generator's targets of a [B, L] batch as M_pad rows (M real, then padding)."""
    index: torch.Tensor           # [M_pad] int64: flat positions b * L + i; padding rows hold B * L
    labels: torch.Tensor          # [M_pad] int64: the original ids; IGNORE_INDEX on padding rows


def masked_positions(labels: torch.Tensor, multiple: int = MASKED_ROWS_MULTIPLE) -> MaskedPositions:
    """labels [B, L] -> MaskedPositions with the row count rounded up to `multiple` (few distinct
    shapes over a run). Meant for host tensors (the prefetcher): on a GPU tensor the row count
    would cost a synchronisation (nonzero)."""
    flat = labels.flatten()
    index = torch.nonzero(flat != IGNORE_INDEX)[:, 0]
    rows = -(-index.numel() // multiple) * multiple
    padded_index = torch.full((rows,), flat.numel(), dtype=torch.long, device=labels.device)
    padded_index[:index.numel()] = index
    padded_labels = torch.full((rows,), IGNORE_INDEX, dtype=torch.long, device=labels.device)
    padded_labels[:index.numel()] = flat[index]
    return MaskedPositions(padded_index, padded_labels)


def replaced_ratio(labels: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
    """Fraction of the masked positions whose sample differs from the original ('replaced' is
    only ever set at masked positions)."""
    return replaced.sum() / (labels != IGNORE_INDEX).sum()


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `weights` (bool) is set: sums, not boolean indexing (no host sync)."""
    return torch.where(weights, values, 0.0).sum() / weights.sum()


class GeneratorOutput(NamedTuple):
    loss: torch.Tensor            # MLM cross-entropy over masked positions
    accuracy: torch.Tensor
    logits: torch.Tensor          # [M_pad, V/tp] at the masked positions (the rows of `masked`)
    objective: torch.Tensor       # what the generator's optimiser minimises (loss, plus ES's RTD term)
    masked: MaskedPositions | None = None


class DiscriminatorOutput(NamedTuple):
    loss: torch.Tensor            # BCE over all non-pad tokens
    accuracy: torch.Tensor
    logits: torch.Tensor          # [B, L]
    replaced: torch.Tensor        # [B, L] bool labels


class RTDOutput(NamedTuple):
    loss: torch.Tensor            # mlm + rtd_lambda * rtd (the joint objective)
    generator: GeneratorOutput
    discriminator: DiscriminatorOutput
    corrupted_ids: torch.Tensor   # [B, L]
    replaced_ratio: torch.Tensor  # fraction of masked positions whose sample differs from the original


class Generator(nn.Module):
    def __init__(self, config: RTDConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.encoder = Encoder(config.generator, tp=tp)
        self.emd = EnhancedMaskDecoder(config.generator)
        self.lm_head = LMHead(config.generator, tp)
        self.cross_entropy = vocab_parallel_cross_entropy  # compile_training_step may swap in a compiled one

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask, labels, embedding_gradient=None, document_ids=None,
                masked: MaskedPositions | None = None) -> GeneratorOutput:
        """embedding_gradient [V, H]: the discriminator's RTD gradient w.r.t. E_G (ES across two
        optimisers); sum(E_G * gradient) adds exactly that gradient to E_G's. masked: the
        prefetcher's MaskedPositions of `labels` (built here, unpadded, when not given)."""
        masked = masked_positions(labels, multiple=1) if masked is None else masked
        encoder = self.encoder
        kv_states = encoder(input_ids, attention_mask, num_layers=len(encoder.layers) - 1, document_ids=document_ids)
        decoded = self.emd(encoder, kv_states, attention_mask, encoder.relative_table(), document_ids)  # [B, L, H]
        rows = masked.index.clamp(max=input_ids.numel() - 1)                    # padding rows read any row
        logits = self.lm_head(decoded.flatten(0, 1).index_select(0, rows), self.word_embeddings.weight)  # [M_pad, V/tp]
        vocab, valid = self.encoder.config.vocab_size, masked.labels != IGNORE_INDEX
        loss = self.cross_entropy(logits, masked.labels, vocab, self.tp).sum() / valid.sum()
        accuracy = _masked_mean(vocab_parallel_argmax(logits, vocab, self.tp) == masked.labels, valid)
        objective = loss
        if embedding_gradient is not None:
            objective = loss + (self.word_embeddings.weight * embedding_gradient).sum()
        return GeneratorOutput(loss, accuracy, logits, objective, masked)


class Discriminator(nn.Module):
    """Encoder + RTD head. Its word embedding depends on the sharing mode: GDES reads
    stopgrad(E_G) + E_delta (E_delta lives here, zero-initialised), ES reads E_G itself, NES
    owns a table. The generator's E_G is passed in, so each model can sit in its own engine."""

    def __init__(self, config: RTDConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.sharing = config.embedding_sharing
        self.encoder = Encoder(config.discriminator, own_word_embeddings=self.sharing == "nes", tp=tp)
        self.head = RTDHead(config.discriminator)
        if self.sharing == "gdes":  # vocabulary-split like E_G
            rows = padded_vocab_size(config.discriminator.vocab_size, tp.size) // tp.size
            delta = nn.Parameter(torch.zeros(rows, config.discriminator.hidden_size))
            self.embedding_delta = mark_partitioned(delta, 0, tp, vocab_parallel=True)

    def word_embedding_weight(self, generator_embedding: torch.Tensor | None) -> torch.Tensor | None:
        """The discriminator's word-embedding matrix [V, H]; None when it owns one (NES)."""
        if self.sharing == "gdes":
            return generator_embedding.detach() + self.embedding_delta
        if self.sharing == "es":
            return generator_embedding
        return None

    def forward(self, input_ids, attention_mask, replaced, generator_embedding=None, document_ids=None
                ) -> DiscriminatorOutput:
        hidden = self.encoder(input_ids, attention_mask, document_ids=document_ids,
                              word_embedding_weight=self.word_embedding_weight(generator_embedding))
        logits = self.head(hidden)                                              # [B, L]
        real = attention_mask.bool()
        token_losses = F.binary_cross_entropy_with_logits(logits.float(), replaced.float(), reduction="none")
        loss = _masked_mean(token_losses, real)
        accuracy = _masked_mean((logits > 0) == replaced, real)
        return DiscriminatorOutput(loss, accuracy, logits, replaced)


class ReplacedTokenDetection(nn.Module):
    """Generator + discriminator with GDES (E_D = stopgrad(E_G) + E_delta), ES or NES sharing,
    split over the tensor-parallel group `tp` (default TP = 1)."""

    def __init__(self, config: RTDConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = config, tp
        self.generator = Generator(config, tp)
        self.discriminator = Discriminator(config, tp)

    def discriminator_embedding_weight(self) -> torch.Tensor | None:
        return self.discriminator.word_embedding_weight(self.generator.word_embeddings.weight)

    @torch.no_grad()
    def corrupt(self, input_ids, labels, generator_logits, rng: torch.Generator | None = None,
                masked: MaskedPositions | None = None):
        """One categorical draw per masked position (Gumbel-max, no gradient; exactly the samples
        of TP = 1 at every TP size, see vocab_parallel_gumbel_max). generator_logits [M_pad, V/tp]
        are the rows of `masked` (by default the unpadded positions of `labels`). Returns the
        corrupted ids [B, L] and the 'replaced' labels [B, L]: masked AND the sample differs from
        the original (a lucky correct sample is 'original')."""
        masked = masked_positions(labels, multiple=1) if masked is None else masked
        sampled = vocab_parallel_gumbel_max(generator_logits, self.config.discriminator.vocab_size,
                                            self.config.temperature, self.tp, rng)            # [M_pad]
        # One spare slot past the end takes the padding rows' writes, then is dropped.
        corrupted = torch.cat([input_ids.flatten(), input_ids.new_zeros(1)])
        corrupted.index_put_((masked.index,), sampled)
        replaced = torch.zeros_like(corrupted, dtype=torch.bool)
        replaced.index_put_((masked.index,), (sampled != masked.labels) & (masked.labels != IGNORE_INDEX))
        return corrupted[:-1].view_as(input_ids), replaced[:-1].view_as(input_ids)

    def discriminate(self, corrupted_ids, attention_mask, replaced, document_ids=None) -> DiscriminatorOutput:
        return self.discriminator(corrupted_ids, attention_mask, replaced, self.generator.word_embeddings.weight,
                                  document_ids)

    def weighted_rtd(self, rtd_loss: torch.Tensor) -> torch.Tensor:
        """The discriminator's share of the objective, lambda x RTD (what it steps on in either mode)."""
        return self.config.rtd_lambda * rtd_loss

    def objective(self, generator: GeneratorOutput, discriminator: DiscriminatorOutput) -> torch.Tensor:
        """The joint objective: MLM + lambda x RTD."""
        return generator.loss + self.weighted_rtd(discriminator.loss)

    def forward(self, input_ids, attention_mask, labels, rng: torch.Generator | None = None, document_ids=None,
                masked: MaskedPositions | None = None) -> RTDOutput:
        gen = self.generator(input_ids, attention_mask, labels, document_ids=document_ids, masked=masked)
        corrupted, replaced = self.corrupt(input_ids, labels, gen.logits, rng, gen.masked)
        disc = self.discriminate(corrupted, attention_mask, replaced, document_ids)
        return RTDOutput(self.objective(gen, disc), gen, disc, corrupted, replaced_ratio(labels, replaced))

    def export_discriminator_embedding(self) -> torch.Tensor:
        """One merged word-embedding matrix for the exported discriminator (E_G + E_delta under GDES)."""
        weight = self.discriminator_embedding_weight()
        return (weight if weight is not None else self.discriminator.encoder.embeddings.word_embeddings.weight).detach()


def compile_training_step(model: ReplacedTokenDetection) -> None:
    """train.compile: every encoder layer (compile_layers) and, at TP = 1, the generator's
    cross-entropy, whose fused kernels read the bf16 logits without an fp32 [M, V] buffer in the
    forward or the backward (shapes: static first, dynamic after a second masked-row count)."""
    compile_layers(model)
    if model.tp.size == 1:
        model.generator.cross_entropy = torch.compile(vocab_parallel_cross_entropy)
