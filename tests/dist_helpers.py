"""Run a function in N real processes (torch.multiprocessing, gloo) and collect what rank 0 returns."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch.multiprocessing as mp

from deberta_ds.parallel_env import free_port, release_deepspeed_shm


def _worker(rank: int, world: int, port: int, fn, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        result = fn(*args)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
        release_deepspeed_shm()


def run_distributed(fn, world: int, *args, tmp_dir: Path):
    """fn(*args) on `world` processes; returns rank 0's result (fn must be importable)."""
    out = tmp_dir / f"result_{free_port()}.pkl"
    mp.start_processes(_worker, args=(world, free_port(), fn, args, str(out)), nprocs=world, start_method="spawn")
    return pickle.loads(out.read_bytes())
