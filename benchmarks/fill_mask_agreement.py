"""How the exported generator's predictions differ from the in-training generator's.

Hugging Face has no enhanced mask decoder (EMD): the export runs the generator as a plain encoder
and predicts from its last layer, while in training the EMD runs that last layer twice more with
absolute positions added. On held-out masked text (the run's validation shards, masked as in
training) this reports the top-1 agreement of the two and each one's accuracy against the
original tokens.

    python benchmarks/fill_mask_agreement.py --run runs/quickstart/run [--batches 20]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deberta_ds.checkpoint_reader import complete_step_folder, load_training_checkpoint, read_state  # noqa: E402
from deberta_ds.convert import to_hf  # noqa: E402
from deberta_ds.data.tokenizer import load_tokenizer  # noqa: E402
from deberta_ds.training.checkpoint import run_config_of  # noqa: E402
from deberta_ds.training.data_setup import build_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run's output_dir (its validation shards are used)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from transformers import DebertaV2ForMaskedLM

    state = read_state(complete_step_folder(args.run))
    config = run_config_of(state)
    pair = load_training_checkpoint(args.run).eval()
    _, valid = build_data(config, pair.config.discriminator, *load_tokenizer(config.data.tokenizer))
    with tempfile.TemporaryDirectory() as folder:
        to_hf(pair, folder, part="generator")
        exported = DebertaV2ForMaskedLM.from_pretrained(folder).eval()
    agree = ours_right = theirs_right = total = 0
    with torch.no_grad():
        for b in range(args.batches):
            batch = {k: torch.from_numpy(v) for k, v in
                     valid.batch(np.arange(b * args.batch_size, (b + 1) * args.batch_size)).items()}
            masked = batch["labels"] != -100
            ours = pair.generator(batch["input_ids"], batch["attention_mask"], batch["labels"]).logits.argmax(-1)
            theirs = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[masked]
            theirs = theirs[:, :pair.config.generator.vocab_size].argmax(-1)
            targets = batch["labels"][masked]
            agree += int((ours == theirs).sum())
            ours_right += int((ours == targets).sum())
            theirs_right += int((theirs == targets).sum())
            total += int(masked.sum())
    print(f"{datetime.date.today()}, {args.run}, step {state['step']}: {total} masked positions of held-out text")
    print(f"top-1 agreement, exported (no EMD) vs in-training (EMD) generator: {agree / total:.4f}")
    print(f"top-1 accuracy: in-training {ours_right / total:.4f}, exported {theirs_right / total:.4f}")


if __name__ == "__main__":
    main()
