"""Attention kernels and the single dispatch point the model calls.

``disentangled_attention`` runs one encoder's attention with its frozen ``AttentionSettings``
(buckets, max relative positions, scale, dropout rate and the implementation), built once per
encoder by ``attention_settings``; the pure-PyTorch reference defines the semantics.
``attention_impl``: ``reference`` always uses it, ``fused`` requires the fused Triton kernel,
``auto`` chooses once, when the settings are built, by ``choose_implementation``:

- without CUDA: the reference;
- on CUDA: the implementation measured faster (``MEASURED``) if it fits, else the other. "Fits":
  the reference keeps [B, h, L, L] scores, about ``REFERENCE_BYTES_PER_SCORE`` bytes per score
  element and layer in a forward+backward; it fits when one sample at the encoder's longest
  length (``max_position_embeddings``), over all its layers, needs at most the memory budget
  (by default a quarter of the GPU's memory). The fused kernel's workspace is O(L x C) per head
  (C = 1,019 band columns at 256 buckets: 1.9 GB in the backward at L = 16,384, B x h = 12, bf16)
  and is taken to fit.

The measurement (H200, bf16, h = 12, d = 64, 256 buckets, 16,384 tokens per call,
forward+backward; benchmarks/RESULTS.md, first GPU run) was of the fused kernel before the
distance-space rebuild: reference 9.38 / 30.76 / 121.70 ms against fused 14.64 / 44.35 / 146.05 ms
at L = 512 / 2,048 / 8,192, peak memory 2,547 / 7,112 / 26,006 MB against 413 / 389 / 383 MB
(6-68x). So ``auto`` takes the reference where it fits (L = 512 at base: 0.6 GB per sample)
and the kernel past that (L = 8,192: 155 GB per sample). The next GPU run's attention_bench
figures for the rebuilt kernel replace ``MEASURED``.

With ``auto`` on the fused kernel, a kernel variant (dtype, head dim, positional terms, mask,
dropout, document ids) that fails to compile for this GPU and Triton warns once and uses the
reference for that variant from then on (``fused`` raises instead); float64 inputs, which the
kernel does not take, run on the reference.
"""

from __future__ import annotations

import math
import warnings

import torch

from deberta_ds.errors import UserError
from deberta_ds.kernels.reference import disentangled_attention_reference
from deberta_ds.kernels.settings import FUSED_DTYPES, AttentionSettings

# Forward+backward ms on an H200 (see the docstring): {L: {implementation: ms}}.
MEASURED = {512: {"reference": 9.38, "fused": 14.64}, 2048: {"reference": 30.76, "fused": 44.35},
            8192: {"reference": 121.70, "fused": 146.05}}
# The reference's peak over its score elements at L = 8,192 (26,006 MB / (2 x 12 x 8,192^2)).
REFERENCE_BYTES_PER_SCORE = 16

_variants_that_do_not_compile: set[tuple] = set()  # what the auto path gave up on in this process
_implementations: dict = {}                          # implementation name -> attention function


def reference_bytes(seq_len: int, heads: int, layers: int) -> int:
    """The reference's score memory for one sample: h x L^2 score elements per layer."""
    return REFERENCE_BYTES_PER_SCORE * heads * seq_len ** 2 * layers


def choose_implementation(requested: str, *, cuda: bool, seq_len: int, heads: int, layers: int,
                          memory_budget: int | None) -> str:
    """The implementation `attention_impl` asks for: 'reference', 'fused' or 'fused_or_reference'
    (auto's kernel, falling back per variant). memory_budget: bytes the reference may use (auto on
    CUDA; None: a quarter of the current GPU's memory)."""
    if requested in ("reference", "fused"):
        return requested
    if requested != "auto":
        raise UserError(f"attention_impl: {requested!r} is not one of reference, fused, auto")
    if not cuda:
        return "reference"
    nearest = min(MEASURED, key=lambda length: abs(math.log(length / seq_len)))
    faster = min(MEASURED[nearest], key=MEASURED[nearest].get)
    if memory_budget is None:
        memory_budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory // 4
    if faster == "reference" and reference_bytes(seq_len, heads, layers) <= memory_budget:
        return "reference"
    return "fused_or_reference"


def attention_settings(config, heads: int, *, cuda: bool | None = None,
                       memory_budget: int | None = None) -> AttentionSettings:
    """One encoder's settings from its ModelConfig (`heads`: this rank's heads), the implementation
    chosen here once. cuda: whether the model runs on CUDA (default: whether CUDA is available)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    impl = choose_implementation(config.attention_impl, cuda=cuda, seq_len=config.max_position_embeddings,
                                 heads=heads, layers=config.num_layers, memory_budget=memory_budget)
    return AttentionSettings(config.position_buckets, config.max_relative_positions, config.attention_scale,
                             config.attention_dropout, impl)


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
        if q.is_cuda and q.dtype in FUSED_DTYPES and variant not in _variants_that_do_not_compile:
            try:
                return fused(q, k, v, pos_key, pos_query, attention_mask, **kwargs)
            except TritonError as error:
                _variants_that_do_not_compile.add(variant)
                warnings.warn(f"attention_impl='auto': the fused attention kernel does not compile here for "
                              f"(dtype, head dim, c2p, p2c, mask, dropout, documents) = {variant} ({error}); using the "
                              "reference attention for it from now on", stacklevel=2)
        return disentangled_attention_reference(q, k, v, pos_key, pos_query, attention_mask, **kwargs)
    return attention


def implementation(impl: str):
    """The attention function of a chosen implementation (AttentionSettings.impl), built once per
    process. A plain dict, not functools.cache: torch.compile traces this call, and dynamo warns on
    every cache-wrapped function it traces through."""
    if impl not in _implementations:
        _implementations[impl] = _build_implementation(impl)
    return _implementations[impl]


def _build_implementation(impl: str):
    if impl == "reference":
        return disentangled_attention_reference
    fused, error = _fused()
    if impl == "fused":
        if fused is None:
            raise UserError(f"attention_impl='fused': the Triton kernel cannot be imported ({error}); install "
                            "triton or use attention_impl='reference'")
        return fused
    return _falling_back_to_reference(fused) if fused else disentangled_attention_reference


def disentangled_attention(q, k, v, pos_key, pos_query, attention_mask, settings: AttentionSettings, *,
                           training: bool = False, document_ids=None):
    """q, k, v [B, h, L, d]; pos_key, pos_query [h, 2k, d] or None; attention_mask, document_ids
    [B, L] or None. Dropout only when training. An ONNX export always traces the reference."""
    attention = implementation("reference" if torch.onnx.is_in_onnx_export() else settings.impl)
    return attention(q, k, v, pos_key, pos_query, attention_mask, position_buckets=settings.position_buckets,
                     max_relative_positions=settings.max_relative_positions, scale=settings.scale,
                     dropout_p=settings.dropout_p if training else 0.0, document_ids=document_ids)
