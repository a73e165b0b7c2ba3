"""Run a function in N real processes (torch.multiprocessing, gloo) and collect what rank 0 returns."""

from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

from deberta_ds.parallel_env import collect_cycles_then_destroy_process_groups, free_port, init_distributed


def _worker(rank: int, world: int, port: int, fn, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import torch.distributed as dist

    init_distributed()
    try:
        result = fn(*args)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(result))
        dist.barrier()  # no rank tears its groups down while a peer still communicates
    finally:
        collect_cycles_then_destroy_process_groups()
    # Success: leave without interpreter finalization, where leftover gloo/DeepSpeed C++ state once
    # aborted a finished rank (SIGABRT) in CI. Failures above still raise and report normally.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world: int, *args, tmp_dir: Path, timeout_s: float = 600):
    """fn(*args) on `world` processes; returns rank 0's result (fn must be importable). A hang
    becomes a test failure after timeout_s instead of stalling the whole suite."""
    out = tmp_dir / f"result_{free_port()}.pkl"
    context = mp.start_processes(_worker, args=(world, free_port(), fn, args, str(out)), nprocs=world,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world} processes did not finish within {timeout_s} s")
    return pickle.loads(out.read_bytes())
