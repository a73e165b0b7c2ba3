"""Process setup for distributed runs: the environment of a world of one, the process group
(DeepSpeed's, with its CPU workarounds), telling a lost peer from a bug, and the orderly end."""

from __future__ import annotations

import datetime
import os
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_environment() -> dict:
    """torch.distributed variables for a world of one on this machine."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def _without_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (g++: 1.5-4 min and
    about 1.5 GB per rank) when the process group starts, in a build cache every environment
    shares (so two environments rebuild it in turn) and behind a lock file that a build killed
    midway leaves for every later start to wait on. Only DeepSpeed inference's
    `inference_all_reduce` uses the op; training's collectives go through gloo. Reported as
    unavailable, nothing is compiled and no /dev/shm buffer is made."""
    import importlib

    # by name: `import deepspeed.comm.torch as x` binds torch itself, re-exported by deepspeed.comm
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def cpu_threads_per_rank() -> int:
    """This machine's usable cores split among the ranks on it (LOCAL_SIZE, which the deepspeed
    launcher sets). torch's default gives every rank every core: two ranks on two cores then run
    four compute threads, and each step waits on the slowest rank."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_SIZE", "1")))


def init_distributed(timeout_s: float | None = None) -> None:
    """deepspeed.init_distributed (NCCL on GPUs, gloo on CPU; collectives fail after timeout_s,
    torch's default when None) without DeepSpeed's shared-memory op: no C++ compile at start-up.
    On the CPU each rank computes on its share of the cores unless OMP_NUM_THREADS says otherwise."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    if torch.cuda.is_available():  # NCCL's communicators bind to the current device: this rank's own
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif "OMP_NUM_THREADS" not in os.environ:  # the user's choice stands
        torch.set_num_threads(cpu_threads_per_rank())
    _without_shared_memory_all_reduce()
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **timeout)


def setup_process(timeout_s: float | None) -> None:
    """Everything a training process needs before its first collective: a world of one when no
    launcher set the variables, the CPU fp16 testing aid, then the process group."""
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        os.environ.update(single_process_environment())
    if os.environ.get("DEBERTA_DS_CPU_FP16") == "1":  # testing aid: DeepSpeed refuses fp16 without mkldnn fp16
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True
    init_distributed(timeout_s=timeout_s)


def lost_contact(error: RuntimeError) -> bool:
    """Whether a collective failed because a peer or the network went away (a timeout or a closed
    connection in gloo or NCCL), as opposed to a bug, which must surface with its traceback."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(sign in text for sign in (
        "gloo/transport", "Timed out waiting", "Connection closed by peer", "Connection reset by peer",
        "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


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
