"""RTD + GDES pre-training on DeepSpeed: `python -m deberta_ds.train --config run.yaml [key=value ...]`.

Launch with `deepspeed --num_gpus N --module deberta_ds.train --config run.yaml` (the
launcher's --local_rank is accepted). Everything is validated before the first step.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from deberta_ds.errors import UserError
from deberta_ds.parallel_env import collect_cycles_then_destroy_process_groups, lost_contact, setup_process
from deberta_ds.training.run_config import load_run_config
from deberta_ds.training.trainer import Trainer


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
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE", help="run-config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = args.overrides + ([f"train.tp={args.tp}"] if args.tp else [])
        config = load_run_config(args.config, overrides)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    setup_process(timeout_s=config.train.collective_timeout_s)
    try:
        Trainer(config, args.resume).run()  # no name keeps the engines alive past the run
    except UserError as error:  # a bad config or file; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        reason = str(error).strip().splitlines()[0]
        print(f"error: rank {dist.get_rank()} lost contact with the other ranks ({reason}); "
              f"a node or the network failed (train.collective_timeout_s={config.train.collective_timeout_s}). "
              "Relaunch the same command to resume from the last complete checkpoint", file=sys.stderr)
        return 1
    finally:
        collect_cycles_then_destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
