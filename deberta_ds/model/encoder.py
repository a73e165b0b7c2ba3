"""The DeBERTaV3 backbone: embeddings, disentangled self-attention, post-LN layers.

Plain PyTorch, top to bottom. Attention scores go through ``deberta_ds.kernels``, the one
dispatch point between the reference path and the fused kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deberta_ds.config import ModelConfig
from deberta_ds.kernels import attention_settings, disentangled_attention
from deberta_ds.parallel.layers import (
    SINGLE,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_partitioned_,
    parallel_embedding,
)
from deberta_ds.parallel.random import checkpoint, fork_tp_rng
from deberta_ds.parallel.state import TensorParallel


def layer_norm(size: int, eps: float) -> nn.Module:
    """apex's FusedLayerNorm on CUDA machines that have apex (same parameters and state-dict keys),
    torch's LayerNorm everywhere else."""
    if torch.cuda.is_available():
        try:
            from apex.normalization import FusedLayerNorm
            return FusedLayerNorm(size, eps=eps)
        except ImportError:
            pass
    return nn.LayerNorm(size, eps=eps)


def init_weights(module: nn.Module, std: float) -> None:
    """DeBERTa init: Linear/Embedding N(0, std), biases 0, LayerNorm (1, 0), padding row 0.
    Tensor-parallel layers draw their full weight and keep their slice (same init at any TP)."""
    for m in module.modules():
        if hasattr(m, "full_shape"):
            init_partitioned_(m.weight, m.full_shape, std, m.tp)
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.LayerNorm) or type(m).__name__ == "FusedLayerNorm":
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Embeddings(nn.Module):
    """word embedding -> LayerNorm -> zero padded positions -> dropout (no absolute positions)."""

    def __init__(self, config: ModelConfig, own_word_embeddings: bool = True, tp: TensorParallel = SINGLE):
        super().__init__()
        self.pad_token_id, self.tp = config.pad_token_id, tp
        # Without its own table (GDES/ES discriminator) the caller passes the weight to use.
        self.word_embeddings = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id, tp)
                                if own_word_embeddings else None)
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids, attention_mask, inputs_embeds=None, word_embedding_weight=None):
        if inputs_embeds is None and word_embedding_weight is not None:  # this rank's rows of the table
            inputs_embeds = parallel_embedding(input_ids, word_embedding_weight, self.pad_token_id, self.tp)
        elif inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)                    # [B, L, H]
        hidden = self.norm(inputs_embeds) * attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)
        return self.dropout(hidden)


class KeysValues(NamedTuple):
    key: torch.Tensor                  # [B, h/tp, L, d]
    value: torch.Tensor                # [B, h/tp, L, d]
    pos_key: torch.Tensor | None       # [h/tp, 2k, d], None without c2p
    pos_query: torch.Tensor | None     # [h/tp, 2k, d], None without p2c


class DisentangledSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = config, tp
        hidden = config.hidden_size
        # Column-parallel by whole heads: this rank computes num_heads / TP of them.
        self.query = ColumnParallelLinear(hidden, hidden, tp=tp)
        self.key = ColumnParallelLinear(hidden, hidden, tp=tp)
        self.value = ColumnParallelLinear(hidden, hidden, tp=tp)
        if not config.share_att_key:
            self.pos_key = ColumnParallelLinear(hidden, hidden, tp=tp) if "c2p" in config.pos_att_type else None
            self.pos_query = ColumnParallelLinear(hidden, hidden, tp=tp) if "p2c" in config.pos_att_type else None
        self.pos_dropout = nn.Dropout(config.hidden_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., L, H/tp] -> [..., h/tp, L, d]."""
        x = x.unflatten(-1, (self.config.num_heads // self.tp.size, self.config.head_dim))
        return x.transpose(-2, -3)

    def _positional(self, rel_table: torch.Tensor):
        """Project the (dropped-out) relative table: Kr, Qr as [h, 2k, d], or None when off."""
        table = self.pos_dropout(rel_table)                                  # [2k, H]
        terms = self.config.pos_att_type
        if self.config.share_att_key:
            key_proj, query_proj = self.key, self.query
        else:
            key_proj, query_proj = self.pos_key, self.pos_query
        pos_key = self._heads(key_proj(table)) if "c2p" in terms else None
        pos_query = self._heads(query_proj(table)) if "p2c" in terms else None
        return pos_key, pos_query

    def keys_values(self, hidden_states, rel_table) -> KeysValues:
        """What attention reads besides the queries: K, V of hidden_states [B, L, H] and the
        projected relative table. The EMD computes them once for both of its passes."""
        return KeysValues(self._heads(self.key(hidden_states)), self._heads(self.value(hidden_states)),
                          *self._positional(rel_table))

    def forward(self, hidden_states, attention_mask, rel_table, query_states=None, document_ids=None,
                keys: KeysValues | None = None):
        """hidden_states [B, L, H] gives keys/values (or `keys`, computed from them already);
        query_states (default: the same) queries; document_ids [B, L] (optional) keeps attention
        inside each packed document."""
        query_states = hidden_states if query_states is None else query_states
        q = self._heads(self.query(query_states))                             # [B, h, L, d]
        k, v, pos_key, pos_query = self.keys_values(hidden_states, rel_table) if keys is None else keys
        with fork_tp_rng(self.tp):  # probabilities of this rank's heads: a TP-rank-specific dropout stream
            context = disentangled_attention(q, k, v, pos_key, pos_query, attention_mask, self.settings,
                                             training=self.training, document_ids=document_ids)  # [B, h/tp, L, d]
        return context.transpose(1, 2).flatten(2)                             # [B, L, H/tp]


class EncoderLayer(nn.Module):
    """Post-LN: attention -> dense -> dropout -> +res -> LN; FFN (erf GELU) -> dropout -> +res -> LN."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden = config.hidden_size
        self.attention = DisentangledSelfAttention(config, tp)
        self.attention_out = RowParallelLinear(hidden, hidden, tp=tp)
        self.attention_norm = layer_norm(hidden, config.layer_norm_eps)
        self.ffn_in = ColumnParallelLinear(hidden, config.intermediate_size, tp=tp)
        self.ffn_out = RowParallelLinear(config.intermediate_size, hidden, tp=tp)
        self.ffn_norm = layer_norm(hidden, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask, rel_table, query_states=None, document_ids=None, keys=None):
        residual = hidden_states if query_states is None else query_states
        context = self.attention(hidden_states, attention_mask, rel_table, query_states, document_ids, keys)
        attended = self.attention_norm(self.dropout(self.attention_out(context)) + residual)
        ffn = self.ffn_out(F.gelu(self.ffn_in(attended)))
        return self.ffn_norm(self.dropout(ffn) + attended)


class Encoder(nn.Module):
    """Embeddings + layers sharing one LayerNorm-ed relative-position table.

    forward: (input_ids [B, L], attention_mask [B, L]) -> last hidden states [B, L, H]; with
    document_ids [B, L] each position attends only inside its own document (packed samples).
    `tp`: the tensor-parallel group the layers are split over (default TP = 1).
    """

    def __init__(self, config: ModelConfig, own_word_embeddings: bool = True, tp: TensorParallel = SINGLE):
        super().__init__()
        config.check_tensor_parallel(tp.size)
        self.config, self.tp = config, tp
        self.embeddings = Embeddings(config, own_word_embeddings, tp)
        # A bare parameter of the encoder (not an nn.Embedding that is never called), so ZeRO-3
        # gathers it with the encoder's own forward.
        self.rel_embeddings = nn.Parameter(torch.empty(2 * config.position_buckets, config.hidden_size))
        self.rel_norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config, tp) for _ in range(config.num_layers))
        settings = attention_settings(config, config.num_heads // tp.size)  # the implementation is chosen here
        for layer in self.layers:
            layer.attention.settings = settings
        # Recompute each layer in the backward instead of keeping its activations (a run-time
        # choice of the trainer, not part of the model's shape: see set_activation_checkpointing).
        self.activation_checkpointing = False
        init_weights(self, config.initializer_range)
        nn.init.normal_(self.rel_embeddings, std=config.initializer_range)

    def run_layer(self, layer: EncoderLayer, hidden, attention_mask, rel_table, query_states=None,
                  document_ids=None, keys: KeysValues | None = None):
        """One layer, recomputed in the backward when activation checkpointing is on (`keys`,
        when given, are kept: they were computed outside)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.tp.tracker, layer, hidden, attention_mask, rel_table, query_states, document_ids,
                              keys)
        return layer(hidden, attention_mask, rel_table, query_states, document_ids, keys)

    def relative_table(self) -> torch.Tensor:
        return self.rel_norm(self.rel_embeddings)                             # [2k, H]

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, word_embedding_weight=None,
                num_layers: int | None = None, document_ids=None):
        """Runs the first `num_layers` layers (all by default); returns their output [B, L, H]."""
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        hidden = self.embeddings(input_ids, attention_mask, inputs_embeds, word_embedding_weight)
        rel_table = self.relative_table()
        for layer in self.layers[:num_layers]:
            hidden = self.run_layer(layer, hidden, attention_mask, rel_table, document_ids=document_ids)
        return hidden


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Every encoder inside `model` (generator, discriminator, the EMD's layer calls) recomputes
    its layers in the backward (enabled) or keeps their activations."""
    for module in model.modules():
        if isinstance(module, Encoder):
            module.activation_checkpointing = enabled


def compile_layers(model: nn.Module) -> None:
    """torch.compile every encoder layer inside `model` (generator, discriminator, the EMD's
    passes): the layers' matrix products, dropout, residual, LayerNorm and GELU fuse into few
    kernels, the attention stays the custom op it is. Shapes are static (one graph per sequence
    length and call form, shared by all layers of a shape); masking, sampling and the heads stay eager."""
    for module in model.modules():
        if isinstance(module, EncoderLayer):
            module.compile(dynamic=False)
