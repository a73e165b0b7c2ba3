"""init_distributed on CPU starts the process group without compiling DeepSpeed's shared-memory
all-reduce op (a C++ build of minutes per rank before the first step), collectives work, and the
ranks on one machine split its cores instead of each taking all of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_distributed


def process_group_after_init() -> dict:
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm

    rank = dist.get_rank()
    summed = torch.full((4096,), float(rank + 1))
    ds_dist.all_reduce(summed)  # through DeepSpeed's communication layer, as the engines reduce
    shm = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*")]
    return {"shm_op": ds_comm.cdb.shm_comm_op, "shm_buffers": shm, "summed": summed.tolist(),
            "threads": torch.get_num_threads()}


@pytest.mark.slow
def test_no_deepspeed_op_is_compiled_at_start_up_and_the_ranks_share_the_cores(tmp_path, monkeypatch):
    extensions = tmp_path / "torch_extensions"  # where torch's JIT would build an op
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    state = run_distributed(process_group_after_init, 2, tmp_dir=tmp_path, timeout_s=180)
    assert state["shm_op"] is None and state["shm_buffers"] == []
    assert not extensions.exists(), sorted(p.name for p in extensions.rglob("*"))
    assert state["summed"] == [3.0] * 4096
    assert state["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)   # two ranks on this machine


def test_a_rank_takes_its_share_of_the_cores(monkeypatch):
    from deberta_ds.parallel_env import cpu_threads_per_rank

    cores = len(os.sched_getaffinity(0))
    for local_size, threads in ((None, cores), ("1", cores), (str(cores), 1), (str(4 * cores), 1)):
        if local_size is None:
            monkeypatch.delenv("LOCAL_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_SIZE", local_size)
        assert cpu_threads_per_rank() == threads, local_size
