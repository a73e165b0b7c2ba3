"""What pre-training buys downstream: fine-tune a pre-trained discriminator export and a randomly
initialised model of the same shape (same tokenizer, same recipe) on a GLUE-style task, once per
seed (the seed sets the random twin's weights, the classifier head and the data order), and report
the mean and spread of both scores and the times.

    python benchmarks/finetune_gain.py --model runs/quickstart/hf_discriminator \
        --data ../shared/corpora/sst2 --epochs 1 --seeds 1 2 3 --out runs/finetune_gain

--data names a folder in GLUE's layout (train.tsv, dev.tsv, test.tsv); --train, --valid and
--test name the files one by one instead, and any other option goes to `deberta_ds.finetune` as
it is. AG News (no header line, no training split: its dev.tsv trains, 10% of it held out):

    python benchmarks/finetune_gain.py --model runs/quickstart/hf_discriminator \
        --train ../shared/corpora/agnews/dev.tsv --test ../shared/corpora/agnews/test.tsv \
        --valid-fraction 0.1 --columns text,label --text-column text --out runs/finetune_gain_agnews

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


def data_files(args) -> list[str]:
    """deberta_ds.finetune's --train / --valid / --test flags: --data's GLUE layout, each file
    replaceable by its own flag (without --valid, a --valid-fraction passed on holds one out)."""
    folder, flags = Path(args.data) if args.data else None, []
    for flag, name in (("train", "train.tsv"), ("valid", "dev.tsv"), ("test", "test.tsv")):
        path = getattr(args, flag) or (folder / name if folder else None)
        flags += [f"--{flag}", str(path)] if path else []
    return flags


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pre-trained HF export (with its tokenizer)")
    parser.add_argument("--data", help="folder with train.tsv, dev.tsv, test.tsv")
    for flag in ("train", "valid", "test"):
        parser.add_argument(f"--{flag}", help=f"the {flag} file (instead of --data's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args, passed_on = parser.parse_known_args()
    out, files = Path(args.out), data_files(args)
    if "--train" not in files or "--test" not in files:
        parser.error("name the data: --data FOLDER, or --train and --test files")
    runs = {"pre-trained": [], "random init": []}
    for seed in args.seeds:
        twin = random_twin(Path(args.model), out / f"random_seed{seed}", seed)
        for name, model in (("pre-trained", Path(args.model)), ("random init", twin)):
            run_dir = out / f"{name.replace(' ', '_')}_seed{seed}"
            start = time.perf_counter()
            code = finetune(["--model", str(model), *files, "--out", str(run_dir), "--epochs", str(args.epochs),
                             "--lr", str(args.lr), "--seed", str(seed), "--no-progress", *passed_on])
            assert code == 0, name
            metrics = json.loads((run_dir / "metrics.json").read_text())
            runs[name].append({"seed": seed, "test": metrics["test"], "best_valid": metrics["best"],
                               "seconds": time.perf_counter() - start})
    print(f"{datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.epochs} epoch(s), lr {args.lr}, seeds {args.seeds}, {' '.join(files + passed_on)}")
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
