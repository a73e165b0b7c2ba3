"""Downstream evaluation: fine-tune and score a model on GLUE, SQuAD 2.0, CoNLL-2003 (and AG
News), once per seed, beside a baseline; one table (Markdown and JSON) of medians over seeds.

    python -m deberta_ds.evaluate --model runs/quickstart/run --tasks glue/rte,glue/mrpc,squad2 \
        --data-dir data/ --baseline random-init --seeds 3 --out runs/eval

--model: a Hugging Face DebertaV2 folder (with its tokenizer, or --tokenizer), a deberta_ds
checkpoint or a training run (its newest complete checkpoint, exported on the fly with the
tokenizer the run recorded). --baseline: another such model, or random-init (the model's shape
and tokenizer, fresh weights per seed). --data-dir holds the public layouts:

    CoLA/ SST-2/ MRPC/ STS-B/ QQP/ QNLI/ RTE/ WNLI/   train.tsv, dev.tsv (GLUE's own columns)
    MNLI/                      train.tsv, dev_matched.tsv, dev_mismatched.tsv
    agnews/                    train.tsv (or dev.tsv), test.tsv: text<TAB>label, no header
    squad2/                    train-v2.0.json, dev-v2.0.json
    conll2003/                 train.txt, valid.txt, test.txt (or eng.train, eng.testa, eng.testb)

Writes OUT/results.md and OUT/results.json (all scores in percent), and per run
OUT/runs/TASK/MODEL_seedN/ with metrics.json, tensorboard/ and model/ (a Hugging Face folder
that AutoModelFor... and pipeline(...) load). Under torchrun / the deepspeed launcher every
run trains data-parallel over the processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deberta_ds.errors import UserError, exit_code


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder, deberta_ds checkpoint or training run")
    parser.add_argument("--tokenizer", help="tokenizer folder, when the model's folder holds none")
    parser.add_argument("--tasks", required=True, help="comma-separated: glue (its nine tasks), glue/cola, ..., "
                                                       "agnews, squad2, conll2003")
    parser.add_argument("--data-dir", required=True, help="folder holding the tasks' folders (see above)")
    parser.add_argument("--baseline", help="random-init, or another model (as --model) to compare with")
    parser.add_argument("--seeds", type=int, default=3, help="runs per task and model, seeds 1..N (default 3)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over data-parallel ranks)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, help="tokens per example (default 128; SQuAD 384)")
    parser.add_argument("--doc-stride", type=int, default=128, help="SQuAD: tokens shared by consecutive windows")
    parser.add_argument("--max-answer-length", type=int, default=30, help="SQuAD: longest answer, in tokens")
    parser.add_argument("--max-train-examples", type=int, help="a fixed random subset of each training set")
    parser.add_argument("--max-eval-examples", type=int, help="a fixed random subset of each evaluation set")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--tensorboard-dir", help="also write each shown median there (as downstream/TASK/METRIC)")
    parser.add_argument("--tensorboard-step", type=int, default=0, help="the step of those scalars")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("seeds", "max_train_examples", "max_eval_examples", "max_answer_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def suite(args) -> dict:
    from deberta_ds.extras import require_hf

    require_hf("downstream evaluation (deberta_ds.evaluate)")
    from deberta_ds.atomic_files import write_atomic
    from deberta_ds.downstream import report
    from deberta_ds.downstream.loop import Placement, Recipe
    from deberta_ds.downstream.models import RANDOM_INIT, random_twin, resolve_model
    from deberta_ds.downstream.runner import run_once
    from deberta_ds.downstream.tasks import Settings, parse_tasks

    out, tasks = Path(args.out), parse_tasks(args.tasks)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; name a folder")
    recipe = Recipe(args.epochs, args.batch_size, args.lr, args.warmup_ratio, args.weight_decay,
                    args.max_length or 128, 0, args.precision, args.compile)  # validated before anything runs
    settings = Settings(args.max_length, args.doc_stride, args.max_answer_length, args.max_train_examples,
                        args.max_eval_examples)
    placement = Placement.from_environment()
    placement.bf16(recipe)  # a bf16 request without a GPU fails now, not after the data are read
    data = {task.name: task.load(Path(args.data_dir), settings) for task in tasks}  # every file checked first
    model = resolve_model(args.model, args.tokenizer, out / "exported" / "model", "model")
    models = [model]
    if args.baseline == RANDOM_INIT:
        models.append(random_twin(model))
    elif args.baseline:
        models.append(resolve_model(args.baseline, args.tokenizer, out / "exported" / "baseline", "baseline"))
    plan = [(task, source, seed) for task in tasks for seed in range(1, args.seeds + 1) for source in models]
    results, started = [], time.monotonic()
    for number, (task, source, seed) in enumerate(plan, 1):
        show(placement, f"[{number}/{len(plan)}] {task.name} {source.name} seed {seed}{eta(started, number, plan)}")
        run_recipe = Recipe(**{**vars(recipe), "seed": seed, "max_length": task.max_length(settings)})
        run_dir = out / "runs" / task.name.replace("/", "_") / f"{source.name}_seed{seed}"
        results.append(run_once(task, data[task.name], source, run_recipe, settings, placement, run_dir,
                                not args.no_progress))
    table = report.table(results, tasks, model.name, models[1].name if len(models) > 1 else None)
    if placement.rank == 0:
        names = f"model {args.model}" + (f", baseline {args.baseline}" if args.baseline else "")
        write_atomic(out / "results.json", report.as_json(table | {"arguments": vars(args)}))
        write_atomic(out / "results.md", report.markdown(table, f"Downstream evaluation: {names}; {args.seeds} "
                                                                f"seed(s), scores in percent"))
        print(report.markdown(table, f"{out / 'results.md'}:"))
        if args.tensorboard_dir:
            write_medians(table, Path(args.tensorboard_dir), args.tensorboard_step)
    return table


def eta(started: float, number: int, plan: list) -> str:
    if number == 1:
        return ""
    elapsed = time.monotonic() - started
    remaining = elapsed / (number - 1) * (len(plan) - number + 1)
    return f" (elapsed {elapsed / 60:.1f} min, about {remaining / 60:.1f} min left)"


def show(placement, message: str) -> None:
    if placement.rank == 0:
        print(message, flush=True)


def write_medians(table: dict, folder: Path, step: int) -> None:
    from deberta_ds.training.run_logs import ScalarLog

    scalars = ScalarLog(folder, enabled=True)
    for row in table["rows"]:
        for key in ("model", "baseline"):
            if key in row:
                name = "" if key == "model" else "_baseline"
                scalars.write({f"downstream{name}/{row['task']}/{row['metric']}": row[key]["median"]}, step)
    scalars.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: suite(args))


if __name__ == "__main__":
    sys.exit(main())
