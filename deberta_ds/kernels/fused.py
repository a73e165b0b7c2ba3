"""The fused kernel as a PyTorch op: custom ops (torch.compile sees through them) with autograd.

`disentangled_attention_fused` has the reference's signature and contract (`reference.check_inputs`).
The custom ops take the settings as plain numbers (their schema allows no objects) and rebuild the
frozen `AttentionSettings` the host code passes down. Their fake implementations give exactly the
real outputs' shapes, dtypes and strides (all contiguous), so a compiled graph plans the right
buffers (`torch.library.opcheck` holds both ops to it, tests/test_fused_compile.py).

Dropout's seed is an int64 [1] tensor on q's device that the kernels read from device memory, drawn
by `torch.randint` from the default generator of q's device when the caller gives none: no host
read (a compiled graph keeps the draw inside, no graph break), reproducible under torch.manual_seed,
and covered by the generator states a checkpoint saves (`parallel.random.get_rng_states`).
"""

from __future__ import annotations

import torch

from deberta_ds.errors import UserError
from deberta_ds.kernels.reference import check_inputs, default_scale
from deberta_ds.kernels.settings import FUSED_DTYPES, AttentionSettings
from deberta_ds.kernels.triton_attention import fused_backward, fused_forward

SEED_RANGE = 2 ** 32  # drawn seeds: the Philox key (b*h is a counter word, so heads stay apart at any seed)


def _settings(position_buckets, max_relative_positions, scale, dropout_p) -> AttentionSettings:
    return AttentionSettings(position_buckets, max_relative_positions, scale, dropout_p, "fused")


def _seed_or_zero(seed: torch.Tensor | None, device) -> torch.Tensor:
    """The kernels always take a seed tensor; without dropout they never read it."""
    return seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=device)


@torch.library.custom_op("deberta_ds::disentangled_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_key: torch.Tensor | None,
                pos_query: torch.Tensor | None, attention_mask: torch.Tensor | None,
                document_ids: torch.Tensor | None, seed: torch.Tensor | None, position_buckets: int,
                max_relative_positions: int, scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_forward(q, k, v, pos_key, pos_query, attention_mask, document_ids,
                         _settings(position_buckets, max_relative_positions, scale, dropout_p),
                         _seed_or_zero(seed, q.device))


@_forward_op.register_fake
def _(q, k, v, pos_key, pos_query, attention_mask, document_ids, seed, position_buckets, max_relative_positions,
      scale, dropout_p):
    batch, heads, seq_len, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(batch * heads, seq_len, dtype=torch.float32)   # contiguous


@torch.library.custom_op("deberta_ds::disentangled_attention_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 pos_key: torch.Tensor | None, pos_query: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 document_ids: torch.Tensor | None, seed: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                 position_buckets: int, max_relative_positions: int, scale: float,
                 dropout_p: float) -> list[torch.Tensor]:
    grads = fused_backward(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, out, lse,
                           _settings(position_buckets, max_relative_positions, scale, dropout_p),
                           _seed_or_zero(seed, q.device))
    return [g if g is not None else q.new_empty(0) for g in grads]


@_backward_op.register_fake
def _(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, seed, out, lse, position_buckets,
      max_relative_positions, scale, dropout_p):
    tables = [t.new_empty(t.shape) if t is not None else q.new_empty(0) for t in (pos_key, pos_query)]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *tables]      # contiguous


def _setup_context(ctx, inputs, output):
    q, k, v, pos_key, pos_query, attention_mask, document_ids, seed, *config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos_key, pos_query, attention_mask, document_ids, seed, out, lse)
    ctx.config = config


def _backward(ctx, grad_out, grad_lse):
    q, k, v, pos_key, pos_query, attention_mask, document_ids, seed, out, lse = ctx.saved_tensors
    dq, dk, dv, dkr, dqr = _backward_op(grad_out, q, k, v, pos_key, pos_query, attention_mask, document_ids, seed,
                                        out, lse, *ctx.config)
    return (dq, dk, dv, dkr if pos_key is not None else None, dqr if pos_query is not None else None,
            None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def dropout_seed(seed: int | torch.Tensor | None, device) -> torch.Tensor:
    """The kernels' seed, int64 [1] on `device`: drawn from the device's default generator (None), or
    the caller's (an int, or such a tensor)."""
    if seed is None:
        return torch.randint(0, SEED_RANGE, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (1,) or seed.device != torch.device(device):
            raise UserError(f"fused attention: seed: must be an int64 tensor of shape [1] on {device}, got "
                            f"{seed.dtype} {list(seed.shape)} on {seed.device}")
        return seed
    return torch.tensor([int(seed) % SEED_RANGE], dtype=torch.int64, device=device)


def disentangled_attention_fused(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets,
                                 max_relative_positions, scale=None, dropout_p=0.0, seed=None, document_ids=None):
    """Same contract as `disentangled_attention_reference` (fp32, fp16 and bf16 inputs; fp64 runs on the
    reference). seed: None (drawn on q's device from torch's RNG), an int, or an int64 [1] tensor on q's
    device; the kernel's dropout masks are its own, not the reference's."""
    check_inputs(q, k, v, pos_key, pos_query, attention_mask, document_ids, position_buckets=position_buckets,
                 max_relative_positions=max_relative_positions, dropout_p=dropout_p)
    if q.dtype not in FUSED_DTYPES:
        raise UserError(f"fused attention: q, k, v: {q.dtype} is not supported (float32, float16, bfloat16); "
                        "use attention_impl='reference'")
    if scale is None:
        scale = default_scale(q.shape[-1], pos_key, pos_query)
    keep = attention_mask != 0 if attention_mask is not None else None   # nonzero keeps, as in the reference
    seed = dropout_seed(seed, q.device) if dropout_p > 0.0 else None
    out, _ = _forward_op(q, k, v, pos_key, pos_query, keep, document_ids, seed, position_buckets,
                         max_relative_positions, float(scale), float(dropout_p))
    return out
