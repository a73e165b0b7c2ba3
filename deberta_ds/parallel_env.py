"""Process-group environment helpers."""

from __future__ import annotations

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


def release_deepspeed_shm(rank: int | None = None, addr: str | None = None, port: str | None = None) -> None:
    """Remove a rank's shared-memory all-reduce buffer (about 58 MB), which DeepSpeed never
    unlinks: without this every CPU run leaves it behind until /dev/shm fills the RAM. Peers that
    still map it keep their mapping; the defaults are this process's rank and rendezvous."""
    rank = int(os.environ.get("RANK", -1)) if rank is None else rank
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    if rank >= 0:
        deepspeed_shm_buffer(rank, addr, port).unlink(missing_ok=True)
