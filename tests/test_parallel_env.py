"""init_distributed on CPU: DeepSpeed's shared-memory all-reduce buffers are unlinked without
stranding a peer, and the shared-memory all-reduce still works after the unlink."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist_helpers import run_distributed


def shm_state_after_init() -> dict:
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm

    from deberta_ds.parallel_env import deepspeed_shm_buffer

    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()  # every rank has returned from init_distributed (and so removed its buffer)
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    buffers = [deepspeed_shm_buffer(peer, address, port) for peer in range(world)]
    left = [str(path) for path in buffers if path.exists()]
    summed = ds_comm.inference_all_reduce(torch.full((4096,), float(rank + 1)))  # through the unlinked buffers
    return {"left": left, "summed": summed.tolist(), "shm_op": ds_comm.cdb.shm_comm_op is not None}


def return_at_once() -> str:
    return "done"  # no collective: rank 0 may finish while its peer is still in DeepSpeed's shm set-up


@pytest.mark.slow
def test_shm_buffers_are_gone_after_init_and_all_reduce_still_works(tmp_path):
    state = run_distributed(shm_state_after_init, 2, tmp_dir=tmp_path)
    assert state["shm_op"], "DeepSpeed's CPU shared-memory op was not loaded; this test proves nothing"
    assert state["left"] == []
    assert state["summed"] == [3.0] * 4096


@pytest.mark.slow
def test_a_rank_that_returns_at_once_does_not_strand_its_peer(tmp_path):
    # Unlinking a buffer before every peer mapped it left that peer spinning forever (a CI hang).
    for _ in range(3):
        assert run_distributed(return_at_once, 2, tmp_dir=tmp_path, timeout_s=300) == "done"
