"""One fine-tuning run: a task, a model, a seed. The model with the task's head is trained with
the shared loop, scored on every evaluation set after each epoch (TensorBoard: RUN/tensorboard),
and saved with its tokenizer as a Hugging Face folder (RUN/model) that transformers' Auto class
and pipeline load; RUN/metrics.json holds every epoch's scores. The last epoch's scores are the
run's (no epoch is chosen on the evaluation data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

from deberta_ds.atomic_files import atomic_path, write_atomic
from deberta_ds.downstream.loop import Placement, Recipe, fit, predict
from deberta_ds.downstream.models import ModelSource
from deberta_ds.downstream.tasks import Settings, Task
from deberta_ds.training.run_logs import ScalarLog


def save_hf_folder(model, tokenizer, folder: Path) -> None:
    """The model and tokenizer in HF format: written beside `folder`, then renamed into place."""
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def evaluate_task(model, tokenizer, task: Task, eval_sets: dict, settings: Settings, recipe: Recipe,
                  placement: Placement) -> dict:
    """The task's scores of `model` on each evaluation set."""
    per_set = {}
    for name, examples in eval_sets.items():
        features, extra = task.features(tokenizer, examples, settings, train=False)
        outputs = predict(model, features, tokenizer.pad_token_id, recipe.batch_size * 2, placement,
                          placement.bf16(recipe), task.outputs, task.token_level)
        per_set[name] = task.score(outputs, examples, extra, settings)
    return task.scored(per_set)


def run_once(task: Task, data: tuple, source: ModelSource, recipe: Recipe, settings: Settings,
             placement: Placement, run_dir: Path, show_progress: bool) -> dict:
    """Fine-tune `source` on `task` with `recipe` (its seed) and return the last epoch's scores."""
    train, eval_sets = data
    tokenizer = source.load_tokenizer()
    model = source.build(task.head, recipe.seed, **task.head_arguments())
    features, _ = task.features(tokenizer, train, settings, train=True)
    scalars, history = ScalarLog(run_dir / "tensorboard", placement.rank == 0), []

    def on_epoch(epoch: int, step: int) -> None:
        scores = evaluate_task(model, tokenizer, task, eval_sets, settings, recipe, placement)
        scalars.write({f"eval/{name}": value for name, value in scores.items()}, step)
        history.append({"epoch": epoch, "step": step, **scores})
        if placement.rank == 0 and show_progress:
            tqdm.write(f"{task.name} {source.name} seed {recipe.seed} epoch {epoch}: "
                       + "  ".join(f"{k} {v:.2f}" for k, v in scores.items() if k in task.shown))

    fit(model, features, tokenizer.pad_token_id, recipe, placement, scalars, on_epoch, show_progress,
        desc=f"{task.name} {source.name} seed {recipe.seed}")
    scalars.close()
    result = {"task": task.name, "model": source.name, "seed": recipe.seed, "scores": history[-1],
              "epochs": history, "examples": {"train": len(train), **{k: len(v) for k, v in eval_sets.items()},
                                              "train_features": len(features)},
              "recipe": dataclasses.asdict(recipe), "settings": dataclasses.asdict(settings)}
    if placement.rank == 0:
        save_hf_folder(model, tokenizer, run_dir / "model")
        write_atomic(run_dir / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result
