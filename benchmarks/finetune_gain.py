"""What pre-training buys downstream: fine-tune a pre-trained discriminator export and a randomly
initialised model of the same shape (same tokenizer, same recipe) on a GLUE-style task, once per
seed (the seed sets the random twin's weights, the classifier head and the data order), and report
the mean and spread of both scores and the times.

    python benchmarks/finetune_gain.py --model runs/quickstart/hf_discriminator \
        --data ../shared/corpora/sst2 --epochs 1 --seeds 1 2 3 --out runs/finetune_gain

The default learning rate, 1e-3, is the better of {1e-4, 1e-3} on validation for both models at
the quickstart's shape (hidden 64): at 1e-4 one epoch leaves both near the majority class.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deberta_ds.finetune import main as finetune  # noqa: E402


def random_twin(model_dir: Path, out: Path, seed: int) -> Path:
    """The same config and tokenizer with freshly initialised weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pre-trained HF export (with its tokenizer)")
    parser.add_argument("--data", required=True, help="folder with train.tsv, dev.tsv, test.tsv")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    runs = {"pre-trained": [], "random init": []}
    for seed in args.seeds:
        twin = random_twin(Path(args.model), out / f"random_seed{seed}", seed)
        for name, model in (("pre-trained", Path(args.model)), ("random init", twin)):
            run_dir = out / f"{name.replace(' ', '_')}_seed{seed}"
            start = time.perf_counter()
            code = finetune(["--model", str(model), "--train", str(data / "train.tsv"),
                             "--valid", str(data / "dev.tsv"), "--test", str(data / "test.tsv"), "--out", str(run_dir),
                             "--epochs", str(args.epochs), "--lr", str(args.lr), "--seed", str(seed), "--no-progress"])
            assert code == 0, name
            metrics = json.loads((run_dir / "metrics.json").read_text())
            runs[name].append({"seed": seed, "test": metrics["test"], "best_valid": metrics["best"],
                               "seconds": time.perf_counter() - start})
    print(f"{datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.epochs} epoch(s), lr {args.lr}, seeds {args.seeds}, data {data}")
    print("| model | test accuracy | test F1 | valid accuracy (best epoch) | time per run |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        print(f"| {name} | {spread([r['test']['accuracy'] for r in rows])} | {spread([r['test']['f1'] for r in rows])} "
              f"| {spread([r['best_valid']['accuracy'] for r in rows])} "
              f"| {statistics.mean(r['seconds'] for r in rows):.0f} s |")
    gains = [p["test"]["accuracy"] - r["test"]["accuracy"] for p, r in zip(runs["pre-trained"], runs["random init"])]
    print(f"gain of pre-training on test accuracy, per seed: {', '.join(f'{g:+.4f}' for g in gains)}")
    (out / "finetune_gain.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
