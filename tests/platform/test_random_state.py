"""RandomStateCheckpoint across ranks: every rank's RNG state is saved, and each rank gets its own back."""

import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.platform.callbacks import RandomStateCheckpoint


class TwoRanks:
    world_size = 2

    def __init__(self, rank: int) -> None:
        self.global_rank = rank


def draws() -> list[float]:
    return [torch.rand(1).item(), float(np.random.rand()), random.random()]


def save_then_restore(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(10 + rank), np.random.seed(20 + rank), random.seed(30 + rank)
        callback = RandomStateCheckpoint()
        callback.setup(TwoRanks(rank), None, "fit")
        state = callback.state_dict()  # a collective: every rank calls it, as in any checkpoint save
        expected = draws()
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        restored = RandomStateCheckpoint()
        restored.load_state_dict(state)
        restored.on_train_start(TwoRanks(rank), None)
        results[rank] = (len(state["ranks"]), expected, draws())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_each_rank_restores_its_own_random_state():
    with mp.Manager() as manager:
        results = manager.dict()
        args = (free_port(), results)
        mp.start_processes(save_then_restore, args=args, nprocs=2, join=True, start_method="fork")
        results = dict(results)
    for rank in (0, 1):
        saved_ranks, expected, got = results[rank]
        assert saved_ranks == 2
        assert got == expected, rank
    assert results[0][1] != results[1][1]  # the ranks really had different states
