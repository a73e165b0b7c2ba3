"""Fine-tune a Hugging Face DebertaV2 checkpoint on a classification or regression task.

    python -m deberta_ds.finetune --model runs/quickstart/hf_discriminator \
        --train sst2/train.tsv --valid sst2/dev.tsv --test sst2/test.tsv --out runs/sst2

Any DebertaV2 checkpoint directory works (one exported by `convert to-hf`, or a published one
on disk) if it holds its tokenizer (or --tokenizer names one). Data: GLUE-style TSV, CSV or
JSON-lines files; one text column (--text-column) or a sentence pair
(--pair-column), and a label column. Classes come from --labels or the training file; a
label outside them is an error naming the file and line. The recipe is the standard one:
AdamW, linear warm-up then linear decay, --epochs over shuffled batches, bf16 autocast on GPUs.
After each epoch the validation set is scored (accuracy, F1, MCC; Pearson and Spearman for
regression); the best epoch's model and tokenizer are saved in HF format to OUT/best, every
epoch's metrics (and the test set's, scored with the best model) to OUT/metrics.json, and the
loss, learning rate and scores to TensorBoard (OUT/tensorboard). A file without a header line
(AG News) takes --columns; a task without a validation file, --valid-fraction.
transformers' own model classes are used; nothing of the model is reimplemented here. The
reading, the training loop and the metrics are deberta_ds.downstream's (`python -m
deberta_ds.evaluate` runs whole benchmark suites); under torchrun it trains data-parallel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deberta_ds.atomic_files import write_atomic
from deberta_ds.downstream.loop import Placement, Recipe, fit, predict
from deberta_ds.downstream.models import ModelSource, check_hf_folder
from deberta_ds.downstream.readers import DataError, Examples, read_examples
from deberta_ds.downstream.runner import save_hf_folder
from deberta_ds.downstream.tasks import sequence_features, sequence_head_arguments, sequence_scores
from deberta_ds.errors import exit_code
from deberta_ds.extras import require_hf
from deberta_ds.training.run_logs import ScalarLog


def hold_out(examples: Examples, fraction: float, path: str) -> tuple[Examples, Examples]:
    """(training, validation) examples: a `fraction` of them held out, chosen with a fixed seed so
    that every --seed fine-tunes and is scored on the same split."""
    held = round(fraction * len(examples))
    if not 0 < held < len(examples):
        raise DataError(f"--valid-fraction {fraction}: holds out {held} of the {len(examples)} examples "
                            f"of {path}; choose a fraction that leaves both parts non-empty")
    order = np.random.default_rng(0).permutation(len(examples))
    return examples.subset(order[held:]), examples.subset(order[:held])


def class_names(args, train: Examples) -> list[str]:
    """--labels (distinct names) or the training file's classes, sorted; at least two."""
    classes = args.labels.split(",") if args.labels else sorted(set(train.labels))
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise DataError(f"--labels {args.labels}: {repeated} named more than once; name each class once")
    if len(classes) < 2:
        raise DataError(f"{args.train}: holds one class only ({classes}); a classifier needs two or more "
                            "(or use --task regression)")
    return classes


def read_data(args, regression: bool) -> tuple[Examples, Examples, Examples | None, list[str] | None, str]:
    """(train, valid, test, classes, the validation data's name): every file read and every label
    checked before anything trains."""
    columns = args.columns.split(",") if args.columns else None

    def read(path: str, labels=None) -> Examples:
        return read_examples(Path(path), args.text_column, args.pair_column, args.label_column, regression, labels,
                             columns)
    train = read(args.train)
    classes = None if regression else class_names(args, train)
    if classes is not None and args.labels:
        train = read(args.train, classes)
    if args.valid:
        valid, valid_source = read(args.valid, classes), args.valid
    else:
        train, valid = hold_out(train, args.valid_fraction, args.train)
        valid_source = f"{args.train} (the --valid-fraction part)"
    return train, valid, read(args.test, classes) if args.test else None, classes, valid_source


def scores(model, tokenizer, examples: Examples, classes, recipe: Recipe, placement: Placement) -> dict:
    outputs = predict(model, sequence_features(tokenizer, examples, classes, recipe.max_length),
                      tokenizer.pad_token_id, recipe.batch_size * 2, placement, placement.bf16(recipe), ("logits",),
                      token_level=False)
    return sequence_scores(outputs, examples, classes)


def finetune(args) -> dict:
    require_hf("fine-tuning (deberta_ds.finetune)")
    regression = args.task == "regression"
    recipe = Recipe(args.epochs, args.batch_size, args.lr, args.warmup_ratio, args.weight_decay, args.max_length,
                    args.seed, args.precision, args.compile)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; name a folder to write into")
    tokenizer_dir = check_hf_folder(Path(args.model), Path(args.tokenizer) if args.tokenizer else None)
    train, valid, test, classes, valid_source = read_data(args, regression)
    placement = Placement.from_environment()
    placement.bf16(recipe)  # --precision bf16 without a GPU fails before the model loads
    source = ModelSource("model", Path(args.model), tokenizer_dir)
    model = source.build("AutoModelForSequenceClassification", args.seed, **sequence_head_arguments(classes))
    tokenizer = source.load_tokenizer()
    history, best, primary, last_step = [], None, "pearson" if regression else "accuracy", [0]
    scalars = ScalarLog(out / "tensorboard", enabled=placement.rank == 0)

    def on_epoch(epoch: int, step: int) -> None:
        nonlocal best
        last_step[0] = step
        found = scores(model, tokenizer, valid, classes, recipe, placement)
        scalars.write({f"valid/{name}": value for name, value in found.items()}, step)
        history.append({"epoch": epoch, **found})
        if placement.rank == 0:
            tqdm.write(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in found.items()))
        if best is None or found[primary] > best[primary]:
            best = {"epoch": epoch, **found}
            if placement.rank == 0:
                save_hf_folder(model, tokenizer, out / "best")

    train_features = sequence_features(tokenizer, train, classes, recipe.max_length)
    fit(model, train_features, tokenizer.pad_token_id, recipe, placement, scalars, on_epoch, not args.no_progress)
    result = {"task": args.task, "labels": classes, "examples": {"train": len(train), "valid": len(valid)},
              "valid": history, "best": best, "valid_source": valid_source}
    if test is not None:
        best_model = ModelSource("best", out / "best", out / "best").build(
            "AutoModelForSequenceClassification", args.seed, **sequence_head_arguments(classes))
        result["test"] = scores(best_model, tokenizer, test, classes, recipe, placement)
        if placement.rank == 0:
            tqdm.write("test: " + "  ".join(f"{k} {v:.4f}" for k, v in result["test"].items()))
        scalars.write({f"test/{name}": value for name, value in result["test"].items()}, last_step[0])
    scalars.close()
    if placement.rank == 0:
        write_atomic(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face DebertaV2 checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory, if the checkpoint holds none")
    parser.add_argument("--train", required=True, help="training file (.tsv, .csv with a header line, or .jsonl)")
    held_out = parser.add_mutually_exclusive_group(required=True)
    held_out.add_argument("--valid", help="validation file, scored after every epoch")
    held_out.add_argument("--valid-fraction", type=float,
                          help="instead of --valid: hold out this fraction of --train (the same split for every seed)")
    parser.add_argument("--columns", help="comma-separated column names of TSV / CSV files without a header line "
                                          "(e.g. text,label)")
    parser.add_argument("--test", help="test file, scored once with the best epoch's model")
    parser.add_argument("--out", required=True, help="output folder: best/ (HF format) and metrics.json")
    parser.add_argument("--task", choices=["classification", "regression"], default="classification")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--pair-column", help="second text of a sentence-pair task")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--labels", help="comma-separated class names in id order (default: sorted from --train)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over data-parallel ranks)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on GPUs, fp32 on CPUs (as pre-training)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.valid_fraction is not None and not 0 < args.valid_fraction < 1:
        parser.error(f"--valid-fraction must be between 0 and 1, got {args.valid_fraction}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: finetune(args))


if __name__ == "__main__":
    sys.exit(main())
