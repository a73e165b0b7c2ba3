"""Attention kernels and the single dispatch point the model calls.

``disentangled_attention`` has one signature for every implementation; the pure-PyTorch
reference defines the semantics. ``attention_impl``: ``reference`` always uses it,
``fused`` requires the fused Triton kernel, ``auto`` uses the fused kernel on CUDA when it
is available and the reference elsewhere; if a kernel variant (dtype, head dim, positional
terms, mask, dropout, document ids) fails to compile for this GPU and Triton, ``auto`` warns once and uses the
reference for that variant from then on, the kernel for every other (``fused`` raises instead).
"""

from __future__ import annotations

import warnings

import torch

from deberta_ds.errors import UserError
from deberta_ds.kernels.reference import disentangled_attention_reference

_variants_that_do_not_compile: set[tuple] = set()  # what the auto path gave up on in this process


def _fused():
    """The Triton kernel, imported on first use (Triton is optional on CPU machines)."""
    try:
        from deberta_ds.kernels.fused import disentangled_attention_fused
    except ImportError as error:
        return None, error
    return disentangled_attention_fused, None


def _variant(q, pos_key, pos_query, attention_mask, dropout_p, document_ids) -> tuple:
    """What selects a compiled kernel: (dtype, head dim, c2p, p2c, mask, dropout, documents)."""
    return (str(q.dtype).removeprefix("torch."), q.shape[-1], pos_key is not None, pos_query is not None,
            attention_mask is not None, dropout_p > 0.0, document_ids is not None)


def _falling_back_to_reference(fused):
    def attention(q, k, v, pos_key, pos_query, attention_mask, **kwargs):
        from triton import TritonError  # compilation, PTX assembly and shared-memory/register limits

        variant = _variant(q, pos_key, pos_query, attention_mask, kwargs.get("dropout_p", 0.0),
                           kwargs.get("document_ids"))
        if variant not in _variants_that_do_not_compile:
            try:
                return fused(q, k, v, pos_key, pos_query, attention_mask, **kwargs)
            except TritonError as error:
                _variants_that_do_not_compile.add(variant)
                warnings.warn(f"attention_impl='auto': the fused attention kernel does not compile here for "
                              f"(dtype, head dim, c2p, p2c, mask, dropout, documents) = {variant} ({error}); using the "
                              "reference attention for it from now on", stacklevel=2)
        return disentangled_attention_reference(q, k, v, pos_key, pos_query, attention_mask, **kwargs)
    return attention


def select_attention(impl: str, device: torch.device):
    if impl == "reference":
        return disentangled_attention_reference
    if impl == "fused":
        fused, error = _fused()
        if fused is None:
            raise UserError(f"attention_impl='fused': the Triton kernel cannot be imported ({error}); install "
                             "triton or use attention_impl='reference'")
        return fused
    if impl == "auto":
        fused = _fused()[0] if device.type == "cuda" else None
        return _falling_back_to_reference(fused) if fused else disentangled_attention_reference
    raise UserError(f"attention_impl: {impl!r} is not one of reference, fused, auto")


def disentangled_attention(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets,
                           max_relative_positions, scale=None, dropout_p=0.0, seed=None, document_ids=None,
                           impl="auto"):
    attention = select_attention(impl, q.device)
    return attention(q, k, v, pos_key, pos_query, attention_mask, position_buckets=position_buckets,
                     max_relative_positions=max_relative_positions, scale=scale, dropout_p=dropout_p,
                     seed=seed, document_ids=document_ids)
