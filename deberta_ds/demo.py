"""Model smoke demo: a few optimiser steps of the tiny RTD pair on random tokens, then an
export of the discriminator that `transformers` loads and reproduces.

    python -m deberta_ds.demo [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from deberta_ds.config import RTDConfig, preset
from deberta_ds.convert import to_hf
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.model.rtd import IGNORE_INDEX


def random_masked_batch(vocab: int, mask_id: int, batch: int, length: int, gen: torch.Generator):
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    masked = torch.rand(batch, length, generator=gen) < 0.15
    labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
    return ids.masked_fill(masked, mask_id), torch.ones_like(ids), labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for the exported HF discriminator (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps (default 20)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = RTDConfig(discriminator=preset("tiny"), mask_token_id=5)
    model = ReplacedTokenDetection(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = random_masked_batch(config.discriminator.vocab_size, config.mask_token_id, 8, 64, gen)
    for step in range(args.steps):
        out = model(*batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        print(f"step {step:3d}  mlm {out.generator.loss.item():.3f}  rtd {out.discriminator.loss.item():.3f}  "
              f"replaced {out.replaced_ratio.item():.2f}")
    out_dir = args.out or tempfile.mkdtemp(prefix="deberta_ds_demo_")
    to_hf(model, out_dir, part="discriminator")
    from transformers import DebertaV2Model  # only the demo's check needs transformers
    hf = DebertaV2Model.from_pretrained(out_dir).eval()
    model.eval()
    ids, mask, _ = batch
    with torch.no_grad():
        ours = model.discriminator.encoder(ids, mask, word_embedding_weight=model.discriminator_embedding_weight())
        diff = (hf(input_ids=ids, attention_mask=mask).last_hidden_state - ours).abs().max().item()
    print(f"exported discriminator to {out_dir}; transformers reproduces it (max |diff| = {diff:.2e})")


if __name__ == "__main__":
    main()
