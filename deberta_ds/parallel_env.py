"""Process-group environment helpers."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_environment() -> dict:
    """torch.distributed variables for a world of one on this machine."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def deepspeed_shm_buffer(rank: int, addr: str, port: str) -> Path:
    """The /dev/shm file DeepSpeed's CPU shared-memory all-reduce creates for one rank."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed(timeout_s: float | None = None) -> None:
    """deepspeed.init_distributed (NCCL on GPUs, gloo on CPU; collectives fail after timeout_s,
    torch's default when None), then, on the CPU accelerator, unlink
    this rank's shared-memory all-reduce buffer (about 58 MB), which DeepSpeed never removes.

    The unlink must wait for a barrier: each rank leaves DeepSpeed's shm set-up once it has mapped
    its peers' buffers, not once its peers have mapped its own, and a peer whose buffer vanishes
    first spins forever. After the barrier every mapping exists, survives the unlink, and nothing
    is left in /dev/shm however the process ends later (even SIGKILL)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if torch.cuda.is_available():  # NCCL's communicators bind to the current device: this rank's own
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **timeout)
    if get_accelerator().device_name() == "cpu":
        dist.barrier()
        rank, addr, port = dist.get_rank(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        deepspeed_shm_buffer(rank, addr, port).unlink(missing_ok=True)


def collect_cycles_then_destroy_process_groups() -> None:
    """End of a distributed process. DeepSpeed engines sit in reference cycles (hooks, optimizer
    back-references) that hold process groups and in-flight collective handles; left to the
    interpreter's final teardown, the gloo worker threads behind them can abort the process
    (SIGABRT, "terminate called without an active exception") after a successful run. Collect
    them while the groups still exist, then destroy the groups."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
