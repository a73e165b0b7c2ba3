"""What a resumed run does with settings that differ from its checkpoint's: the one written policy
(README, "Resuming with changed settings").

Every run-config setting either applies from the resume step on (the log names each change), or
is refused naming the setting, why, and the way to do it. Refused:
- what the optimiser states, their partitioning or the weights' layout depend on (`REFUSED`): a
  new run that starts from the checkpoint's weights with `init_from: CHECKPOINT` (fresh optimiser);
- the data of the steps already trained (`data.*`, `phases`): the data position is a count of
  samples of that data. A change from the resume step on is a phase that starts there.
The model's shape and the tokenizer are checked by checkpoint.check_resumable.
"""

from __future__ import annotations

from pathlib import Path

from deberta_ds.config import to_dict
from deberta_ds.errors import CheckpointError, UserError
from deberta_ds.training.checkpoint import run_config_of
from deberta_ds.training.run_config import RunConfig

REFUSED = {
    "seed": "the RTD samples of every step are drawn from it",
    "train.global_batch_size": "the data position, the phases and the schedule are counted in batches of it",
    "train.mode": "decoupled and joint runs hold different engines and optimiser states",
    "train.zero_stage": "DeepSpeed stores the optimiser states partitioned per ZeRO stage",
    "train.precision": "the optimiser states (fp32 master weights, the fp16 loss scale) are stored per precision",
    "train.offload": "ZeRO-Offload keeps the optimiser states in another form",
    "train.tp": "the weights are stored split over the TP ranks (merge/split them with python -m deberta_ds.convert)",
    "optim.name": "the optimiser states are Adam's or LAMB's",
    "optim.betas": "the optimiser restores them with its states",
    "optim.eps": "the optimiser restores it with its states",
    "optim.weight_decay": "the optimiser restores it with its states",
    "optim.decay_embedding_delta": "the optimiser's parameter groups are restored as saved",
}
# Read only by a fresh start: a resumed run's weights come from its checkpoint.
IGNORED = ("init_from", "init_generator_from", "output_dir")
# Compared as the model builds them (checkpoint.check_resumable: a None generator_layers is resolved).
SHAPE_CHECKED = ("rtd.generator_layers", "rtd.embedding_sharing")
# Checked against the steps already trained (data_plan_changes); valid and allow_incomplete_shards apply.
DATA_FIELDS_FREE = ("valid", "allow_incomplete_shards", "tokenizer")


def _leaves(data: dict, prefix: str = "") -> dict:
    """Dotted name -> value of every setting (mappings are descended into, lists are values)."""
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


def _section_at(plan: list, step: int) -> dict:
    """The data section (as a dict, without the fields free to change) that trains `step`."""
    section = [section for start, section in plan if start <= step][-1]
    return {k: v for k, v in to_dict(section).items() if k not in DATA_FIELDS_FREE}


def data_plan_changes(old: RunConfig, new: RunConfig, step: int) -> list[tuple[str, object, object, int]]:
    """(data.field, checkpoint's value, this run's, first step it differs) for the steps already trained."""
    old_plan, new_plan = old.phase_plan(), new.phase_plan()
    starts = sorted({start for start, _ in old_plan + new_plan if start < step})
    for start in starts:
        before, now = _leaves(_section_at(old_plan, start), "data."), _leaves(_section_at(new_plan, start), "data.")
        differ = [(name, before.get(name), now.get(name), start) for name in sorted(set(before) | set(now))
                  if before.get(name) != now.get(name)]
        if differ:
            return differ
    return []


def resume_changes(old: RunConfig, new: RunConfig, step: int, folder: Path) -> list[str]:
    """The settings that change on resuming from `folder` (at `step`), as log lines; a UserError
    naming the first refused one and the way to do it."""
    before, now = _leaves(to_dict(old)), _leaves(to_dict(new))
    changed = [name for name in sorted(set(before) | set(now))
               if before.get(name) != now.get(name) and name not in SHAPE_CHECKED]
    fresh = f"start a new run from its weights with init_from: {folder} (a fresh optimiser and schedule)"
    for name in changed:
        refused = next((reason for key, reason in REFUSED.items() if name == key or name.startswith(key + ".")), None)
        if refused:
            raise UserError(f"{name}: {before.get(name)!r} in the checkpoint {folder}, {now.get(name)!r} now; it "
                            f"cannot change on resume ({refused}). Resume with {name}: {before.get(name)!r}, or "
                            f"{fresh}")
    for name, was, wants, start in data_plan_changes(old, new, step):
        raise UserError(f"{name}: {was!r} in the checkpoint {folder}, {wants!r} now, for steps {start} to {step} "
                        "that are already trained. Keep it as it was and change it from the resume step on with a "
                        f"phase (phases: [{{until_step: {step}}}, {{until_step: {new.train.steps}, {name}: "
                        f"{wants!r}}}]), or {fresh}")
    lines = []
    for name in changed:
        if name.startswith(("data.", "phases")):
            continue  # the data of the steps to come: said below, once
        verb = "is ignored on resume (the weights come from the checkpoint)" if name in IGNORED else \
            f"applies from step {step}"
        lines.append(f"{name}: {before.get(name)!r} in the checkpoint, {now.get(name)!r} now; {verb}")
    if any(name.startswith(("data.", "phases")) for name in changed):
        lines.append(f"the data settings differ from the checkpoint's for the steps after {step} only; they apply "
                     "from there")
    return lines


def checkpoint_run_config(state: dict, folder: Path) -> RunConfig:
    """The run config a checkpoint was trained with, or a CheckpointError naming it."""
    try:
        return run_config_of(state)
    except (UserError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: its recorded run config cannot be read ({error})") from None
