"""ELECTRA-style replaced token detection with DeBERTaV3's embedding sharing.

Outputs are NamedTuples: DeepSpeed's ZeRO-3 hooks find the tensors inside them (and not
inside dataclasses), which they need to gather parameters again for the backward pass.

Batch convention: ``input_ids`` already carry [MASK] at the masked positions, ``labels``
hold the original id there and IGNORE_INDEX (-100, the data module's convention) elsewhere,
``attention_mask`` is 1 for real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deberta_ds.config import RTDConfig
from deberta_ds.data.dataset import IGNORE_INDEX
from deberta_ds.model.encoder import Encoder
from deberta_ds.model.heads import EnhancedMaskDecoder, LMHead, RTDHead
from deberta_ds.parallel.layers import (
    SINGLE,
    mark_partitioned,
    padded_vocab_size,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from deberta_ds.parallel.state import TensorParallel


def replaced_ratio(labels: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
    """Fraction of the masked positions whose sample differs from the original."""
    return replaced[labels != IGNORE_INDEX].float().mean()


class GeneratorOutput(NamedTuple):
    loss: torch.Tensor            # MLM cross-entropy over masked positions
    accuracy: torch.Tensor
    logits: torch.Tensor          # [M, V] at the masked positions, row-major order
    objective: torch.Tensor       # what the generator's optimiser minimises (loss, plus ES's RTD term)


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

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask, labels, embedding_gradient=None, document_ids=None
                ) -> GeneratorOutput:
        """embedding_gradient [V, H]: the discriminator's RTD gradient w.r.t. E_G (ES across two
        optimisers); sum(E_G * gradient) adds exactly that gradient to E_G's."""
        encoder = self.encoder
        kv_states = encoder(input_ids, attention_mask, num_layers=len(encoder.layers) - 1, document_ids=document_ids)
        decoded = self.emd(encoder, kv_states, attention_mask, encoder.relative_table(), document_ids)  # [B, L, H]
        masked = labels != IGNORE_INDEX
        logits = self.lm_head(decoded[masked], self.word_embeddings.weight)      # [M, V/tp]
        targets = labels[masked]
        vocab = self.encoder.config.vocab_size
        loss = vocab_parallel_cross_entropy(logits, targets, vocab, self.tp).mean()
        accuracy = (vocab_parallel_argmax(logits, vocab, self.tp) == targets).float().mean()
        objective = loss
        if embedding_gradient is not None:
            objective = loss + (self.word_embeddings.weight * embedding_gradient).sum()
        return GeneratorOutput(loss, accuracy, logits, objective)


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
        loss = F.binary_cross_entropy_with_logits(logits[real].float(), replaced[real].float())
        accuracy = ((logits[real] > 0) == replaced[real]).float().mean()
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
    def corrupt(self, input_ids, labels, generator_logits, rng: torch.Generator | None = None):
        """One categorical draw per masked position (Gumbel-max, no gradient).

        The Gumbel noise is drawn for the whole vocabulary [M, V] on every TP rank from the same
        stream and each rank keeps its columns, so vocabulary-split logits give exactly the
        samples of TP = 1. Returns the corrupted ids [B, L] and the 'replaced' labels [B, L]:
        masked AND the sample differs from the original (a lucky correct sample is 'original').
        """
        masked = labels != IGNORE_INDEX
        vocab = self.config.discriminator.vocab_size
        uniform = torch.rand((generator_logits.shape[0], vocab), generator=rng, device=generator_logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))   # [M, V]
        start, width = self.tp.rank * generator_logits.shape[-1], generator_logits.shape[-1]
        local_gumbel = F.pad(gumbel[:, start:start + width], (0, max(0, start + width - vocab)))
        scores = generator_logits.float() / self.config.temperature + local_gumbel
        sampled = vocab_parallel_argmax(scores, vocab, self.tp)                 # [M]
        corrupted = input_ids.clone()
        corrupted[masked] = sampled
        replaced = torch.zeros_like(masked)
        replaced[masked] = sampled != labels[masked]
        return corrupted, replaced

    def discriminate(self, corrupted_ids, attention_mask, replaced, document_ids=None) -> DiscriminatorOutput:
        return self.discriminator(corrupted_ids, attention_mask, replaced, self.generator.word_embeddings.weight,
                                  document_ids)

    def weighted_rtd(self, rtd_loss: torch.Tensor) -> torch.Tensor:
        """The discriminator's share of the objective, lambda x RTD (what it steps on in either mode)."""
        return self.config.rtd_lambda * rtd_loss

    def objective(self, generator: GeneratorOutput, discriminator: DiscriminatorOutput) -> torch.Tensor:
        """The joint objective: MLM + lambda x RTD."""
        return generator.loss + self.weighted_rtd(discriminator.loss)

    def forward(self, input_ids, attention_mask, labels, rng: torch.Generator | None = None, document_ids=None
                ) -> RTDOutput:
        gen = self.generator(input_ids, attention_mask, labels, document_ids=document_ids)
        corrupted, replaced = self.corrupt(input_ids, labels, gen.logits, rng)
        disc = self.discriminate(corrupted, attention_mask, replaced, document_ids)
        return RTDOutput(self.objective(gen, disc), gen, disc, corrupted, replaced_ratio(labels, replaced))

    def export_discriminator_embedding(self) -> torch.Tensor:
        """One merged word-embedding matrix for the exported discriminator (E_G + E_delta under GDES)."""
        weight = self.discriminator_embedding_weight()
        return (weight if weight is not None else self.discriminator.encoder.embeddings.word_embeddings.weight).detach()
