"""What pre-training buys downstream: fine-tune a pre-trained discriminator export and a randomly
initialised model of the same shape (same tokenizer, same recipe, same seed) on a GLUE-style task
and report both test scores and times.

    python benchmarks/finetune_gain.py --model runs/quickstart/hf_discriminator \
        --data ../shared/corpora/sst2 --epochs 1 --out runs/finetune_gain
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deberta_ds.finetune import main as finetune  # noqa: E402


def random_twin(model_dir: Path, out: Path) -> Path:
    """The same config and tokenizer with freshly initialised weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pre-trained HF export (with its tokenizer)")
    parser.add_argument("--data", required=True, help="folder with train.tsv, dev.tsv, test.tsv")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    rows = {}
    twin = random_twin(Path(args.model), out / "random")
    for name, model in (("pre-trained", Path(args.model)), ("random init", twin)):
        start = time.perf_counter()
        code = finetune(["--model", str(model), "--train", str(data / "train.tsv"), "--valid", str(data / "dev.tsv"),
                         "--test", str(data / "test.tsv"), "--out", str(out / name.replace(" ", "_")),
                         "--epochs", str(args.epochs), "--lr", str(args.lr), "--no-progress"])
        assert code == 0, name
        metrics = json.loads((out / name.replace(" ", "_") / "metrics.json").read_text())
        rows[name] = {"test": metrics["test"], "best_valid": metrics["best"], "seconds": time.perf_counter() - start}
    print(f"{datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.epochs} epoch(s), lr {args.lr}, data {data}")
    print("| model | test accuracy | test F1 | valid accuracy (best epoch) | time |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['test']['accuracy']:.4f} | {row['test']['f1']:.4f} | "
              f"{row['best_valid']['accuracy']:.4f} | {row['seconds']:.0f} s |")
    (out / "finetune_gain.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
