"""Context extension: continue a checkpoint trained at 512 tokens at 2048 or 8192.

Only the generator's enhanced mask decoder holds an absolute position table
(`generator.emd.position_embeddings.weight`, [max_position_embeddings, H]). Everything else is
length-free: the relative table has 2k rows at any length, and its log buckets already send
every distance past max_relative_positions to the farthest bucket. So extending a checkpoint
grows that one table: rows [0, old) are the checkpoint's, and row p >= old starts as a copy of
row p mod old, the initialisation Longformer (Beltagy et al. 2020, section 5) found to keep a
pre-trained model's quality where random new rows lost it (the copies keep the learned local
structure between neighbouring positions).
"""

from __future__ import annotations

import torch

from deberta_ds.errors import UserError

EMD_POSITIONS = "generator.emd.position_embeddings.weight"


def extend_absolute_positions(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A full (TP = 1) RTD state dict whose EMD table has `rows` rows (more than it has)."""
    table = state[EMD_POSITIONS]                                              # [old, H]
    if rows < table.shape[0]:
        raise UserError(f"model_overrides.max_position_embeddings: {rows} is shorter than the init_from checkpoint's "
                        f"{table.shape[0]} positions; a context can only be extended")
    copies = torch.arange(rows) % table.shape[0]
    return state | {EMD_POSITIONS: table[copies].clone()}                     # [rows, H]
