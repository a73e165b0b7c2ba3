"""Pure-PyTorch disentangled attention: the semantics every fused kernel must reproduce.

score[i, j] = (q_i.k_j + q_i.Kr[s(i, j)] + k_j.Qr[s(i, j)]) * scale, s = relative slot.
Scores, softmax and the row max live in fp32 (fp64 stays fp64) whatever the input dtype,
so fp16/bf16 never overflow; only the probabilities are cast back for the PV product.
"""

from __future__ import annotations

import torch

from deberta_ds.config import scale_for
from deberta_ds.errors import UserError
from deberta_ds.kernels.settings import quantised_dropout_rate
from deberta_ds.relative_position import reachable_slots, relative_slots, slots_of_positions


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q, k, v, pos_key, pos_query, attention_mask, document_ids, *, position_buckets,
                 max_relative_positions, dropout_p) -> None:
    """The contract of both implementations (reference and fused), checked on metadata only (no
    device read): a UserError naming the argument for anything outside it.

    q, k, v: [B, h, L, d] of one floating dtype; pos_key, pos_query: [h, 2 x position_buckets, d] or
    None; position_buckets >= 2 (log buckets need a half of at least 1) and <= max_relative_positions
    (ModelConfig's rule); attention_mask: [B, L] bool or integer, nonzero keeps a key (and its query
    row); a floating mask is refused (a soft mask such as 0.5 has no meaning here, and 1.0 / 0.0
    masks are one `.bool()` away); document_ids: [B, L] integer; dropout_p in [0, 1)."""
    def refuse(name: str, message: str):
        raise UserError(f"disentangled attention: {name}: {message}")

    if not (isinstance(position_buckets, int) and 2 <= position_buckets <= max_relative_positions):
        refuse("position_buckets", f"must be an integer in [2, max_relative_positions={max_relative_positions}], "
               f"got {position_buckets!r}")
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        refuse("q, k, v", f"must be [B, h, L, d] of one shape, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        refuse("q, k, v", f"must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, seq_len, head_dim = q.shape
    for name, table in (("pos_key", pos_key), ("pos_query", pos_query)):
        if table is not None and table.shape != (heads, 2 * position_buckets, head_dim):
            refuse(name, f"must be [h, 2 x position_buckets, d] = {[heads, 2 * position_buckets, head_dim]}, got "
                   f"{list(table.shape)}")
    for name, ids in (("attention_mask", attention_mask), ("document_ids", document_ids)):
        if ids is not None and ids.shape != (batch, seq_len):
            refuse(name, f"must be [B, L] = {[batch, seq_len]}, got {list(ids.shape)}")
        if ids is not None and (ids.is_floating_point() or ids.is_complex()):
            refuse(name, f"a {ids.dtype} tensor is not supported: pass a bool or integer one" + (
                " (nonzero keeps a position), e.g. mask.bool() for a 0/1 float mask" if name == "attention_mask"
                else ""))
    if not 0.0 <= dropout_p < 1.0:
        refuse("dropout_p", f"must be in [0, 1), got {dropout_p}")


def default_scale(head_dim: int, pos_key, pos_query) -> float:
    return scale_for(head_dim, (pos_key is not None) + (pos_query is not None))


def attention_scores(q, k, pos_key, pos_query, *, position_buckets, max_relative_positions, scale):
    """c2c + c2p + p2c, scaled, in the score dtype: [B, h, L, L]."""
    seq_len = q.shape[-2]
    dtype = _score_dtype(q.dtype)
    q_scaled = q.to(dtype) * scale                                    # [B, h, L, d]
    k_scaled = k.to(dtype) * scale
    scores = q_scaled @ k.to(dtype).transpose(-1, -2)                # [B, h, L, L]
    if pos_key is None and pos_query is None:
        return scores
    if torch.onnx.is_in_onnx_export():  # the exported graph takes any length: slots from positions computed
        # in the graph (not a table cached for the example's length), and every table row projected
        column = q[0, 0, :, 0]  # tracing records factories (arange, ones_like) at the example's length,
        positions = ((column == column) | (column != column)).long().cumsum(0) - 1  # so derive [L] from data
        slots = slots_of_positions(positions, positions, position_buckets, max_relative_positions)
        first, last = 0, (pos_key if pos_key is not None else pos_query).shape[1] - 1
    else:  # only slots [first, last] are reachable at this length: project against those rows only
        slots = relative_slots(seq_len, seq_len, position_buckets, max_relative_positions, q.device)
        first, last = reachable_slots(seq_len, position_buckets, max_relative_positions)
    slots = (slots - first).expand_as(scores)                         # [B, h, L, L]
    # In-place adds: the matmul's backward needs its inputs, not `scores`, so no [B, h, L, L]
    # temporary survives per term.
    if pos_key is not None:
        c2p = q_scaled @ pos_key[:, first:last + 1].to(dtype).transpose(-1, -2)   # [B, h, L, R]
        scores.add_(c2p.gather(-1, slots))
    if pos_query is not None:
        p2c = k_scaled @ pos_query[:, first:last + 1].to(dtype).transpose(-1, -2)  # [B, h, L(key), R]
        # p2c[i, j] = K_j . Qr[s(i, j)]: gather along slots for key row j, then transpose.
        scores.add_(p2c.gather(-1, slots.transpose(-1, -2)).transpose(-1, -2))
    return scores


def disentangled_attention_reference(q, k, v, pos_key, pos_query, attention_mask, *, position_buckets,
                                     max_relative_positions, scale=None, dropout_p=0.0, seed=None,
                                     document_ids=None):
    """q, k, v [B, h, L, d]; pos_key, pos_query [h, 2k, d] or None; attention_mask [B, L] or None;
    document_ids [B, L] or None (int: positions attend only to positions of an equal id, so the
    documents packed into one sample do not see each other).

    Returns [B, h, L, d] in v's dtype; padded query rows are exactly 0. Inputs: `check_inputs`.
    """
    check_inputs(q, k, v, pos_key, pos_query, attention_mask, document_ids, position_buckets=position_buckets,
                 max_relative_positions=max_relative_positions, dropout_p=dropout_p)
    if scale is None:
        scale = default_scale(q.shape[-1], pos_key, pos_query)
    scores = attention_scores(q, k, pos_key, pos_query, position_buckets=position_buckets,
                              max_relative_positions=max_relative_positions, scale=scale)
    if attention_mask is not None:
        keep = attention_mask.bool()                                  # [B, L]
        scores.masked_fill_(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
    if document_ids is not None:
        same_document = document_ids[:, :, None] == document_ids[:, None, :]       # [B, L(query), L(key)]
        scores.masked_fill_(~same_document[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    dropout_p = quantised_dropout_rate(dropout_p)   # the fused kernel's rate, in whole 1/256
    if dropout_p > 0.0 and seed is None:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    elif dropout_p > 0.0:
        probs = probs * dropout_mask(probs.shape, dropout_p, seed, probs.device, probs.dtype)
    out = probs.to(v.dtype) @ v
    if attention_mask is not None:
        out = out * keep[:, None, :, None].to(out.dtype)              # padded query rows -> 0
    return out


def dropout_mask(shape, dropout_p: float, seed: int, device, dtype) -> torch.Tensor:
    """Inverted-dropout multipliers (0 or 1/(1-p)) drawn from a generator seeded with `seed`."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    keep = torch.rand(shape, generator=generator, device=device) >= dropout_p
    return keep.to(dtype) / (1.0 - dropout_p)
