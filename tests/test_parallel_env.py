"""init_distributed on CPU starts the process group without compiling DeepSpeed's shared-memory
all-reduce op (a C++ build of minutes per rank before the first step), and collectives work."""

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
    return {"shm_op": ds_comm.cdb.shm_comm_op, "shm_buffers": shm, "summed": summed.tolist()}


@pytest.mark.slow
def test_no_deepspeed_op_is_compiled_at_start_up_and_all_reduce_works(tmp_path, monkeypatch):
    extensions = tmp_path / "torch_extensions"  # where torch's JIT would build an op
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    state = run_distributed(process_group_after_init, 2, tmp_dir=tmp_path, timeout_s=180)
    assert state["shm_op"] is None and state["shm_buffers"] == []
    assert not extensions.exists(), sorted(p.name for p in extensions.rglob("*"))
    assert state["summed"] == [3.0] * 4096
