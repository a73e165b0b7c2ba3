"""The fused kernel as a PyTorch op: custom ops (torch.compile sees through them) with autograd.

`disentangled_attention_fused` has the reference's signature and semantics. The custom ops take
the settings as plain numbers (their schema allows no objects) and rebuild the frozen
`AttentionSettings` the host code passes down.
"""

from __future__ import annotations

import torch

from deberta_ds.kernels.reference import default_scale
from deberta_ds.kernels.settings import AttentionSettings
from deberta_ds.kernels.triton_attention import fused_backward, fused_forward


def _settings(position_buckets, max_relative_positions, scale, dropout_p) -> AttentionSettings:
    return AttentionSettings(position_buckets, max_relative_positions, scale, dropout_p, "fused")


@torch.library.custom_op("deberta_ds::disentangled_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_key: torch.Tensor | None,
                pos_query: torch.Tensor | None, attention_mask: torch.Tensor | None,
                document_ids: torch.Tensor | None, position_buckets: int, max_relative_positions: int, scale: float,
                dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_forward(q, k, v, pos_key, pos_query, attention_mask, document_ids,
                         _settings(position_buckets, max_relative_positions, scale, dropout_p),
                         torch.tensor([seed], dtype=torch.int64, device=q.device))


@_forward_op.register_fake
def _(q, k, v, pos_key, pos_query, attention_mask, document_ids, position_buckets, max_relative_positions, scale,
      dropout_p, seed):
    batch, heads, seq_len, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch * heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("deberta_ds::disentangled_attention_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 pos_key: torch.Tensor | None, pos_query: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 document_ids: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, position_buckets: int,
                 max_relative_positions: int, scale: float, dropout_p: float, seed: int) -> list[torch.Tensor]:
    grads = fused_backward(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, out, lse,
                           _settings(position_buckets, max_relative_positions, scale, dropout_p),
                           torch.tensor([seed], dtype=torch.int64, device=q.device))
    return [g if g is not None else q.new_empty(0) for g in grads]


@_backward_op.register_fake
def _(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, out, lse, position_buckets,
      max_relative_positions, scale, dropout_p, seed):
    tables = [torch.empty_like(t) if t is not None else q.new_empty(0) for t in (pos_key, pos_query)]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *tables]


def _setup_context(ctx, inputs, output):
    q, k, v, pos_key, pos_query, attention_mask, document_ids, *config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos_key, pos_query, attention_mask, document_ids, out, lse)
    ctx.config = config


def _backward(ctx, grad_out, grad_lse):
    q, k, v, pos_key, pos_query, attention_mask, document_ids, out, lse = ctx.saved_tensors
    dq, dk, dv, dkr, dqr = _backward_op(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, out,
                                        lse, *ctx.config)
    return (dq, dk, dv, dkr if pos_key is not None else None, dqr if pos_query is not None else None,
            None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def disentangled_attention_fused(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets,
                                 max_relative_positions, scale=None, dropout_p=0.0, seed=None, document_ids=None):
    """Same contract as `disentangled_attention_reference`; dropout draws its seed from torch's RNG
    when none is given, so runs stay reproducible under torch.manual_seed."""
    if scale is None:
        scale = default_scale(q.shape[-1], pos_key, pos_query)
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2 ** 30, (1,)).item())
    out, _ = _forward_op(q, k, v, pos_key, pos_query, attention_mask, document_ids, position_buckets,
                         max_relative_positions, float(scale), float(dropout_p), int(seed or 0))
    return out
