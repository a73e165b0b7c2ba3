"""Task heads: the generator's enhanced mask decoder and tied LM head, the RTD head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deberta_ds.config import ModelConfig
from deberta_ds.errors import UserError
from deberta_ds.model.encoder import Encoder, init_weights, layer_norm
from deberta_ds.parallel.layers import SINGLE, mark_partitioned, padded_vocab_size
from deberta_ds.parallel.mappings import copy_to_tp
from deberta_ds.parallel.state import TensorParallel


class EnhancedMaskDecoder(nn.Module):
    """Runs the encoder's LAST layer twice over the second-to-last layer's output.

    Keys/values stay H_kv throughout (projected once, with the relative table, for both passes);
    the query starts as H_kv + absolute position embeddings (the only place absolute positions
    enter DeBERTaV3). With document_ids each packed document's
    positions count from 0, as if it ran alone.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        init_weights(self, config.initializer_range)

    def forward(self, encoder: Encoder, kv_states, attention_mask, rel_table, document_ids=None):
        seq_len = kv_states.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise UserError(f"sequence length {seq_len} exceeds max_position_embeddings="
                             f"{self.position_embeddings.num_embeddings} of the generator's enhanced mask decoder")
        if document_ids is None:
            positions = self.position_embeddings.weight[:seq_len]                 # [L, H]
        else:
            positions = self.position_embeddings(positions_in_documents(document_ids))  # [B, L, H]
        query = kv_states + positions
        last_layer = encoder.layers[-1]
        keys = last_layer.attention.keys_values(kv_states, rel_table)  # the same for both passes
        for _ in range(2):
            query = encoder.run_layer(last_layer, kv_states, attention_mask, rel_table, query_states=query,
                                      document_ids=document_ids, keys=keys)
        return query


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> each position's offset from the start of its run of equal ids, [B, L] int64."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> h . W_word^T + bias, W_word passed in (tied). Under TP the
    word table and the bias are vocabulary-split and so are the logits [M, V/tp]."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        rows = padded_vocab_size(config.vocab_size, tp.size) // tp.size
        self.bias = mark_partitioned(nn.Parameter(torch.zeros(rows)), 0, tp, vocab_parallel=True)
        init_weights(self, config.initializer_range)

    def forward(self, hidden, word_embedding_weight):
        hidden = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(copy_to_tp(hidden, self.tp), word_embedding_weight, self.bias)


class RTDHead(nn.Module):
    """LayerNorm(h + h_CLS) -> dense -> GELU -> classifier: one 'replaced' logit per token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, 1)
        init_weights(self, config.initializer_range)

    def forward(self, hidden):                                                # [B, L, H] -> [B, L]
        hidden = self.norm(hidden + hidden[:, :1])
        return self.classifier(F.gelu(self.dense(hidden))).squeeze(-1)
