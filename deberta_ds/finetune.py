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
transformers' own model classes are used; nothing of the model is reimplemented here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deberta_ds.atomic_files import atomic_path, write_atomic
from deberta_ds.errors import UserError
from deberta_ds.extras import require_extra
from deberta_ds.training.run_logs import ScalarLog

LOG_EVERY = 10  # training steps per TensorBoard point of the loss and learning rate


class FinetuneError(UserError):
    """Bad input, named: a file, a column, a line, a checkpoint."""


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list          # str class names (classification) or floats (regression)


def read_rows(path: Path, columns: list[str] | None = None) -> list[tuple[int, dict]]:
    """(line number, row as a dict) of a TSV / CSV or JSON-lines file. TSV / CSV files carry a
    header line unless `columns` names their columns (--columns); every row must have as many
    fields as the header, else the line is named (a stray tab or quote would shift the label)."""
    if not path.is_file():
        raise FinetuneError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise FinetuneError(f"{path}:{number}: not JSON ({error})") from None
    else:
        rows = read_delimited(path, columns)
    if not rows:
        raise FinetuneError(f"{path}: no examples (an empty file, or only a header)")
    return rows


def read_delimited(path: Path, columns: list[str] | None) -> list[tuple[int, dict]]:
    delimiter = "\t" if path.suffix in (".tsv", ".txt") else ","
    rows, header = [], columns
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        for fields in reader:
            if not fields:
                continue  # a blank line
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                named = "--columns names" if columns else "the header has"
                hint = "" if columns else "; a file without a header line needs --columns"
                raise FinetuneError(f"{path}:{reader.line_num}: {len(fields)} fields, {named} {len(header)} "
                                    f"({header}){hint}")
            rows.append((reader.line_num, dict(zip(header, fields))))
    return rows


def read_examples(path: Path, text: str, pair: str | None, label: str, regression: bool,
                  columns: list[str] | None = None) -> Examples:
    rows = read_rows(path, columns)
    first = rows[0][1]
    hint = "" if columns else " (or, for a file without a header line, name its columns with --columns)"
    for column in [text, label] + ([pair] if pair else []):
        if column not in first:
            raise FinetuneError(f"{path}: no column {column!r} (columns: {sorted(first)}); name it with "
                                f"--{'text' if column == text else 'pair' if column == pair else 'label'}-column"
                                + hint)
    labels = []
    for number, row in rows:
        value = str(row[label]).strip()
        if regression:
            try:
                labels.append(float(value))
            except ValueError:
                raise FinetuneError(f"{path}:{number}: label {value!r} is not a number (--task regression)") from None
        else:
            labels.append(value)
    return Examples([str(row[text]) for _, row in rows], [str(row[pair]) for _, row in rows] if pair else None,
                    labels)


def hold_out(examples: Examples, fraction: float, path: str) -> tuple[Examples, Examples]:
    """(training, validation) examples: a `fraction` of them held out, chosen with a fixed seed so
    that every --seed fine-tunes and is scored on the same split."""
    held = round(fraction * len(examples.labels))
    if not 0 < held < len(examples.labels):
        raise FinetuneError(f"--valid-fraction {fraction}: holds out {held} of the {len(examples.labels)} examples "
                            f"of {path}; choose a fraction that leaves both parts non-empty")
    order = np.random.default_rng(0).permutation(len(examples.labels))

    def pick(chosen) -> Examples:
        return Examples([examples.texts[i] for i in chosen],
                        [examples.pairs[i] for i in chosen] if examples.pairs else None,
                        [examples.labels[i] for i in chosen])
    return pick(order[held:]), pick(order[:held])


def label_ids(examples: Examples, classes: list[str], path: Path) -> list[int]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(examples.labels) - set(index))
    if unknown:
        raise FinetuneError(f"{path}: labels {unknown[:5]} are not in the label set {classes} (--labels)")
    return [index[label] for label in examples.labels]


def load_model(model_dir: str, tokenizer_dir: str | None, num_labels: int, regression: bool):
    require_extra("hf", "transformers", feature="fine-tuning (deberta_ds.finetune)")
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise FinetuneError(f"--model {model_dir}: no config.json; name a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "deberta-v2":
        raise FinetuneError(f"--model {model_dir}: model_type {config.model_type!r} is not a DeBERTa-v2/v3 "
                            "checkpoint (deberta-v2)")
    source = tokenizer_dir or model_dir
    if not any((Path(source) / name).is_file() for name in ("tokenizer.json", "spm.model")):
        raise FinetuneError(f"--model {model_dir}: holds no tokenizer; export it with `convert to-hf` (which "
                            "writes one) or pass --tokenizer")
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, problem_type="regression" if regression else "single_label_classification")
    return model, AutoTokenizer.from_pretrained(source)


def scores(predictions: np.ndarray, targets: np.ndarray, regression: bool) -> dict:
    """accuracy, F1 (binary: of class 1; else macro) and MCC; Pearson and Spearman for regression."""
    if regression:
        ranks = lambda x: np.argsort(np.argsort(x)).astype(np.float64)  # noqa: E731
        pearson = float(np.corrcoef(predictions, targets)[0, 1])
        return {"pearson": pearson, "spearman": float(np.corrcoef(ranks(predictions), ranks(targets))[0, 1])}
    classes = max(int(targets.max()), int(predictions.max())) + 1
    confusion = np.zeros((classes, classes), dtype=np.float64)
    np.add.at(confusion, (targets, predictions), 1)
    true_positive = np.diag(confusion)
    precision = np.divide(true_positive, confusion.sum(0), out=np.zeros(classes), where=confusion.sum(0) > 0)
    recall = np.divide(true_positive, confusion.sum(1), out=np.zeros(classes), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(classes), where=precision + recall > 0)
    total, correct = confusion.sum(), true_positive.sum()
    covariance = correct * total - confusion.sum(0) @ confusion.sum(1)
    denominator = math.sqrt((total ** 2 - confusion.sum(0) @ confusion.sum(0)) *
                            (total ** 2 - confusion.sum(1) @ confusion.sum(1)))
    return {"accuracy": float(correct / total), "f1": float(f1[1] if classes == 2 else f1.mean()),
            "mcc": float(covariance / denominator) if denominator else 0.0}


def batches(tokenizer, examples: Examples, targets, batch_size: int, max_length: int, order):
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        encoded = tokenizer([examples.texts[i] for i in chosen],
                            [examples.pairs[i] for i in chosen] if examples.pairs else None,
                            truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        yield encoded, torch.tensor([targets[i] for i in chosen])


@torch.no_grad()
def evaluate(model, tokenizer, examples, targets, args, device, regression: bool) -> dict:
    model.eval()
    outputs = []
    for encoded, _ in batches(tokenizer, examples, targets, args.batch_size * 2, args.max_length,
                              np.arange(len(targets))):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**encoded.to(device)).logits.float()
        outputs.append(logits[:, 0] if regression else logits.argmax(-1))
    model.train()
    return scores(torch.cat(outputs).cpu().numpy(), np.asarray(targets), regression)


def save_atomically(model, tokenizer, folder: Path) -> None:
    """The model and tokenizer in HF format: written beside `folder`, then renamed into place."""
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def finetune(args) -> dict:
    regression = args.task == "regression"
    columns = args.columns.split(",") if args.columns else None
    read = lambda path: read_examples(Path(path), args.text_column, args.pair_column, args.label_column,  # noqa: E731
                                      regression, columns)
    if args.valid:
        train, valid, valid_source = read(args.train), read(args.valid), args.valid
    else:
        train, valid = hold_out(read(args.train), args.valid_fraction, args.train)
        valid_source = f"{args.train} (the --valid-fraction part)"
    classes = args.labels.split(",") if args.labels else sorted(set(train.labels))
    def encode(examples: Examples, path: str) -> list:
        return examples.labels if regression else label_ids(examples, classes, Path(path))
    train_targets, valid_targets = encode(train, args.train), encode(valid, valid_source)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, args.tokenizer, 1 if regression else len(classes), regression)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps = args.epochs * math.ceil(len(train_targets) / args.batch_size)
    warmup = int(args.warmup_ratio * steps)
    def factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        return (step + 1) / max(1, warmup) if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history, best, primary = [], None, "pearson" if regression else "accuracy"
    rng = np.random.default_rng(args.seed)
    progress = tqdm(total=steps, desc="finetune", dynamic_ncols=True, disable=args.no_progress)
    scalars, step, losses = ScalarLog(out / "tensorboard", enabled=True), 0, []
    for epoch in range(1, args.epochs + 1):
        for encoded, target in batches(tokenizer, train, train_targets, args.batch_size, args.max_length,
                                       rng.permutation(len(train_targets))):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**encoded.to(device), labels=target.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % LOG_EVERY == 0 or step == steps:  # the mean since the previous log step
                scalars.write({"finetune/loss": float(np.mean(losses)), "finetune/lr": schedule.get_last_lr()[0]},
                              step)
                losses = []
        metrics = evaluate(model, tokenizer, valid, valid_targets, args, device, regression)
        scalars.write({f"valid/{name}": value for name, value in metrics.items()}, step)
        history.append({"epoch": epoch, **metrics})
        tqdm.write(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if best is None or metrics[primary] > best[primary]:
            best = {"epoch": epoch, **metrics}
            save_atomically(model, tokenizer, out / "best")
    progress.close()
    result = {"task": args.task, "labels": None if regression else classes,
              "examples": {"train": len(train_targets), "valid": len(valid_targets)}, "valid": history, "best": best}
    if args.test:
        test = read(args.test)
        best_model, _ = load_model(str(out / "best"), None, 1 if regression else len(classes), regression)
        result["test"] = evaluate(best_model.to(device), tokenizer, test, encode(test, args.test), args, device,
                                  regression)
        tqdm.write("test: " + "  ".join(f"{k} {v:.4f}" for k, v in result["test"].items()))
        scalars.write({f"test/{name}": value for name, value in result["test"].items()}, step)
    scalars.close()
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
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("max_length", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        finetune(args)
    except UserError as error:  # FinetuneError, or a missing extra
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
