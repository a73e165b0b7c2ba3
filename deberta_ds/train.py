"""RTD + GDES pre-training on DeepSpeed: `python -m deberta_ds.train --config run.yaml [key=value ...]`.

Launch with `deepspeed --num_gpus N --module deberta_ds.train --config run.yaml` (the
launcher's --local_rank is accepted). Every input is checked before DeepSpeed starts; a
relaunch of a finished run says "nothing to do" and starts nothing. `--show-config` prints
every config key with its value (the defaults, with --config and the overrides applied).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

from deberta_ds.config import PRESETS, to_dict
from deberta_ds.errors import UserError
from deberta_ds.parallel_env import collect_cycles_then_destroy_process_groups, lost_contact, setup_process
from deberta_ds.resources import recipe_names
from deberta_ds.training.run_config import load_run_config
from deberta_ds.training.run_lock import OutputBusyError, RunLock
from deberta_ds.training.run_start import nothing_to_do, prepare, verify_checkpoint
from deberta_ds.training.trainer import Trainer, check_writable


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config: a YAML or JSON file (see deberta_ds/training/run_config.py) "
                        "or a shipped recipe by name (python -m deberta_ds.resources recipes lists them)")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from the newest complete checkpoint in OUTPUT/checkpoints, if any "
                             "(default); none: start fresh (refused if checkpoints exist); PATH: continue from that "
                             "complete checkpoint "
                             "folder (refused if OUTPUT/checkpoints holds newer ones)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (same as train.tp=N)")
    parser.add_argument("--show-config", action="store_true",
                        help="print every config key with its value (defaults, --config and overrides applied) and "
                             "exit")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="run-config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may follow --resume X


def show_config(config) -> str:
    """The run config as YAML, with the model preset's fields that model_overrides may change."""
    model = PRESETS[config.model]
    return (f"# python -m deberta_ds.train --config FILE: every key, as this run would use it\n"
            f"{yaml.safe_dump(to_dict(config), sort_keys=False)}"
            f"# model_overrides: any ModelConfig field; preset {config.model!r} sets {model}\n")


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def take_output_lock(config) -> RunLock:
    """Rank 0 locks output_dir (run_lock); every rank learns whether it could."""
    check_writable(Path(config.output_dir))
    lock, refusal = RunLock(Path(config.output_dir)), None
    if dist.get_rank() == 0:
        try:
            note = lock.acquire()
            if note:
                print(note, file=sys.stderr)
        except OutputBusyError as error:
            refusal = str(error)
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise OutputBusyError(box[0])
    return lock


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = args.overrides + ([f"train.tp={args.tp}"] if args.tp is not None else [])
        config = load_run_config(args.config, overrides)
        if args.show_config:
            print(show_config(config), end="")
            return 0
        if args.config is None:
            raise UserError(f"--config: missing; name a run config file or a shipped recipe (--config quickstart "
                            f"trains the tiny model on the CPU in minutes; recipes: {' '.join(recipe_names())}). "
                            "Without it the defaults would train the 'base' model; --show-config lists every key")
        start = prepare(config, args.resume, verify=False)
        finished = nothing_to_do(config, start)
        if finished:
            _say(finished)
            return 0
        verify_checkpoint(start)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before training started: nothing was written", file=sys.stderr)
        return 130
    return _train(config, args.resume, start)


def _train(config, resume: str, start) -> int:
    try:
        setup_process(timeout_s=config.train.collective_timeout_s)
    except KeyboardInterrupt:
        print("interrupted while starting: no checkpoint was written", file=sys.stderr)
        return 130
    lock = None
    try:
        lock = take_output_lock(config)
        Trainer(config, resume, start).run()  # no name keeps the engines alive past the run
    except UserError as error:  # a bad config or file; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler was installed (engines being built)
        print("interrupted while starting: no checkpoint was written", file=sys.stderr)
        return 130
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        reason = str(error).strip().splitlines()[0]
        print(f"error: rank {dist.get_rank()} lost contact with the other ranks ({reason}); "
              f"a node or the network failed (train.collective_timeout_s={config.train.collective_timeout_s}). "
              "Relaunch the same command to resume from the last complete checkpoint", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        collect_cycles_then_destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
