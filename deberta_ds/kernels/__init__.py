"""Attention kernels and the single dispatch point the model calls.

``disentangled_attention`` has one signature for every implementation; the pure-PyTorch
reference defines the semantics. ``attention_impl``: ``reference`` always uses it,
``fused`` requires the fused Triton kernel, ``auto`` uses the fused kernel on CUDA when it
is available and the reference elsewhere; if the kernel fails to compile for this GPU and Triton,
``auto`` warns once and uses the reference from then on (``fused`` raises instead).
"""

from __future__ import annotations

import warnings

import torch

from deberta_ds.kernels.reference import disentangled_attention_reference

_fused_does_not_compile = False  # set once the auto path gave up on the kernel in this process


def _fused():
    """The Triton kernel, imported on first use (Triton is optional on CPU machines)."""
    try:
        from deberta_ds.kernels.fused import disentangled_attention_fused
    except ImportError as error:
        return None, error
    return disentangled_attention_fused, None


def _falling_back_to_reference(fused):
    def attention(*args, **kwargs):
        from triton import TritonError  # compilation, PTX assembly and shared-memory/register limits

        try:
            return fused(*args, **kwargs)
        except TritonError as error:
            global _fused_does_not_compile
            _fused_does_not_compile = True
            warnings.warn(f"attention_impl='auto': the fused attention kernel does not compile here ({error}); "
                          "using the reference attention from now on", stacklevel=2)
            return disentangled_attention_reference(*args, **kwargs)
    return attention


def select_attention(impl: str, device: torch.device):
    if impl == "reference":
        return disentangled_attention_reference
    if impl == "fused":
        fused, error = _fused()
        if fused is None:
            raise ValueError(f"attention_impl='fused': the Triton kernel cannot be imported ({error}); install "
                             "triton or use attention_impl='reference'")
        return fused
    if impl == "auto":
        fused = _fused()[0] if device.type == "cuda" and not _fused_does_not_compile else None
        return _falling_back_to_reference(fused) if fused else disentangled_attention_reference
    raise ValueError(f"attention_impl: {impl!r} is not one of reference, fused, auto")


def disentangled_attention(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets,
                           max_relative_positions, scale=None, dropout_p=0.0, seed=None, impl="auto"):
    attention = select_attention(impl, q.device)
    return attention(q, k, v, pos_key, pos_query, attention_mask, position_buckets=position_buckets,
                     max_relative_positions=max_relative_positions, scale=scale, dropout_p=dropout_p,
                     seed=seed)
